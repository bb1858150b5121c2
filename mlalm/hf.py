"""transformers' DeepSeek-V3 checkpoint format, in and out.

``model, cfg = from_pretrained(dir)`` reads a ``config.json`` + safetensors directory
(single file or sharded with an index) written by transformers or by DeepSeek;
``save_pretrained(model, cfg, dir, eos_token_id=...)`` writes one that
``transformers.DeepseekV3ForCausalLM.from_pretrained(dir)`` loads and that serving engines
(vLLM, SGLang, llama.cpp's GGUF converter) read with the same routing (see
:func:`config_to_hf` for which engine reads which key).

Layout notes:
  * Routed experts are written one tensor per expert (``experts.{e}.gate_proj.weight``),
    DeepSeek's own layout, which transformers and inference engines load; on reading,
    transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj`` is accepted too.
  * mlalm applies RoPE in the 'half' layout (feature i pairs with i + d_r/2).  DeepSeek
    stores rope features interleaved (pairs (2i, 2i+1)) and declares
    ``rope_interleave: true``; the rope rows of W_q and W_kva are permuted on the way in
    and out, which leaves every attention score unchanged.
  * Multi-token prediction (``model.mtp_depth`` = D): as in DeepSeek-V3's checkpoints,
    depth k is decoder layer ``num_hidden_layers + k - 1`` with ``enorm``, ``hnorm``,
    ``eh_proj``, the block's usual keys, and copies of the embedding (``embed_tokens``),
    final norm (``shared_head.norm``) and head (``shared_head.head``);
    ``num_nextn_predict_layers: D`` in config.json.  vLLM and SGLang speculate with it;
    transformers ignores it (see :func:`_mtp_copies`).
  * Before any parameter is allocated, :func:`from_pretrained` compares every tensor
    shape config.json implies with the safetensors headers (which hold the shapes; no
    tensor data is read), so a config that does not describe its tensors fails in
    milliseconds instead of after allocating the model it describes.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.config import Config, from_dict
from mlalm.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------
# config.json <-> Config
# ---------------------------------------------------------------------------------------

# The routing algorithms config.json can name (``topk_method``) and what they compute,
# with s = scoring_func(x W_g) and b the per-expert correction bias:
#   noaux_tc  choose top-k of s + b within the topk_group best groups, a group scoring
#             the sum of its two best s + b; weights are the unbiased s of the chosen
#             experts (DeepSeek-V3).  This is exactly what mlalm.model.moe.route computes,
#             whatever the scoring function.
#   greedy    top-k of s, no bias, no groups (DeepSeek-V2-Lite): mlalm's routing when
#             b = 0 and n_group = 1.
#   group_limited_greedy  ranks groups by their single best s (DeepSeek-V2): not what
#             mlalm computes, so it is neither written nor read.
_TOPK_METHODS = ("noaux_tc", "greedy")


def config_from_hf(hf: dict, base: Config | None = None, *, mtp_depth: int | None = None) -> Config:
    """mlalm Config for a transformers DeepSeek-V3 ``config.json`` dict.

    ``mtp_depth``: model.mtp_depth (default: config.json's ``num_nextn_predict_layers``).
    """
    if hf.get("model_type", "deepseek_v3") not in ("deepseek_v3",):
        raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not deepseek_v3")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("attention_bias", False):
        raise ConfigError("config.json: attention_bias=true is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(
            f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} "
            f"is not supported (default RoPE only)"
        )
    # absent keys mean DeepSeek-V3's routing: transformers' DeepseekV3 always routes so
    scoring = hf.get("scoring_func") or "sigmoid"
    if scoring not in ("sigmoid", "softmax"):
        raise ConfigError(f"config.json: scoring_func {scoring!r} is not supported (valid: sigmoid, softmax)")
    topk_method = hf.get("topk_method") or "noaux_tc"
    if topk_method not in _TOPK_METHODS:
        raise ConfigError(
            f"config.json: topk_method {topk_method!r} is not supported (valid: {', '.join(_TOPK_METHODS)})"
        )
    if (hf.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(
            f"config.json: moe_layer_freq={hf['moe_layer_freq']} is not supported "
            f"(1: every layer after first_k_dense_replace is MoE)"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    L = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    moe = {}
    if first_dense < L:
        grouped = topk_method == "noaux_tc"  # greedy routing ignores groups
        moe = dict(
            n_routed_experts=hf["n_routed_experts"],
            n_shared_experts=hf.get("n_shared_experts") or 0,
            top_k=hf["num_experts_per_tok"],
            expert_ffn_dim=hf["moe_intermediate_size"],
            first_k_dense_replace=first_dense,
            scoring=scoring,
            n_group=(hf.get("n_group") or 1) if grouped else 1,
            topk_group=(hf.get("topk_group") or 1) if grouped else 1,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            dispatch="dropless",
        )
    raw = {
        "model": dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=L,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=float(theta),
            mtp_depth=(hf.get("num_nextn_predict_layers") or 0) if mtp_depth is None else mtp_depth,
        ),
        "attention": dict(
            kind="mla",
            n_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
        ),
        "moe": moe,
    }
    seq_len = (base or Config()).train.seq_len
    raw["train"] = dict(seq_len=min(seq_len, raw["model"]["max_seq_len"]))
    return from_dict(raw, base)


def config_to_hf(
    cfg: Config,
    *,
    routing_bias: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """transformers ``config.json`` dict for ``cfg``; ConfigError if the format cannot say it.

    Args:
        routing_bias: whether the MoE layers' correction biases may be non-zero (then
            they are written and ``topk_method`` is noaux_tc).  :func:`save_pretrained`
            passes False when every bias is exactly 0, which lets a softmax-routed model
            be declared with DeepSeek-V2's plain ``greedy`` routing, which every engine
            reads the same way.
        bos_token_id, eos_token_id, pad_token_id: written as given (None: none).

    Which reader uses which key (checked against these sources):
      * DeepSeek-V3's own ``config.json`` (huggingface.co/deepseek-ai/DeepSeek-V3) carries
        every key below, including scoring_func=sigmoid, topk_method=noaux_tc,
        moe_layer_freq=1, n_group/topk_group and the token ids.
      * transformers (``models/deepseek_v3/modeling_deepseek_v3.py``,
        DeepseekV3TopkRouter): always sigmoid + e_score_correction_bias with top-2 group
        scores; ignores scoring_func and topk_method; q_lora_rank None -> q_proj.  Reads
        bos/eos/pad_token_id from config.json and generation_config.json.
      * vLLM (vllm-project/vllm, vllm/model_executor/models/deepseek_v2.py): DeepseekV2MoE
        reads scoring_func (default softmax when absent!), creates the
        e_score_correction_bias parameter only when topk_method == "noaux_tc" (a bias
        tensor in the file without it fails the load), n_group, topk_group,
        norm_topk_prob (renormalize), routed_scaling_factor, n_shared_experts,
        moe_intermediate_size; DeepseekV2DecoderLayer: first_k_dense_replace,
        moe_layer_freq, n_routed_experts, q_lora_rank (``is not None`` -> q LoRA, so a
        model without q LoRA must say null, not 0), kv_lora_rank, qk_*/v_head_dim,
        max_position_embeddings, rms_norm_eps, rope_parameters.
      * SGLang (sgl-project/sglang, python/sglang/srt/models/deepseek_v2.py, MoEGate):
        the bias exists only when topk_method == "noaux_tc", and then
        python/sglang/srt/layers/moe/topk.py (biased_grouped_topk) scores with sigmoid
        whatever scoring_func says; without the bias it scores with softmax.
      * llama.cpp's converter (ggml-org/llama.cpp, conversion/deepseek.py
        DeepseekV2Model.set_gguf_parameters, formerly in convert_hf_to_gguf.py;
        conversion/base.py TextModel.set_gguf_parameters): scoring_func -> expert gating
        func (when absent the deepseek2 loader falls back to SOFTMAX), n_group,
        topk_group, num_experts_per_tok, n_routed_experts, n_shared_experts,
        moe_intermediate_size, first_k_dense_replace, routed_scaling_factor,
        norm_topk_prob (written only when true), kv_lora_rank, qk_*/v_head_dim,
        rms_norm_eps, rope theta, tie_word_embeddings; q_lora_rank is written only when
        not null, and the deepseek2 loader (src/llama-model.cpp) then requires
        ``deepseek2.attention.q_lora_rank`` unless the model has 26 or 27 layers: a
        model without q LoRA (q_lora_rank null) of any other depth is refused by
        llama.cpp; no value of the key fixes that without breaking transformers and vLLM.
        The correction bias is used whenever the tensor is present.
    """
    m, a, e = cfg.model, cfg.attention, cfg.moe
    if a.kind != "mla":
        raise ConfigError(f"attention.kind={a.kind}: the DeepSeek-V3 format only expresses MLA attention")
    dense_only = e.n_routed_experts == 0
    if not dense_only and e.n_shared_experts == 0:
        raise ConfigError("moe.n_shared_experts=0: the DeepSeek-V3 format needs at least one shared expert")
    for name, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is None:
            continue
        assert m.vocab_size is not None, f"{name}: model.vocab_size must be set to check token ids"
        if not 0 <= value < m.vocab_size:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {m.vocab_size})")
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
        # a dense-only model declares one placeholder expert that no layer uses
        # (first_k_dense_replace = every layer, the MTP layers included: engines build
        # layer i as MoE when i >= first_k_dense_replace)
        "n_shared_experts": e.n_shared_experts if not dense_only else 1,
        "n_routed_experts": e.n_routed_experts if not dense_only else 1,
        "num_experts_per_tok": e.top_k if not dense_only else 1,
        "first_k_dense_replace": m.n_layers + m.mtp_depth if dense_only else e.first_k_dense_replace,
        "moe_layer_freq": 1,
        "scoring_func": e.scoring,
        "topk_method": _topk_method(cfg, routing_bias),
        "n_group": e.n_group,
        "topk_group": e.topk_group,
        "norm_topk_prob": e.norm_topk_prob,
        "routed_scaling_factor": e.routed_scaling_factor,
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank or None,  # null: W_q h directly (q_proj), see above
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_interleave": True,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # the MTP modules, read by vLLM and SGLang for speculative decoding (transformers
        # ignores the key and the layers past num_hidden_layers)
        "num_nextn_predict_layers": m.mtp_depth,
        "torch_dtype": m.param_dtype,  # older readers; transformers >= 4.56 reads dtype
        "dtype": m.param_dtype,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def _topk_method(cfg: Config, routing_bias: bool) -> str:
    """noaux_tc, except a softmax router whose bias is 0: DeepSeek-V2's greedy.

    sigmoid + bias is DeepSeek-V3's noaux_tc.  For softmax, noaux_tc is still the exact
    description (vLLM and llama.cpp apply the bias to softmax scores), but SGLang applies
    sigmoid whenever it sees noaux_tc; with a zero bias (and mlalm allows no groups with
    softmax) the routing is plain top-k of softmax, which every engine reads the same.
    """
    e = cfg.moe
    if e.scoring == "softmax" and not routing_bias and e.n_group == 1:
        return "greedy"
    return "noaux_tc"


# ---------------------------------------------------------------------------------------
# Weight mapping: one table drives both directions
# ---------------------------------------------------------------------------------------


def _rope_perm(P: int) -> np.ndarray:
    """half-layout index j <- interleaved index perm[j]: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return np.concatenate([np.arange(0, P, 2), np.arange(1, P, 2)])


