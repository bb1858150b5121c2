"""transformers' DeepSeek-V3 checkpoint format, in and out.

``model, cfg = from_pretrained(dir)`` reads a ``config.json`` + safetensors directory
(single file or sharded with an index) written by transformers or by DeepSeek;
``save_pretrained(model, cfg, dir)`` writes one that
``transformers.DeepseekV3ForCausalLM.from_pretrained(dir)`` loads.

Layout notes:
  * Routed experts are written one tensor per expert (``experts.{e}.gate_proj.weight``),
    DeepSeek's own layout, which transformers and inference engines load; on reading,
    transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj`` is accepted too.
  * mlalm applies RoPE in the 'half' layout (feature i pairs with i + d_r/2).  DeepSeek
    stores rope features interleaved (pairs (2i, 2i+1)) and declares
    ``rope_interleave: true``; the rope rows of W_q and W_kva are permuted on the way in
    and out, which leaves every attention score unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.config import Config, from_dict
from mlalm.errors import CheckpointError, ConfigError


# ---------------------------------------------------------------------------------------
# config.json <-> Config
# ---------------------------------------------------------------------------------------

def config_from_hf(hf: dict, base: Config | None = None) -> Config:
    """mlalm Config for a transformers DeepSeek-V3 ``config.json`` dict."""
    if hf.get("model_type", "deepseek_v3") not in ("deepseek_v3",):
        raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not deepseek_v3")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("attention_bias", False):
        raise ConfigError("config.json: attention_bias=true is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} "
                          f"is not supported (default RoPE only)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    L = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    moe = {}
    if first_dense < L:
        moe = dict(n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
                   top_k=hf["num_experts_per_tok"], expert_ffn_dim=hf["moe_intermediate_size"],
                   first_k_dense_replace=first_dense, scoring="sigmoid",
                   n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                   norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                   dispatch="dropless")
    raw = {
        "model": dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=L,
                      ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
                      norm_eps=hf.get("rms_norm_eps", 1e-6),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=float(theta)),
        "attention": dict(kind="mla", n_heads=hf["num_attention_heads"],
                          q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                          qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                          v_head_dim=hf["v_head_dim"]),
        "moe": moe,
    }
    seq_len = (base or Config()).train.seq_len
    raw["train"] = dict(seq_len=min(seq_len, raw["model"]["max_seq_len"]))
    return from_dict(raw, base)


def config_to_hf(cfg: Config) -> dict:
    """transformers ``config.json`` dict for ``cfg``; ConfigError if the format cannot say it."""
    m, a, e = cfg.model, cfg.attention, cfg.moe
    if a.kind != "mla":
        raise ConfigError(f"attention.kind={a.kind}: the DeepSeek-V3 format only expresses MLA attention")
    dense_only = e.n_routed_experts == 0
    if not dense_only and e.scoring != "sigmoid":
        raise ConfigError("moe.scoring=softmax: the DeepSeek-V3 format routes with sigmoid scores")
    if not dense_only and e.n_shared_experts == 0:
        raise ConfigError("moe.n_shared_experts=0: the DeepSeek-V3 format needs at least one shared expert")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "moe_intermediate_size": e.expert_ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads,
        "n_shared_experts": e.n_shared_experts if not dense_only else 1,
        "n_routed_experts": e.n_routed_experts if not dense_only else 1,
        "routed_scaling_factor": e.routed_scaling_factor,
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank or None,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim,
        "n_group": e.n_group,
        "topk_group": e.topk_group,
        "num_experts_per_tok": e.top_k if not dense_only else 1,
        "first_k_dense_replace": m.n_layers if dense_only else e.first_k_dense_replace,
        "norm_topk_prob": e.norm_topk_prob,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_theta": m.rope_theta,
        "rope_interleave": True,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
        "torch_dtype": m.param_dtype,
        "bos_token_id": None,
        "eos_token_id": None,
    }


# ---------------------------------------------------------------------------------------
# Weight mapping: one table drives both directions
# ---------------------------------------------------------------------------------------

def _rope_perm(P: int) -> np.ndarray:
    """half-layout index j <- interleaved index perm[j]: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return np.concatenate([np.arange(0, P, 2), np.arange(1, P, 2)])


