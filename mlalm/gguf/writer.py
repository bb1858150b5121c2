"""mlalm's MLA model as llama.cpp's ``deepseek2`` GGUF (sources: see :mod:`mlalm.gguf`).

What llama.cpp computes with the file, and why each key and tensor is written as it is:

* Attention (src/models/deepseek2.cpp, the ``is_mla`` path).  ``key_length_mla`` =
  d_n + d_r and ``value_length_mla`` = d_v switch on MLA with weight absorption; the
  per-head up-projection W_kvb is then stored split, as the converter splits
  ``kv_b_proj``: ``attn_k_b`` [N, R, d_n] (W_UK, transposed per head) and ``attn_v_b``
  [N, d_v, R] (W_UV).  The cache is MQA-like, so ``head_count_kv`` = 1, ``key_length`` =
  R + d_r and ``value_length`` = R, as the converter writes.  Scale (d_n + d_r)^-1/2.
* ``q_lora_rank`` is always written: the loader requires the key unless the model has 26
  or 27 layers (DeepSeek-V2-Lite), and 0 selects the plain ``attn_q`` projection.
* RoPE: deepseek2 uses ggml's NORM rope, rotating adjacent pairs (2i, 2i+1) by
  pos·θ^(-2i/d_r).  mlalm rotates the pairs (i, i + d_r/2) by the same angle, so the rope
  rows of W_q and W_kva are written interleaved: GGUF feature 2i = mlalm feature i,
  2i+1 = mlalm feature i + d_r/2.  Every q·k product is unchanged.
* MoE (src/llama-graph.cpp, build_moe_ffn): s = gating(x W_g) with ``expert_gating_func``
  (1 softmax, 2 sigmoid; absent means softmax for deepseek2), experts chosen by
  s + ``exp_probs_b`` (the balancing bias, always written, zero or not), optionally within
  the ``expert_group_used_count`` best of ``expert_group_count`` groups scored by the
  sum of their two best s + b, weights = the unbiased s, divided by their sum when
  ``expert_weights_norm``, times ``expert_weights_scale``: :func:`mlalm.model.moe.route`
  exactly.  The one difference: llama.cpp clamps that sum below at 6.1e-5 (the smallest
  normal float16), mlalm adds 1e-20; they differ only when the chosen scores sum to less
  than 6.1e-5.  llama.cpp requires group_used < group_count, so ``topk_group ==
  n_group`` (which keeps every group: plain top-k) is written as no groups.
* Routed experts are stacked [E, F, D] (``ffn_gate_exps``, ``ffn_up_exps``) and
  [E, D, F] (``ffn_down_exps``); the shared experts are one SwiGLU of width F·n_shared.
* Dense-only models: ``leading_dense_block_count`` = every layer, no expert keys.
* Multi-token-prediction modules, when a model has them, are not written: they only
  draft tokens, the main model's output does not depend on them, and llama.cpp's
  converter drops DeepSeek-V3's likewise (DeepseekV2Model.skip_mtp).
* Quantised files (f16, bf16, q8_0) keep 1-D tensors, norms, the router
  (``ffn_gate_inp``) and the bias in float32, and fall back to f16 for a q8_0 tensor
  whose rows are not a multiple of 32, as the converter does.

numpy shapes are written; GGUF lists dimensions innermost first, so a numpy [out, in]
matrix is ggml's {in, out}.
"""

from __future__ import annotations

import os

import numpy as np

from mlalm.config import Config
from mlalm.errors import ConfigError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "deepseek2"


def require_gguf():
    """The ``gguf`` module, or a one-line ConfigError naming the extra to install."""
    try:
        import gguf
    except ImportError:
        raise ConfigError('GGUF export needs the gguf package: pip install -e ".[gguf]"') from None
    return gguf