def _mapping(cfg: Config, interleave: bool, *, routing_bias: bool = True):
    """Yield (module path, attribute, to_hf(array) -> {key: array}, from_hf(get) -> array,
    hf_shapes(has) -> {key: shape}).

    Shapes: HF Linear weights are [out, in]; mlalm keeps [in, ...out] for einsums.
    ``hf_shapes`` gives the shape config.json implies for each file tensor the entry
    reads, from the config alone (``has(key)`` tells which expert layout the file uses),
    so that shapes can be checked before the model is allocated.  With
    ``routing_bias=False`` the correction bias is neither written nor read (zeros).
    """
    m, a = cfg.model, cfg.attention
    D, V = m.d_model, m.vocab_size
    N, dn, P, dv, R = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    Q = a.q_lora_rank
    perm = _rope_perm(P) if interleave else np.arange(P)
    inv = np.argsort(perm)
    # a head's qk features: nope (kept) then rope (permuted)
    q_in = np.concatenate([np.arange(dn), dn + perm])  # mlalm feature j <- hf feature q_in[j]
    q_out = np.concatenate([np.arange(dn), dn + inv])  # hf feature j <- mlalm feature q_out[j]
    kva_in = np.concatenate([np.arange(R), R + perm])
    kva_out = np.concatenate([np.arange(R), R + inv])

    def fixed(key, shape):
        return lambda has: {key: tuple(shape)}

    def linear(key, hf_shape, out_shape=None, rows_in=None, rows_out=None):
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

        return to_hf, from_hf, fixed(key, hf_shape)

    def out_proj(key, in_shape):  # mlalm [*in, D] <-> hf [D, prod(in)]
        return (
            lambda w: {key: np.asarray(w).reshape(-1, D).T},
            lambda get: get(key).T.reshape(in_shape + (D,)),
            fixed(key, (D, int(np.prod(in_shape)))),
        )

    def same(key, shape):
        return (lambda w: {key: np.asarray(w)}), (lambda get: get(key)), fixed(key, shape)

    def layer(i, blk):
        """The keys of decoder layer i, read into the Block at module path ``blk``."""
        p = f"model.layers.{i}."
        yield blk + ("attn_norm",), "scale", *same(p + "input_layernorm.weight", (D,))
        yield blk + ("ffn_norm",), "scale", *same(p + "post_attention_layernorm.weight", (D,))
        at = blk + ("attn",)
        if Q:
            yield at, "wq_a_DQ", *linear(p + "self_attn.q_a_proj.weight", (Q, D))
            yield at + ("q_norm",), "scale", *same(p + "self_attn.q_a_layernorm.weight", (Q,))
            yield (
                at,
                "wq_b_QNH",
                *linear(p + "self_attn.q_b_proj.weight", (N * (dn + P), Q), (N, dn + P), q_in, q_out),
            )
        else:
            yield (
                at,
                "wq_DNH",
                *linear(p + "self_attn.q_proj.weight", (N * (dn + P), D), (N, dn + P), q_in, q_out),
            )
        yield (
            at,
            "wkv_a_DJ",
            *linear(p + "self_attn.kv_a_proj_with_mqa.weight", (R + P, D), None, kva_in, kva_out),
        )
        yield at + ("kv_norm",), "scale", *same(p + "self_attn.kv_a_layernorm.weight", (R,))
        yield at, "wkv_b_RNU", *linear(p + "self_attn.kv_b_proj.weight", (N * (dn + dv), R), (N, dn + dv))
        yield at, "wo_NGD", *out_proj(p + "self_attn.o_proj.weight", (N, dv))
        ff = blk + ("ffn",)
        if cfg.is_moe_layer(i):
            e = cfg.moe
            E, F = e.n_routed_experts, e.expert_ffn_dim
            yield ff, "w_router_DE", *linear(p + "mlp.gate.weight", (E, D))
            bias_key = p + "mlp.gate.e_score_correction_bias"
            if routing_bias:
                yield ff, "bias_E", *same(bias_key, (E,))
            else:
                yield (ff, "bias_E", lambda w: {}, lambda get: np.zeros((E,), np.float32), lambda has: {})
            yield from _expert_entries(ff, p + "mlp.experts.", E, D, F)
            if e.n_shared_experts:
                yield from _swiglu_entries(
                    ff + ("shared",), p + "mlp.shared_experts.", F * e.n_shared_experts, D, linear, out_proj
                )
        else:
            yield from _swiglu_entries(ff, p + "mlp.", m.ffn_dim, D, linear, out_proj)

    yield ("",), "embed_VD", *same("model.embed_tokens.weight", (V, D))
    yield ("final_norm",), "scale", *same("model.norm.weight", (D,))
    if not m.tie_embeddings:
        yield ("",), "head_DV", *linear("lm_head.weight", (V, D))
    for i in range(m.n_layers):
        yield from layer(i, ("blocks", i))
    # MTP depth k is decoder layer n_layers + k - 1 with its own enorm, hnorm and eh_proj
    # (and copies of the shared tensors: _mtp_copies), as in DeepSeek-V3's checkpoints
    for k in range(m.mtp_depth):
        p, mod = f"model.layers.{m.n_layers + k}.", ("mtp", k)
        yield mod + ("enorm",), "scale", *same(p + "enorm.weight", (D,))
        yield mod + ("hnorm",), "scale", *same(p + "hnorm.weight", (D,))
        # eh_proj is Linear(2D, D) applied to cat([enorm(emb), hnorm(h)]): its input
        # columns are the embedding half, then the hidden half -- mlalm's [2, D_in, D_out]
        # (see _mtp_copies for the references)
        key = p + "eh_proj.weight"
        yield (
            mod,
            "eh_proj_2DD",
            lambda w, key=key: {key: np.asarray(w).reshape(2 * D, D).T},
            lambda get, key=key: get(key).T.reshape(2, D, D),
            fixed(key, (D, 2 * D)),
        )
        yield from layer(m.n_layers + k, mod + ("block",))