def _mapping(cfg: Config, interleave: bool):
    """Yield (module path, attribute, to_hf(array) -> {key: array}, from_hf(get) -> array).

    Shapes: HF Linear weights are [out, in]; mlalm keeps [in, ...out] for einsums.
    """
    m, a = cfg.model, cfg.attention
    N, dn, P, dv, R = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    perm = _rope_perm(P) if interleave else np.arange(P)
    inv = np.argsort(perm)
    # a head's qk features: nope (kept) then rope (permuted)
    q_in = np.concatenate([np.arange(dn), dn + perm])   # mlalm feature j <- hf feature q_in[j]
    q_out = np.concatenate([np.arange(dn), dn + inv])   # hf feature j <- mlalm feature q_out[j]
    kva_in = np.concatenate([np.arange(R), R + perm])
    kva_out = np.concatenate([np.arange(R), R + inv])

    def linear(key, out_shape=None, rows_in=None, rows_out=None):
        """mlalm [in, *out] <-> hf [prod(out), in], optionally permuting the last out axis."""
        def to_hf(w):
            w = np.asarray(w)
            if rows_out is not None:
                w = w[..., rows_out]
            return {key: w.reshape(w.shape[0], -1).T}

        def from_hf(get):
            w = get(key).T
            if out_shape is not None:
                w = w.reshape((w.shape[0],) + out_shape)
            if rows_in is not None:
                w = w[..., rows_in]
            return w
        return to_hf, from_hf

    def out_proj(key, in_shape):  # mlalm [*in, D] <-> hf [D, prod(in)]
        return (lambda w: {key: np.asarray(w).reshape(-1, m.d_model).T},
                lambda get: get(key).T.reshape(in_shape + (m.d_model,)))

    def same(key):
        return (lambda w: {key: np.asarray(w)}), (lambda get: get(key))

    yield ("",), "embed_VD", *same("model.embed_tokens.weight")
    yield ("final_norm",), "scale", *same("model.norm.weight")
    if not m.tie_embeddings:
        yield ("",), "head_DV", *linear("lm_head.weight")
    for i in range(m.n_layers):
        p = f"model.layers.{i}."
        blk = ("blocks", i)
        yield blk + ("attn_norm",), "scale", *same(p + "input_layernorm.weight")
        yield blk + ("ffn_norm",), "scale", *same(p + "post_attention_layernorm.weight")
        at = blk + ("attn",)
        if a.q_lora_rank:
            yield at, "wq_a_DQ", *linear(p + "self_attn.q_a_proj.weight")
            yield at + ("q_norm",), "scale", *same(p + "self_attn.q_a_layernorm.weight")
            yield at, "wq_b_QNH", *linear(p + "self_attn.q_b_proj.weight", (N, dn + P), q_in, q_out)
        else:
            yield at, "wq_DNH", *linear(p + "self_attn.q_proj.weight", (N, dn + P), q_in, q_out)
        yield at, "wkv_a_DR", *linear(p + "self_attn.kv_a_proj_with_mqa.weight", None, kva_in, kva_out)
        yield at + ("kv_norm",), "scale", *same(p + "self_attn.kv_a_layernorm.weight")
        yield at, "wkv_b_RNH", *linear(p + "self_attn.kv_b_proj.weight", (N, dn + dv))
        yield at, "wo_NHD", *out_proj(p + "self_attn.o_proj.weight", (N, dv))
        ff = blk + ("ffn",)
        if cfg.is_moe_layer(i):
            yield ff, "w_router_DE", *linear(p + "mlp.gate.weight")
            yield ff, "bias_E", *same(p + "mlp.gate.e_score_correction_bias")
            yield from _expert_entries(ff, p + "mlp.experts.", cfg.moe.n_routed_experts)
            if cfg.moe.n_shared_experts:
                yield from _swiglu_entries(ff + ("shared",), p + "mlp.shared_experts.", linear, out_proj)
        else:
            yield from _swiglu_entries(ff, p + "mlp.", linear, out_proj)


def _swiglu_entries(path, prefix, linear, out_proj):
    yield path, "w_gate_DF", *linear(prefix + "gate_proj.weight")
    yield path, "w_up_DF", *linear(prefix + "up_proj.weight")
    down_to, _ = out_proj(prefix + "down_proj.weight", ())
    yield path, "w_down_FD", down_to, lambda get: get(prefix + "down_proj.weight").T


