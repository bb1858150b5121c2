"""The DeepSeek-V3 tensor table: one entry per mlalm parameter, read in both directions
(``mlalm.hf.io``), with the shapes config.json implies."""

from __future__ import annotations

import numpy as np

from mlalm.config import Config


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