def _mtp_copies(cfg: Config):
    """Yield (key, module path, attribute, to_hf(array) -> array) for the tensors an MTP
    layer of a DeepSeek-V3 checkpoint carries although they are the main model's:
    ``embed_tokens``, ``shared_head.norm`` (the final norm) and ``shared_head.head`` (the
    LM head), written as copies and on reading required to equal the main tensors.

    Checked against vLLM (vllm-project/vllm, vllm/model_executor/models/deepseek_mtp.py:
    layers num_hidden_layers .. + num_nextn_predict_layers - 1 holding enorm, hnorm,
    eh_proj = Linear(2 * hidden, hidden) applied to ``torch.cat([enorm(embeds),
    hnorm(previous_hidden_states)])``, shared_head.norm and shared_head.head, embed_tokens,
    the decoder layer's usual keys) and SGLang (sgl-project/sglang,
    python/sglang/srt/models/deepseek_nextn.py: ``eh_proj(torch.cat((enorm(embeds),
    hnorm(hidden_states))))``, logits from shared_head.norm then the head).
    """
    m = cfg.model
    for k in range(m.mtp_depth):
        p = f"model.layers.{m.n_layers + k}."
        yield p + "embed_tokens.weight", ("",), "embed_VD", np.asarray
        yield p + "shared_head.norm.weight", ("final_norm",), "scale", np.asarray
        if m.tie_embeddings:
            yield p + "shared_head.head.weight", ("",), "embed_VD", np.asarray
        else:
            yield p + "shared_head.head.weight", ("",), "head_DV", lambda w: np.asarray(w).T