def _expert_entries(path, prefix, E):
    """Per-expert keys out; per-expert or transformers' fused keys in."""
    def to_hf(name):
        def f(w):  # w: [E, in, out] -> E tensors [out, in]
            w = np.asarray(w)
            return {f"{prefix}{e}.{name}.weight": w[e].T for e in range(E)}
        return f

    def from_hf(name):
        def f(get):
            if get.has(f"{prefix}0.{name}.weight"):
                return np.stack([get(f"{prefix}{e}.{name}.weight").T for e in range(E)])
            if name == "down_proj":  # fused [E, D, F]
                return np.swapaxes(get(prefix + "down_proj"), 1, 2)
            gate_up = get(prefix + "gate_up_proj")  # [E, 2F, D]: gate rows, then up rows
            F = gate_up.shape[1] // 2
            part = gate_up[:, :F] if name == "gate_proj" else gate_up[:, F:]
            return np.swapaxes(part, 1, 2)
        return f

    yield path, "w_gate_EDF", to_hf("gate_proj"), from_hf("gate_proj")
    yield path, "w_up_EDF", to_hf("up_proj"), from_hf("up_proj")
    yield path, "w_down_EFD", to_hf("down_proj"), from_hf("down_proj")


def _module_at(model, path):
    obj = model
    for p in path:
        if p == "":
            continue
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

class _Tensors:
    """Lazy access to a directory's safetensors files, with clear errors."""

    def __init__(self, path: str):
        from safetensors import safe_open
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files")
        self.key_file = {}
        self.handles = {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise CheckpointError(f"{path}: shard {fname} named in the index is missing")
            try:
                h = safe_open(full, framework="numpy")
            except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
                raise CheckpointError(f"{full}: not a readable safetensors file ({e})")
            self.handles[fname] = h
            for k in h.keys():
                self.key_file[k] = fname
        self.used = set()

    def has(self, key):
        return key in self.key_file

    def __call__(self, key):
        if key not in self.key_file:
            raise CheckpointError(f"checkpoint has no tensor '{key}'")
        self.used.add(key)
        return self.handles[self.key_file[key]].get_tensor(key)


def from_pretrained(path: str, *, base: Config | None = None, dtype: str | None = None):
    """Load a transformers DeepSeek-V3 directory into an mlalm model.

    Args:
        path: directory with config.json and *.safetensors.
        base: optional Config whose non-model sections (train, optim, ...) are kept.
        dtype: parameter dtype ('float32' or 'bfloat16'); default the file's or float32.

    Returns:
        (model, cfg)
    """
    from mlalm.model import Transformer
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (is this a transformers checkpoint directory?)")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    cfg = config_from_hf(hf_cfg, base)
    pd = dtype or ("bfloat16" if hf_cfg.get("torch_dtype") == "bfloat16" else "float32")
    cfg = replace(cfg, model=replace(cfg.model, param_dtype=pd))
    interleave = bool(hf_cfg.get("rope_interleave", True))
    tensors = _Tensors(path)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for mpath, attr, _, from_hf in _mapping(cfg, interleave):
        var = getattr(_module_at(model, mpath), attr)
        value = np.asarray(from_hf(tensors), dtype=np.float32)
        if value.shape != var[...].shape:
            raise CheckpointError(f"{path}: tensor for {'.'.join(map(str, mpath))}.{attr} has shape "
                                  f"{value.shape}, the config implies {var[...].shape}")
        var.set_value(jnp.asarray(value, dtype=var[...].dtype))
    return model, cfg


def save_pretrained(model, cfg: Config, path: str, *, dtype: str | None = None) -> None:
    """Write config.json + model.safetensors that transformers' DeepseekV3ForCausalLM loads."""
    from safetensors.numpy import save_file
    hf_cfg = config_to_hf(cfg)  # raises ConfigError before anything is written
    np_dtype = np.float32
    if (dtype or cfg.model.param_dtype) == "bfloat16":
        import ml_dtypes
        np_dtype = ml_dtypes.bfloat16
        hf_cfg["torch_dtype"] = "bfloat16"
    else:
        hf_cfg["torch_dtype"] = "float32"
    tensors = {}
    for mpath, attr, to_hf, _ in _mapping(cfg, interleave=True):
        value = np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32)
        for k, v in to_hf(value).items():
            keep32 = k.endswith("e_score_correction_bias")  # transformers keeps it in float32
            tensors[k] = np.ascontiguousarray(v.astype(np.float32 if keep32 else np_dtype))
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