def check_exportable(cfg: Config, dtype: str = "f32") -> None:
    """ConfigError (one line) unless llama.cpp's deepseek2 architecture can express ``cfg``."""
    a, e = cfg.attention, cfg.moe
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype {dtype!r} is not supported (valid: {', '.join(GGUF_DTYPES)})")
    if a.kind != "mla":
        raise ConfigError(
            f"GGUF export writes llama.cpp's deepseek2 architecture, which needs attention.kind=mla; "
            f"this model uses attention.kind={a.kind} (use --format params)"
        )
    if e.n_routed_experts and e.n_shared_experts == 0:
        raise ConfigError(
            "moe.n_shared_experts=0: llama.cpp's deepseek2 architecture needs at least one shared "
            "expert (blk.N.ffn_*_shexp)"
        )
    if not a.kv_latent_norm:
        raise ConfigError(
            "attention.kv_latent_norm=false: llama.cpp's deepseek2 always normalises the latent "
            "(attn_kv_a_norm, an RMSNorm no weight turns into the identity); keep this model as a "
            "params export (scripts/export.py --format params)"
        )


def _interleave_rope(P: int) -> np.ndarray:
    """GGUF rope feature k <- mlalm feature index[k]: [0, P/2, 1, P/2 + 1, ...]."""
    h = P // 2
    return np.stack([np.arange(h), h + np.arange(h)], axis=1).reshape(-1)


def _np(var) -> np.ndarray:
    return np.asarray(var[...], dtype=np.float32)


def gguf_tensors(model, cfg: Config):
    """Yield (GGUF name, float32 numpy array in GGUF's layout, keep_float32)."""
    m, a = cfg.model, cfg.attention
    N, dn, P, dv, R = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    D = m.d_model
    rope = _interleave_rope(P)
    q_cols = np.concatenate([np.arange(dn), dn + rope])  # a head's nope features, then rope
    kva_cols = np.concatenate([np.arange(R), R + rope])

    def q_proj(w_INH):  # [in, N, dn + P] -> [N·(dn + P), in], rope rows interleaved
        w = w_INH[..., q_cols]
        return w.reshape(w.shape[0], -1).T

    yield "token_embd.weight", _np(model.embed_VD), False
    yield "output_norm.weight", _np(model.final_norm.scale), True
    if not m.tie_embeddings:  # tied: llama.cpp reuses token_embd (no output.weight)
        yield "output.weight", _np(model.head_DV).T, False
    for i, block in enumerate(model.blocks):
        p, at = f"blk.{i}.", block.attn
        yield p + "attn_norm.weight", _np(block.attn_norm.scale), True
        if a.q_lora_rank:
            yield p + "attn_q_a.weight", _np(at.wq_a_DQ).T, False
            yield p + "attn_q_a_norm.weight", _np(at.q_norm.scale), True
            yield p + "attn_q_b.weight", q_proj(_np(at.wq_b_QNH)), False
        else:
            yield p + "attn_q.weight", q_proj(_np(at.wq_DNH)), False
        yield p + "attn_kv_a_mqa.weight", _np(at.wkv_a_DJ)[:, kva_cols].T, False
        yield p + "attn_kv_a_norm.weight", _np(at.kv_norm.scale), True
        w_kvb = _np(at.wkv_b_RNU)  # [R, N, dn + dv]
        yield p + "attn_k_b.weight", np.transpose(w_kvb[..., :dn], (1, 0, 2)), False  # [N, R, dn]
        yield p + "attn_v_b.weight", np.transpose(w_kvb[..., dn:], (1, 2, 0)), False  # [N, dv, R]
        yield p + "attn_output.weight", _np(at.wo_NGD).reshape(N * dv, D).T, False
        yield p + "ffn_norm.weight", _np(block.ffn_norm.scale), True
        ff = block.ffn
        if block.is_moe:
            yield p + "ffn_gate_inp.weight", _np(ff.w_router_DE).T, True
            yield p + "exp_probs_b.bias", _np(ff.bias_E), True
            yield p + "ffn_gate_exps.weight", np.swapaxes(_np(ff.w_gate_EDF), 1, 2), False
            yield p + "ffn_up_exps.weight", np.swapaxes(_np(ff.w_up_EDF), 1, 2), False
            yield p + "ffn_down_exps.weight", np.swapaxes(_np(ff.w_down_EFD), 1, 2), False
            sh, suffix = ff.shared, "_shexp"
        else:
            sh, suffix = ff, ""
        yield p + f"ffn_gate{suffix}.weight", _np(sh.w_gate_DF).T, False
        yield p + f"ffn_up{suffix}.weight", _np(sh.w_up_DF).T, False
        yield p + f"ffn_down{suffix}.weight", _np(sh.w_down_FD).T, False