def _swiglu_entries(path, prefix, F, D, linear, out_proj):
    yield path, "w_gate_DF", *linear(prefix + "gate_proj.weight", (F, D))
    yield path, "w_up_DF", *linear(prefix + "up_proj.weight", (F, D))
    down_to, _, down_shapes = out_proj(prefix + "down_proj.weight", (F,))
    yield path, "w_down_FD", down_to, lambda get: get(prefix + "down_proj.weight").T, down_shapes


def _expert_entries(path, prefix, E, D, F):
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
            F_ = gate_up.shape[1] // 2
            part = gate_up[:, :F_] if name == "gate_proj" else gate_up[:, F_:]
            return np.swapaxes(part, 1, 2)

        return f

    def shapes(name):
        per_expert = (D, F) if name == "down_proj" else (F, D)

        def f(has):
            if has(f"{prefix}0.{name}.weight"):
                return {f"{prefix}{e}.{name}.weight": per_expert for e in range(E)}
            if name == "down_proj":
                return {prefix + "down_proj": (E, D, F)}
            return {prefix + "gate_up_proj": (E, 2 * F, D)}

        return f

    yield path, "w_gate_EDF", to_hf("gate_proj"), from_hf("gate_proj"), shapes("gate_proj")
    yield path, "w_up_EDF", to_hf("up_proj"), from_hf("up_proj"), shapes("up_proj")
    yield path, "w_down_EFD", to_hf("down_proj"), from_hf("down_proj"), shapes("down_proj")


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
        self.path = path
        self.key_file = {}
        self.handles = {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise CheckpointError(f"{path}: shard {fname} named in the index is missing")
            try:
                h = safe_open(full, framework="numpy")
            except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
                raise CheckpointError(f"{full}: not a readable safetensors file ({e})") from None
            self.handles[fname] = h
            for k in h.keys():
                self.key_file[k] = fname
        self.used = set()

    def has(self, key):
        return key in self.key_file

    def shape(self, key) -> tuple:
        """The tensor's shape from its file's header (no data is read)."""
        if key not in self.key_file:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor '{key}'")
        return tuple(self.handles[self.key_file[key]].get_slice(key).get_shape())

    def __call__(self, key):
        if key not in self.key_file:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor '{key}'")
        self.used.add(key)
        return self.handles[self.key_file[key]].get_tensor(key)


def _expected_shapes(tensors: _Tensors, cfg: Config, interleave: bool, routing_bias: bool) -> dict:
    """{key: shape} of every tensor ``cfg`` reads (the MTP layers' copies included)."""
    m = cfg.model
    shapes = {}
    for *_, hf_shapes in _mapping(cfg, interleave, routing_bias=routing_bias):
        shapes.update(hf_shapes(tensors.has))
    for key, *_ in _mtp_copies(cfg):
        shapes[key] = (m.d_model,) if key.endswith("shared_head.norm.weight") else (m.vocab_size, m.d_model)
    return shapes


def check_shapes(
    tensors: _Tensors, cfg: Config, *, interleave: bool = True, routing_bias: bool = True
) -> None:
    """CheckpointError naming the first tensor whose header shape is not the one ``cfg``
    implies (or that is missing); reads the safetensors headers only."""
    for key, expected in _expected_shapes(tensors, cfg, interleave, routing_bias).items():
        found = tensors.shape(key)
        if found != tuple(expected):
            raise CheckpointError(
                f"{tensors.path}: tensor '{key}' has shape {list(found)} in "
                f"{tensors.key_file[key]}, config.json implies {list(expected)}"
            )


def from_pretrained(path: str, *, base: Config | None = None, dtype: str | None = None, mtp: bool = True):
    """Load a transformers DeepSeek-V3 directory into an mlalm model.

    Every tensor shape is checked against config.json (from the safetensors headers)
    before the model is built.

    Args:
        path: directory with config.json and *.safetensors.
        base: optional Config whose non-model sections (train, optim, ...) are kept.
        dtype: parameter dtype ('float32' or 'bfloat16'); default the file's or float32.
        mtp: read the ``num_nextn_predict_layers`` MTP layers (model.mtp_depth); False
            loads the main model only.  Files that declare MTP layers but hold no tensor
            of them (what transformers saves, and many published DeepSeek-V3 derivatives)
            load as the main model; a partly present MTP layer is a CheckpointError
            naming the missing tensor.  The copies an MTP layer carries of the
            embedding, final norm and head must equal the main model's (mlalm shares
            them), else CheckpointError.

    Returns:
        (model, cfg)
    """
    from mlalm.model import Transformer

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (is this a transformers checkpoint directory?)")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    tensors = _Tensors(path)
    depth = (hf_cfg.get("num_nextn_predict_layers") or 0) if mtp else 0
    prefix = f"model.layers.{hf_cfg.get('num_hidden_layers', 0)}."
    if depth and not any(k.startswith(prefix) for k in tensors.key_file):
        depth = 0  # declared but not saved (transformers writes no MTP layer): the main model
    cfg = config_from_hf(hf_cfg, base, mtp_depth=depth)
    file_dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    pd = dtype or ("bfloat16" if file_dtype == "bfloat16" else "float32")
    cfg = replace(cfg, model=replace(cfg.model, param_dtype=pd))
    interleave = bool(hf_cfg.get("rope_interleave", True))
    # greedy routing has no correction bias: a file written so carries none (zeros)
    routing_bias = (hf_cfg.get("topk_method") or "noaux_tc") == "noaux_tc"
    check_shapes(tensors, cfg, interleave=interleave, routing_bias=routing_bias)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for mpath, attr, _, from_hf, _ in _mapping(cfg, interleave, routing_bias=routing_bias):
        var = getattr(_module_at(model, mpath), attr)
        value = np.asarray(from_hf(tensors), dtype=np.float32)
        if value.shape != var[...].shape:
            raise CheckpointError(
                f"{path}: tensor for {'.'.join(map(str, mpath))}.{attr} has shape "
                f"{value.shape}, the config implies {var[...].shape}"
            )
        var.set_value(jnp.asarray(value, dtype=var[...].dtype))
    for key, mpath, attr, to_hf in _mtp_copies(cfg):
        main = to_hf(np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32))
        if not np.array_equal(np.asarray(tensors(key), dtype=np.float32), main):
            raise CheckpointError(
                f"{path}: tensor '{key}' differs from the main model's {attr} "
                f"({'.'.join(p for p in mpath if p) or 'model'}): mlalm's MTP modules share the "
                f"embedding, final norm and head with the main model; load with mtp=False to "
                f"read the main model only"
            )
    return model, cfg


