"""transformers' Llama and Mistral checkpoint formats, in and out.

``model, cfg = from_pretrained(dir)`` reads a ``config.json`` + safetensors directory whose
``model_type`` is ``llama`` or ``mistral`` (MHA, GQA or MQA attention, dense SwiGLU,
RMSNorm, RoPE, tied or untied embeddings) as an mlalm model with
``attention.kind`` mha/gqa/mqa (by ``num_key_value_heads``) and no MoE;
``save_pretrained(model, cfg, dir)`` writes a dense MHA/GQA/MQA mlalm model in that format
(``LlamaForCausalLM``), which transformers, vLLM, SGLang and llama.cpp's converter read.

Layout: transformers stores each head's query/key features in the rotate-half order
(feature i is rotated with feature i + H/2 by the angle of frequency θ^(-2i/H)), which is
exactly mlalm's 'half' RoPE layout (``mlalm.model.layers.apply_rope``), so the weights are
transposed ([out, in] files, [in, ...out] in mlalm) and never permuted.

What the format can say and mlalm cannot compute is refused with a one-line ConfigError
naming it, never approximated: attention or MLP biases, ``rope_scaling`` /
``rope_parameters`` of any type but ``default``, partial rotary factors, a sliding window
shorter than the model's positions, activations other than SiLU, dropout, quantized
weights, and any tensor in the files that such a model would not read.
"""

from __future__ import annotations

from dataclasses import replace

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.config import Config, from_dict
from mlalm.errors import CheckpointError, ConfigError