def _add_hparams(w, gguf, cfg: Config, *, vocab_size: int, name: str, ftype) -> None:
    m, a, e = cfg.model, cfg.attention, cfg.moe
    moe = e.n_routed_experts > 0
    w.add_name(name)
    w.add_file_type(ftype)
    if ftype != gguf.LlamaFileType.ALL_F32:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(m.n_layers)
    w.add_context_length(m.max_seq_len)
    w.add_embedding_length(m.d_model)
    w.add_feed_forward_length(m.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(m.rope_theta)
    w.add_rope_dimension_count(a.qk_rope_head_dim)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(vocab_size)
    w.add_q_lora_rank(a.q_lora_rank)
    w.add_kv_lora_rank(a.kv_lora_rank)
    w.add_key_length(a.kv_lora_rank + a.qk_rope_head_dim)
    w.add_value_length(a.kv_lora_rank)
    w.add_key_length_mla(a.qk_nope_head_dim + a.qk_rope_head_dim)
    w.add_value_length_mla(a.v_head_dim)
    w.add_leading_dense_block_count(e.first_k_dense_replace if moe else m.n_layers)
    # required by the loader even without MoE layers (the converter writes the dense width)
    w.add_expert_feed_forward_length(e.expert_ffn_dim if moe else m.ffn_dim)
    w.add_expert_shared_count(e.n_shared_experts if moe else 0)
    if moe:
        w.add_expert_count(e.n_routed_experts)
        w.add_expert_used_count(e.top_k)
        gating = gguf.ExpertGatingFuncType
        w.add_expert_gating_func(gating.SIGMOID if e.scoring == "sigmoid" else gating.SOFTMAX)
        w.add_expert_weights_norm(e.norm_topk_prob)
        w.add_expert_weights_scale(e.routed_scaling_factor)
        if e.n_group > 1 and e.topk_group < e.n_group:
            w.add_expert_group_count(e.n_group)
            w.add_expert_group_used_count(e.topk_group)


def write_gguf(model, cfg: Config, tokenizer, path: str, *, dtype: str = "f32", name: str = "mlalm") -> str:
    """Write ``model`` (an MLA :class:`mlalm.model.Transformer`) with ``tokenizer`` to the
    GGUF file ``path`` in ``dtype`` (f32, f16, bf16 or q8_0; see the module docstring for
    which tensors stay float32).  The file appears whole or not at all.

    Raises:
        ConfigError: a model, tokenizer or dtype the format cannot express, or no ``gguf``.
    """
    gguf = require_gguf()
    check_exportable(cfg, dtype)
    from mlalm.gguf.vocab import gguf_vocab

    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    vocab = gguf_vocab(tokenizer, vocab_size)  # raises before anything is written
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    F = gguf.LlamaFileType
    ftype = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]
    tmp = f"{path}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_hparams(w, gguf, cfg, vocab_size=vocab_size, name=name, ftype=ftype)
        vocab.add_to(w)
        for tname, data, keep32 in gguf_tensors(model, cfg):
            t = Q.F32 if keep32 else qtype
            try:
                q = gguf.quants.quantize(np.ascontiguousarray(data), t)
            except gguf.QuantError:  # q8_0 needs rows of a multiple of 32 values
                t = Q.F16
                q = gguf.quants.quantize(np.ascontiguousarray(data), t)
            w.add_tensor(tname, q, raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