def _file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file: 0o666 minus the process umask."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def save_pretrained(
    model,
    cfg: Config,
    path: str,
    *,
    dtype: str | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write config.json + model.safetensors (+ generation_config.json) for transformers'
    DeepseekV3ForCausalLM and serving engines.

    Args:
        dtype: 'float32' or 'bfloat16' for the weights (default the model's param_dtype).
        eos_token_id: the end-of-text id (mlalm tokenizers: ``tokenizer.eos_id``), so that
            transformers' ``generate`` and serving engines stop there.
        bos_token_id, pad_token_id: written when given (mlalm tokenizers have neither).

    The token ids go to config.json and, when any is given, to generation_config.json,
    which transformers' ``from_pretrained`` loads as the model's generation defaults and
    vLLM reads for its stop tokens.  Files get the permissions ``open()`` would give
    (0o666 minus the umask).  A softmax-routed model is written with
    ``scoring_func: softmax`` (see :func:`config_to_hf`), which transformers' DeepSeek-V3
    ignores: a UserWarning says so.
    """
    from safetensors.numpy import save_file

    routing_bias = any(bool(np.any(np.asarray(moe.bias_E[...]) != 0)) for moe in model.moe_layers())
    hf_cfg = config_to_hf(
        cfg,
        routing_bias=routing_bias,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )  # raises before writing
    if cfg.moe.n_routed_experts and cfg.moe.scoring == "softmax":
        extra = (
            " SGLang applies sigmoid whenever topk_method=noaux_tc (this model has a non-zero routing bias)."
            if hf_cfg["topk_method"] == "noaux_tc"
            else ""
        )
        warnings.warn(
            "moe.scoring=softmax: config.json says scoring_func=softmax, which vLLM, SGLang "
            "and llama.cpp read, but transformers' DeepseekV3ForCausalLM always routes with "
            "sigmoid and will not reproduce this model." + extra,
            UserWarning,
            stacklevel=2,
        )
    np_dtype = np.float32
    if (dtype or cfg.model.param_dtype) == "bfloat16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "bfloat16"
    else:
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "float32"
    tensors = {}
    # noaux_tc readers create the bias parameter and need the tensor, zero or not
    write_bias = hf_cfg["topk_method"] == "noaux_tc"
    for mpath, attr, to_hf, _, _ in _mapping(cfg, interleave=True, routing_bias=write_bias):
        value = np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32)
        for k, v in to_hf(value).items():
            keep32 = k.endswith("e_score_correction_bias")  # transformers keeps it in float32
            tensors[k] = np.ascontiguousarray(v.astype(np.float32 if keep32 else np_dtype))
    for k, mpath, attr, to_hf in _mtp_copies(cfg):
        value = np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32)
        tensors[k] = np.ascontiguousarray(to_hf(value).astype(np_dtype))
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, _file_mode())  # safetensors creates its file 0o600
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    ids = {
        k: v
        for k, v in (
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
            ("pad_token_id", pad_token_id),
        )
        if v is not None
    }
    if ids:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(ids, f, indent=2)