MODEL_TYPES = ("llama", "mistral")
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def _rope(hf: dict) -> tuple[str, float, dict]:
    """(rope type, theta, the rope dict) from either spelling: transformers >= 5
    ``rope_parameters``, older files ``rope_theta`` + ``rope_scaling``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    return kind, float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope


def config_from_hf(hf: dict, base: Config | None = None) -> Config:
    """mlalm Config for a Llama/Mistral ``config.json`` dict; ConfigError (one line, naming
    the key) for anything mlalm would compute differently."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"config.json: model_type {mt!r} is not one of {', '.join(MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (silu only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"config.json: {key}=true is not supported (mlalm's projections have no bias)")
    kind, theta, rope = _rope(hf)
    if kind != "default":
        raise ConfigError(f"config.json: rope type {kind!r} is not supported (default RoPE only)")
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ConfigError(
            f"config.json: partial_rotary_factor={factor} is not supported (RoPE on whole heads)"
        )
    L, max_pos = hf["num_hidden_layers"], hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    if window is not None and (hf.get("use_sliding_window", True) and window < max_pos):
        # a window at least as long as every position the model supports never masks anything
        raise ConfigError(
            f"config.json: sliding_window={window} is shorter than max_position_embeddings={max_pos}; "
            f"sliding-window attention is not supported"
        )
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ConfigError("config.json: layer_types other than full_attention are not supported")
    for key in ("attention_dropout", "hidden_dropout", "mlp_dropout"):
        if hf.get(key):
            raise ConfigError(f"config.json: {key}={hf[key]} is not supported (mlalm trains without dropout)")
    if hf.get("quantization_config"):
        raise ConfigError("config.json: quantized weights (quantization_config) are not supported")
    if (hf.get("pretraining_tp") or 1) != 1:
        raise ConfigError(f"config.json: pretraining_tp={hf['pretraining_tp']} is not supported (1 only)")
    N, D = hf["num_attention_heads"], hf["hidden_size"]
    K = hf.get("num_key_value_heads") or N
    H = hf.get("head_dim") or D // N
    attention: dict = dict(n_heads=N, head_dim=H)
    if K == N:
        attention["kind"] = "mha"
    elif K == 1:
        attention["kind"] = "mqa"
    else:
        attention.update(kind="gqa", n_kv_heads=K)
    raw = {
        "model": dict(
            vocab_size=hf["vocab_size"],
            d_model=D,
            n_layers=L,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=max_pos,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta,
            init_std=float(hf.get("initializer_range", 0.02)),
            mtp_depth=0,
        ),
        "attention": attention,
        "moe": dict(n_routed_experts=0),
    }
    seq_len = (base or Config()).train.seq_len
    raw["train"] = dict(seq_len=min(seq_len, max_pos))
    return from_dict(raw, base)


def config_to_hf(
    cfg: Config,
    *,
    model_type: str = "llama",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """transformers ``config.json`` dict for ``cfg``; ConfigError if the format cannot say it
    (MLA attention, MoE, multi-token prediction)."""
    m, a = cfg.model, cfg.attention
    if a.kind == "mla":
        raise ConfigError(
            "attention.kind=mla: the Llama format has no latent attention; "
            "write it with mlalm.hf.save_pretrained (DeepSeek-V3)"
        )
    if cfg.moe.n_routed_experts:
        raise ConfigError(f"moe.n_routed_experts={cfg.moe.n_routed_experts}: the Llama format has no MoE")
    if m.mtp_depth:
        raise ConfigError(f"model.mtp_depth={m.mtp_depth}: the Llama format has no multi-token prediction")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    for name, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        assert m.vocab_size is not None, f"{name}: model.vocab_size must be set to check token ids"
        if value is not None and not 0 <= value < m.vocab_size:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {m.vocab_size})")
    out = {
        "architectures": [_ARCH[model_type]],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # older readers; transformers >= 5 reads rope_parameters
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "torch_dtype": m.param_dtype,
        "dtype": m.param_dtype,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if model_type == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    else:
        out["sliding_window"] = None
    return out


# ---------------------------------------------------------------------------------------
# Weight mapping
# ---------------------------------------------------------------------------------------


def _mapping(cfg: Config):
    """Yield (file key, file shape, module path, attribute, to_file, from_file): files hold
    Linear weights [out, in], mlalm [in, ...out]."""
    m, a = cfg.model, cfg.attention
    D, V, F, N, K, H = m.d_model, m.vocab_size, m.ffn_dim, a.n_heads, cfg.n_kv_heads, a.head_dim
    assert V is not None

    def proj(out_shape):  # mlalm [D, *out] <-> file [prod(out), D]
        return (lambda w: w.reshape(w.shape[0], -1).T), (lambda t: t.T.reshape((t.shape[1],) + out_shape))

    def out_proj(in_shape):  # mlalm [*in, D] <-> file [D, prod(in)]
        return (lambda w: w.reshape(-1, w.shape[-1]).T), (lambda t: t.T.reshape(in_shape + (t.shape[0],)))

    same = (lambda w: w), (lambda t: t)
    yield "model.embed_tokens.weight", (V, D), (), "embed_VD", *same
    yield "model.norm.weight", (D,), ("final_norm",), "scale", *same
    if not m.tie_embeddings:
        yield "lm_head.weight", (V, D), (), "head_DV", *proj((V,))
    for i in range(m.n_layers):
        p, blk = f"model.layers.{i}.", ("blocks", i)
        yield p + "input_layernorm.weight", (D,), blk + ("attn_norm",), "scale", *same
        yield p + "post_attention_layernorm.weight", (D,), blk + ("ffn_norm",), "scale", *same
        at, ff = blk + ("attn",), blk + ("ffn",)
        yield p + "self_attn.q_proj.weight", (N * H, D), at, "wq_DNH", *proj((N, H))
        yield p + "self_attn.k_proj.weight", (K * H, D), at, "wk_DKH", *proj((K, H))
        yield p + "self_attn.v_proj.weight", (K * H, D), at, "wv_DKG", *proj((K, H))
        yield p + "self_attn.o_proj.weight", (D, N * H), at, "wo_NGD", *out_proj((N, H))
        yield p + "mlp.gate_proj.weight", (F, D), ff, "w_gate_DF", *proj((F,))
        yield p + "mlp.up_proj.weight", (F, D), ff, "w_up_DF", *proj((F,))
        yield p + "mlp.down_proj.weight", (D, F), ff, "w_down_FD", *proj((D,))


def _module_at(model, path):
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def check_tensors(tensors, cfg: Config) -> None:
    """CheckpointError naming the first tensor that is missing, has another shape than
    ``cfg`` implies (from the safetensors headers: no data is read), or is one such a model
    does not have (a bias, say).  A tied model's ``lm_head.weight`` may be present: it is
    then compared with the embedding when read."""
    expected = {key: shape for key, shape, *_ in _mapping(cfg)}
    for key, shape in expected.items():
        found = tensors.shape(key)
        if found != tuple(shape):
            raise CheckpointError(
                f"{tensors.path}: tensor '{key}' has shape {list(found)} in {tensors.key_file[key]}, "
                f"config.json implies {list(shape)}"
            )
    for key in sorted(tensors.key_file):
        tied_head = key == "lm_head.weight" and cfg.model.tie_embeddings
        if key not in expected and not tied_head and not key.endswith("rotary_emb.inv_freq"):
            raise CheckpointError(
                f"{tensors.path}: tensor '{key}' is not part of the model config.json describes "
                f"(mlalm reads no biases or other extra tensors)"
            )


def from_pretrained(path: str, *, base: Config | None = None, dtype: str | None = None):
    """Load a transformers Llama or Mistral directory into an mlalm model.

    config.json is checked first (unsupported features), then every tensor shape against it
    from the safetensors headers, before the model is allocated.

    Args:
        path: directory with config.json and *.safetensors (one file or sharded with an index).
        base: optional Config whose non-model sections (train, optim, data, ...) are kept.
        dtype: parameter dtype ('float32' or 'bfloat16'); default bfloat16 for a bfloat16
            file, else float32.

    Returns:
        (model, cfg): an ``mlalm.model.Transformer`` and its Config (attention.kind
        mha/gqa/mqa, moe.n_routed_experts 0).
    """
    from mlalm.hf import Tensors, read_config
    from mlalm.model import Transformer

    hf_cfg = read_config(path)
    cfg = config_from_hf(hf_cfg, base)
    file_dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    pd = dtype or ("bfloat16" if file_dtype == "bfloat16" else "float32")
    cfg = replace(cfg, model=replace(cfg.model, param_dtype=pd))
    tensors = Tensors(path)
    check_tensors(tensors, cfg)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for key, _, mpath, attr, _, from_file in _mapping(cfg):
        var = getattr(_module_at(model, mpath), attr)
        var.set_value(
            jnp.asarray(from_file(np.asarray(tensors(key), dtype=np.float32)), dtype=var[...].dtype)
        )
    if cfg.model.tie_embeddings and tensors.has("lm_head.weight"):
        head, embed = (
            np.asarray(tensors("lm_head.weight"), np.float32),
            np.asarray(tensors("model.embed_tokens.weight"), np.float32),
        )
        if not np.array_equal(head, embed):
            raise CheckpointError(
                f"{path}: tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight"
            )
    return model, cfg


def save_pretrained(
    model,
    cfg: Config,
    path: str,
    *,
    dtype: str | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    model_type: str = "llama",
) -> None:
    """Write config.json + model.safetensors (+ generation_config.json when a token id is
    given) that ``transformers.LlamaForCausalLM`` (or ``MistralForCausalLM`` with
    ``model_type='mistral'``) loads; dense MHA/GQA/MQA models only (ConfigError otherwise,
    before anything is written).

    Args:
        dtype: 'float32' or 'bfloat16' for the weights (default the model's param_dtype).
        eos_token_id: the end-of-text id (mlalm tokenizers: ``tokenizer.eos_id``), so that
            transformers' ``generate`` and serving engines stop there.
        bos_token_id, pad_token_id: written when given.

    Files get the permissions ``open()`` would give (0o666 minus the umask), as
    ``mlalm.hf.save_pretrained``'s.
    """
    from mlalm.hf import write_checkpoint_dir

    hf_cfg = config_to_hf(
        cfg,
        model_type=model_type,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )  # raises before writing
    np_dtype = np.float32
    name = dtype or cfg.model.param_dtype
    if name == "bfloat16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = name
    tensors = {}
    for key, _, mpath, attr, to_file, _ in _mapping(cfg):
        value = np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32)
        tensors[key] = np.ascontiguousarray(to_file(value).astype(np_dtype))
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    write_checkpoint_dir(tensors, hf_cfg, path, ids)
