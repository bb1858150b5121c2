"""mlalm.model against independent numpy references (float64, per-head / per-token loops).

Nothing here is compared against another output of the code under test: every expected
value is computed from the formulas in docs/architecture.md ("MLA", "DeepSeekMoE") with
the module's own weights.  Errors are ``tests/numerics.err`` (sound where a reference
vanishes).
Models are tiny (d_model 32, <= 3 layers, vocab 50, T <= 12) to keep the file fast on CPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlalm.config import from_dict
from mlalm.model import Transformer, count_params, kv_cache_bytes_per_token_per_layer
from mlalm.model.attention import make_attention
from mlalm.model.layers import BalanceBias, rope_tables
from mlalm.model.loss import lm_head_cross_entropy
from mlalm.model.moe import (
    balance_bias_update,
    block_size,
    dispatch_blocked,
    dispatch_capacity,
    dispatch_dropless,
    dispatch_ragged,
    resolve_dispatch,
    route,
    sequence_balance_loss,
)
from numerics import assert_close, float64_ops

V, D = 50, 32
EPS = 1e-6
THETA = 500.0  # not the default, so a hard-coded theta would show
ATTN = {
    "mha": dict(kind="mha", n_heads=4, head_dim=8),
    "gqa": dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=8),
    "mqa": dict(kind="mqa", n_heads=4, head_dim=8),
    # qk width 8 + 4 = 12 differs from the value width 6
    "mla": dict(
        kind="mla",
        n_heads=4,
        q_lora_rank=0,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    ),
    "mla_qlora": dict(
        kind="mla",
        n_heads=4,
        q_lora_rank=12,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    ),
}
MOE = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_ffn_dim=16, dispatch="dropless")


def make_cfg(attn="mla", moe=None, n_layers=2, **model):
    m = dict(
        vocab_size=V,
        d_model=D,
        n_layers=n_layers,
        ffn_dim=64,
        max_seq_len=32,
        init_std=0.1,
        rope_theta=THETA,
        norm_eps=EPS,
    )
    m.update(model)
    return from_dict(
        {
            "model": m,
            "attention": ATTN[attn] if isinstance(attn, str) else attn,
            "moe": MOE if moe is None else moe,
            "train": {"seq_len": 16},
        }
    )


def fill(module, seed, std=0.1, bias_std=0.0):
    """Give every Variable a numpy-random value: weights N(0, std), norm scales
    1 + N(0, 0.3) (so a missing scale would show), balancing biases N(0, bias_std)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if not isinstance(var, nnx.Variable):
            continue
        if isinstance(var, BalanceBias):
            v = bias_std * rng.standard_normal(var.shape)
        elif path[-1] == "scale":
            v = 1.0 + 0.3 * rng.standard_normal(var.shape)
        else:
            v = std * rng.standard_normal(var.shape)
        var.set_value(jnp.asarray(v, var.dtype))
    return module


def build(cfg, seed=0, **kw):
    """Transformer(cfg, rngs=...) traced abstractly (its random init would compile one
    XLA program per parameter shape: seconds per config on CPU), then filled from numpy.
    The library's own initialiser is exercised once, in test_library_init."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    return fill(model, seed, **kw)


def build_attention(cfg, seed=0):
    return fill(nnx.eval_shape(lambda: make_attention(cfg, rngs=nnx.Rngs(seed))), seed)


_call_attn = nnx.jit(lambda module, x, cos, sin: module(x, cos, sin)[0])
_route = jax.jit(
    route,
    static_argnames=("top_k", "scoring", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"),
)
_dropless = jax.jit(dispatch_dropless)
_ragged = jax.jit(dispatch_ragged)
_blocked = jax.jit(dispatch_blocked, static_argnames=("block",))
_capacity = jax.jit(dispatch_capacity, static_argnames=("capacity",))
_forward = nnx.jit(lambda model, tokens: model(tokens, return_aux=True))


def forward(model, tokens):
    logits, aux = _forward(model, jnp.asarray(tokens, jnp.int32))
    return np.asarray(logits), jax.tree.map(np.asarray, aux)


def f64(v):
    """A Variable (or array) as a float64 numpy array."""
    if isinstance(v, nnx.Variable):
        v = v[...]
    return np.asarray(jnp.asarray(v, jnp.float32), np.float64)


def close(got, want, rtol=1e-5, scale=0.0):
    """err(got, want, scale) <= rtol (tests/numerics.py): max|got - want| relative to
    max(max|want|, scale).  Without a floor where the compared array as a whole cannot
    vanish (logits, attention outputs, router scores, expert outputs); a reference that
    did would read as an infinite error, never as a pass."""
    assert_close(got, want, rtol=rtol, scale=scale)


# ---------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------


def rms_np(x, scale, eps=EPS):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_np(x, pos, theta=THETA):
    """'half' layout: pair (i, i + P/2) rotated by pos * theta^(-2i/P).  x [T, ..., P]."""
    P = x.shape[-1]
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        for i in range(P // 2):
            a = pos[t] * theta ** (-2.0 * i / P)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[t, ..., i], x[t, ..., i + P // 2]
            out[t, ..., i] = x1 * c - x2 * s
            out[t, ..., i + P // 2] = x2 * c + x1 * s
    return out


def causal_softmax_attn_np(q_TH, k_SH, v_SG, scale):
    T = q_TH.shape[0]
    out = np.zeros((T, v_SG.shape[1]))
    for t in range(T):
        s = (k_SH[: t + 1] @ q_TH[t]) * scale
        p = np.exp(s - s.max())
        out[t] = (p / p.sum()) @ v_SG[: t + 1]
    return out


def silu_np(x):
    return x / (1.0 + np.exp(-x))


def swiglu_np(x, wg, wu, wd):
    return (silu_np(x @ wg) * (x @ wu)) @ wd


def mha_ref(attn, x_BTD, pos_BT, theta=THETA):
    """Per-head MHA/GQA/MQA: query head n reads kv head n // (N / K)."""
    wq, wk, wv, wo = (f64(attn.wq_DNH), f64(attn.wk_DKH), f64(attn.wv_DKG), f64(attn.wo_NGD))
    N, H, K = wq.shape[1], wq.shape[2], wk.shape[1]
    out = np.zeros(x_BTD.shape)
    for b in range(x_BTD.shape[0]):
        x = x_BTD[b]
        q = rope_np(np.einsum("td,dnh->tnh", x, wq), pos_BT[b], theta)
        k = rope_np(np.einsum("td,dkh->tkh", x, wk), pos_BT[b], theta)
        v = np.einsum("td,dkh->tkh", x, wv)
        for n in range(N):
            kv = n // (N // K)
            o = causal_softmax_attn_np(q[:, n], k[:, kv], v[:, kv], H**-0.5)
            out[b] += o @ wo[n]
    return out


def mla_ref(attn, x_BTD, pos_BT, theta=THETA):
    """MLA (docs/architecture.md, "MLA"): q (opt. LoRA), latent c = RMSNorm(.), one
    shared rope key."""
    dn, dr, dv, R, N = attn.dn, attn.dr, attn.dv, attn.R, attn.n_heads
    wkv_a, wkv_b, wo = f64(attn.wkv_a_DJ), f64(attn.wkv_b_RNU), f64(attn.wo_NGD)
    kv_scale = f64(attn.kv_norm.scale)
    assert wkv_a.shape == (x_BTD.shape[-1], R + dr) and wkv_b.shape == (R, N, dn + dv)
    out = np.zeros(x_BTD.shape)
    for b in range(x_BTD.shape[0]):
        x = x_BTD[b]
        if attn.q_lora:
            cq = rms_np(x @ f64(attn.wq_a_DQ), f64(attn.q_norm.scale))
            q = np.einsum("tq,qnh->tnh", cq, f64(attn.wq_b_QNH))
        else:
            q = np.einsum("td,dnh->tnh", x, f64(attn.wq_DNH))
        q_nope, q_pe = q[..., :dn], rope_np(q[..., dn:], pos_BT[b], theta)
        ckv = x @ wkv_a
        c = rms_np(ckv[:, :R], kv_scale)
        k_pe = rope_np(ckv[:, R:], pos_BT[b], theta)  # [T, dr], one for all heads
        for n in range(N):
            k_nope = c @ wkv_b[:, n, :dn]
            v = c @ wkv_b[:, n, dn:]
            qh = np.concatenate([q_nope[:, n], q_pe[:, n]], axis=-1)
            kh = np.concatenate([k_nope, k_pe], axis=-1)
            o = causal_softmax_attn_np(qh, kh, v, (dn + dr) ** -0.5)
            out[b] += o @ wo[n]
    return out


def route_np(
    x,
    w,
    bias,
    *,
    top_k,
    scoring="sigmoid",
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
):
    """Per-token router.  Returns chosen expert lists, their weights, scores, kept groups."""
    logits = x @ w
    if scoring == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    N, E = s.shape
    per = E // n_group
    chosen, weights, groups = [], [], []
    for n in range(N):
        c = s[n] + bias
        allowed = list(range(E))
        if n_group > 1:
            gscore = [sum(sorted(c[g * per : (g + 1) * per])[-2:]) for g in range(n_group)]
            keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
            allowed = [e for e in range(E) if e // per in keep]
            groups.append(set(keep))
        top = sorted(allowed, key=lambda e: -c[e])[:top_k]
        wt = np.array([s[n, e] for e in top])
        if norm_topk_prob:
            wt = wt / wt.sum()
        chosen.append(top)
        weights.append(wt * routed_scaling_factor)
    return chosen, weights, s, groups


def seq_balance_loss_np(s_BTE, idx_BTk, E):
    B, T, k = idx_BTk.shape
    total = 0.0
    for b in range(B):
        L = 0.0
        for i in range(E):
            count = sum(1 for t in range(T) if i in idx_BTk[b, t])
            f = E / (k * T) * count
            P = np.mean([s_BTE[b, t, i] / s_BTE[b, t].sum() for t in range(T)])
            L += f * P
        total += L
    return total / B


def moe_ref(moe, h_ND, route_kw):
    """Returns y (routed + shared), expert load and chosen experts."""
    wg, wu, wd = f64(moe.w_gate_EDF), f64(moe.w_up_EDF), f64(moe.w_down_EFD)
    chosen, weights, s, _ = route_np(h_ND, f64(moe.w_router_DE), f64(moe.bias_E), **route_kw)
    y = np.zeros_like(h_ND)
    load = np.zeros(wg.shape[0])
    for n in range(h_ND.shape[0]):
        for e, wt in zip(chosen[n], weights[n]):
            y[n] += wt * swiglu_np(h_ND[n], wg[e], wu[e], wd[e])
            load[e] += 1
    if moe.shared is not None:
        sh = moe.shared
        y += swiglu_np(h_ND, f64(sh.w_gate_DF), f64(sh.w_up_DF), f64(sh.w_down_FD))
    return y, load, np.array(chosen), s


def transformer_ref(model, tokens_BT):
    """The whole forward pass in float64: embed, pre-norm blocks, final norm, head."""
    cfg = model.cfg
    e = cfg.moe
    route_kw = dict(
        top_k=e.top_k,
        scoring=e.scoring,
        n_group=e.n_group,
        topk_group=e.topk_group,
        norm_topk_prob=e.norm_topk_prob,
        routed_scaling_factor=e.routed_scaling_factor,
    )
    B, T = tokens_BT.shape
    pos = np.broadcast_to(np.arange(T), (B, T))
    emb = f64(model.embed_VD)
    x = emb[tokens_BT]
    loads, balance = [], 0.0
    for layer, block in enumerate(model.blocks):
        h = rms_np(x, f64(block.attn_norm.scale), cfg.model.norm_eps)
        ref = mla_ref if cfg.attention.kind == "mla" else mha_ref
        x = x + ref(block.attn, h, pos, cfg.model.rope_theta)
        h = rms_np(x, f64(block.ffn_norm.scale), cfg.model.norm_eps)
        if cfg.is_moe_layer(layer):
            y, load, chosen, s = moe_ref(block.ffn, h.reshape(B * T, -1), route_kw)
            loads.append(load)
            balance += seq_balance_loss_np(s.reshape(B, T, -1), chosen.reshape(B, T, -1), e.n_routed_experts)
            x = x + y.reshape(B, T, -1)
        else:
            f = block.ffn
            x = x + swiglu_np(h, f64(f.w_gate_DF), f64(f.w_up_DF), f64(f.w_down_FD))
    h = rms_np(x, f64(model.final_norm.scale), cfg.model.norm_eps)
    head = emb.T if cfg.model.tie_embeddings else f64(model.head_DV)
    return h @ head, np.array(loads), balance


# ---------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------

T_CAUSAL = 12
CHANGED = (0, 4, 11)


def _perturbed_batch(rng):
    base = rng.integers(0, V, T_CAUSAL)
    rows = [base]
    for t in CHANGED:
        row = base.copy()
        row[t] = (row[t] + 1 + rng.integers(0, V - 1)) % V
        assert row[t] != base[t]
        rows.append(row)
    return np.stack(rows)


def _assert_causal(logits_rows):
    """Row 0 is the base sequence; row 1+j differs only at position CHANGED[j]."""
    base = logits_rows[0]
    scale = np.abs(base).max()
    for j, t in enumerate(CHANGED):
        var = logits_rows[1 + j]
        before = np.abs(var[:t] - base[:t]).max() if t else 0.0
        assert before <= 1e-6 * scale, f"position < {t} changed by {before:.3e}"
        at = np.abs(var[t] - base[t]).max()
        assert at > 1e-3 * scale, f"changing token {t} did not change its logits ({at:.3e})"


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa", "mla", "mla_qlora"])
def test_causal_every_attention_kind_with_moe(kind):
    """Dropless MoE is per token, so the model must be strictly causal."""
    model = build(make_cfg(kind))
    tokens = _perturbed_batch(np.random.default_rng(1))
    logits, _ = forward(model, tokens)
    assert logits.shape == (len(tokens), T_CAUSAL, V)
    _assert_causal(logits)


def test_capacity_dispatch_with_ample_capacity_is_causal_and_equals_dropless():
    """capacity dispatch drops pairs past an expert's C = ceil(cf*N*k/E) slots, in flat
    (token-major, batch-major) order.  With B > 1 and a small capacity, tokens of sequence 1
    can therefore be dropped because of *later* tokens of sequence 0 -- a cross-sequence,
    non-causal dependence.  With capacity_factor = n_routed_experts, C = N*k and nothing
    is ever dropped, so the model is causal and equals dropless."""
    moe = dict(MOE, dispatch="capacity", capacity_factor=float(MOE["n_routed_experts"]))
    model = build(make_cfg("mla", moe=moe), seed=3)
    tokens = _perturbed_batch(np.random.default_rng(2))
    logits, _ = forward(model, tokens)
    _assert_causal(logits)
    dropless = build(make_cfg("mla"), seed=3)
    logits_dl, _ = forward(dropless, tokens)
    close(logits, logits_dl, 1e-5)


def test_capacity_dispatch_single_sequence_is_causal_even_when_dropping():
    """With B = 1 the token-major order means a pair is only ever displaced by pairs of
    earlier positions, so even a dropping capacity dispatch stays causal."""
    moe = dict(MOE, dispatch="capacity", capacity_factor=0.5)
    model = build(make_cfg("mla", moe=moe), seed=4)
    tokens = _perturbed_batch(np.random.default_rng(3))
    outs, loads = [], []
    for row in tokens:
        logits, aux = forward(model, row[None])
        outs.append(logits[0])
        loads.append(aux["expert_load"])
    capacity = math.ceil(0.5 * T_CAUSAL * MOE["top_k"] / MOE["n_routed_experts"])
    assert max(l.max() for l in loads) > capacity  # pairs really were dropped
    _assert_causal(np.stack(outs))


# ---------------------------------------------------------------------------------------
# Attention against per-head references
# ---------------------------------------------------------------------------------------


def _attn_inputs(rng, attn_cfg, B=2, T=10):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    pos = np.stack([np.arange(T), np.arange(T) + 5])  # row 1 starts at position 5
    P = attn_cfg.qk_rope_head_dim if attn_cfg.kind == "mla" else attn_cfg.head_dim
    cos, sin = rope_tables(jnp.asarray(pos), P, THETA)
    return x, pos, cos, sin


@pytest.mark.parametrize(
    "attn",
    [
        ATTN["mla"],
        ATTN["mla_qlora"],
        dict(ATTN["mla"], qk_nope_head_dim=0),  # pure-rope MLA keys
        dict(ATTN["mla_qlora"], n_heads=2, kv_lora_rank=8, qk_rope_head_dim=6, v_head_dim=10),
    ],
    ids=["mla", "mla_qlora", "mla_nope0", "mla_wide_v"],
)
def test_mla_matches_per_head_reference(attn):
    cfg = make_cfg(attn, moe={"n_routed_experts": 0})
    module = build_attention(cfg, seed=5)
    x, pos, cos, sin = _attn_inputs(np.random.default_rng(0), cfg.attention)
    out = np.asarray(_call_attn(module, jnp.asarray(x), cos, sin))
    assert out.shape == x.shape and out.dtype == np.float32
    close(out, mla_ref(module, x.astype(np.float64), pos))


def test_mla_in_model_matches_reference():
    """The attention module the model builds (blocks[1].attn), with q LoRA."""
    cfg = make_cfg("mla_qlora")
    model = build(cfg, seed=6)
    attn = model.blocks[1].attn
    x, pos, cos, sin = _attn_inputs(np.random.default_rng(1), cfg.attention)
    out = np.asarray(_call_attn(attn, jnp.asarray(x), cos, sin))
    close(out, mla_ref(attn, x.astype(np.float64), pos))


@pytest.mark.parametrize(
    "kind, n_kv", [("gqa", 1), ("gqa", 2), ("gqa", 4), ("gqa", 8), ("mha", None), ("mqa", None)]
)
def test_mha_gqa_mqa_match_per_head_reference(kind, n_kv):
    attn = dict(kind=kind, n_heads=8, head_dim=8)
    if n_kv is not None:
        attn["n_kv_heads"] = n_kv
    cfg = make_cfg(attn, moe={"n_routed_experts": 0})
    module = build_attention(cfg, seed=7)
    K = {"mha": 8, "mqa": 1}.get(kind, n_kv)
    assert module.wk_DKH[...].shape == (D, K, 8) and module.wv_DKG[...].shape == (D, K, 8)
    x, pos, cos, sin = _attn_inputs(np.random.default_rng(2), cfg.attention)
    out = np.asarray(_call_attn(module, jnp.asarray(x), cos, sin))
    assert out.shape == x.shape and out.dtype == np.float32
    close(out, mha_ref(module, x.astype(np.float64), pos))


# ---------------------------------------------------------------------------------------
# Whole model against a float64 reference (MLA + q LoRA + groups + dense first layer)
# ---------------------------------------------------------------------------------------

FULL_MOE = dict(
    n_routed_experts=8,
    n_shared_experts=2,
    top_k=3,
    expert_ffn_dim=16,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    dispatch="dropless",
)


def _full_model(seed=8, **model):
    cfg = make_cfg("mla_qlora", moe=FULL_MOE, n_layers=3, **model)
    return cfg, build(cfg, seed, bias_std=0.05)


def test_transformer_matches_reference_and_aux():
    cfg, model = _full_model()
    tokens = np.random.default_rng(4).integers(0, V, (2, 12))
    logits, aux = forward(model, tokens)
    ref, ref_load, ref_balance = transformer_ref(model, tokens)
    assert logits.dtype == np.float32 and logits.shape == (2, 12, V)
    close(logits, ref, 1e-5)
    # expert_load: [n_moe_layers, E], each row sums to B*T*top_k
    load = aux["expert_load"]
    assert load.shape == (2, 8)
    np.testing.assert_array_equal(load.sum(-1), [2 * 12 * 3] * 2)
    np.testing.assert_array_equal(load, ref_load)
    assert aux["balance_loss"] == pytest.approx(ref_balance, rel=1e-5)


def test_tied_embeddings_and_dense_model_reference():
    cfg = make_cfg("gqa", moe={"n_routed_experts": 0}, tie_embeddings=True)
    model = build(cfg, seed=9)
    assert not hasattr(model, "head_DV")
    tokens = np.random.default_rng(5).integers(0, V, (2, 8))
    logits, aux = forward(model, tokens)
    close(logits, transformer_ref(model, tokens)[0], 1e-5)
    assert aux["expert_load"].shape == (0, 1)


# ---------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------


def _router_inputs(N, E, seed, bias_std=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, 16)).astype(np.float32)
    w = (0.5 * rng.standard_normal((16, E))).astype(np.float32)
    b = (bias_std * rng.standard_normal(E)).astype(np.float32)
    return x, w, b


def _check_route(idx, w, chosen_ref, weights_ref, k):
    idx, w = np.asarray(idx), np.asarray(w)
    assert idx.shape == (len(chosen_ref), k) and idx.dtype == np.int32
    for n in range(len(chosen_ref)):
        assert len(set(idx[n].tolist())) == k  # k distinct experts
        assert set(idx[n].tolist()) == set(chosen_ref[n])
        got = dict(zip(idx[n].tolist(), w[n].tolist()))
        want = dict(zip(chosen_ref[n], weights_ref[n].tolist()))
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=2, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0),
        dict(top_k=3, scoring="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5),
        dict(top_k=2, scoring="softmax", norm_topk_prob=False, routed_scaling_factor=1.0),
        dict(top_k=8, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0),
    ],
)
def test_route_top_k_distinct_matches_reference(kw):
    x, w, b = _router_inputs(40, 8, 0, bias_std=0.02)
    idx, wt, s = _route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), n_group=1, topk_group=1, **kw)
    chosen, weights, s_ref, _ = route_np(x.astype(np.float64), w.astype(np.float64), b, **kw)
    _check_route(idx, wt, chosen, weights, kw["top_k"])
    close(s, s_ref, 1e-5)


def test_group_limited_routing():
    E, G, TG, K = 16, 4, 2, 4
    x, w, b = _router_inputs(64, E, 1, bias_std=0.05)
    kw = dict(
        top_k=K, scoring="sigmoid", n_group=G, topk_group=TG, norm_topk_prob=True, routed_scaling_factor=1.5
    )
    idx, wt, _ = _route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), **kw)
    chosen, weights, _, groups = route_np(x.astype(np.float64), w.astype(np.float64), b, **kw)
    idx = np.asarray(idx)
    for n in range(len(idx)):
        assert {e // (E // G) for e in idx[n]} <= groups[n]  # only the best groups
    _check_route(idx, wt, chosen, weights, K)
    # the restriction matters for this data: plain top-k would pick other experts
    plain, _, _, _ = route_np(
        x.astype(np.float64), w.astype(np.float64), b, **dict(kw, n_group=1, topk_group=1)
    )
    assert sum(set(p) != set(c) for p, c in zip(plain, chosen)) > 0


@pytest.mark.parametrize("norm, scaling", [(True, 1.0), (False, 2.5), (True, 2.5)])
def test_bias_changes_choice_not_weights(norm, scaling):
    E, K = 8, 2
    x, w, _ = _router_inputs(32, E, 2)
    bias = np.zeros(E, np.float32)
    bias[[1, 6]] = 0.3
    kw = dict(
        top_k=K,
        scoring="sigmoid",
        n_group=1,
        topk_group=1,
        norm_topk_prob=norm,
        routed_scaling_factor=scaling,
    )
    idx0, _, s = _route(jnp.asarray(x), jnp.asarray(w), jnp.zeros(E), **kw)
    idx, wt, _ = _route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), **kw)
    idx0, idx, wt, s = map(np.asarray, (idx0, idx, wt, s))
    changed = [n for n in range(len(idx)) if set(idx[n]) != set(idx0[n])]
    assert changed  # the bias moved the choice for some tokens
    chosen, weights, s_ref, _ = route_np(x.astype(np.float64), w.astype(np.float64), bias, **kw)
    _check_route(idx, wt, chosen, weights, K)
    # and explicitly: weights are from the unbiased scores, not from s + b
    for n in changed:
        sel = s_ref[n, idx[n]]
        want = (sel / sel.sum() if norm else sel) * scaling
        np.testing.assert_allclose(wt[n], want, rtol=1e-5)
        biased = s_ref[n, idx[n]] + bias[idx[n]]
        wrong = (biased / biased.sum() if norm else biased) * scaling
        assert np.abs(wt[n] - wrong).max() > 1e-3


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

N_TOK, DM, E_DISP, F_DISP, K_DISP = 24, 16, 6, 8, 2


@pytest.fixture(scope="module")
def dispatch_case():
    return _make_dispatch_case()


def _make_dispatch_case():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N_TOK, DM)).astype(np.float32)
    # expert 5 gets no token (a zero-size group); the others are unevenly loaded
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.1])
    idx = np.stack([rng.choice(5, K_DISP, replace=False, p=probs) for _ in range(N_TOK)])
    w = rng.uniform(0.1, 1.0, (N_TOK, K_DISP)).astype(np.float32)
    wg = (0.3 * rng.standard_normal((E_DISP, DM, F_DISP))).astype(np.float32)
    wu = (0.3 * rng.standard_normal((E_DISP, DM, F_DISP))).astype(np.float32)
    wd = (0.3 * rng.standard_normal((E_DISP, F_DISP, DM))).astype(np.float32)
    return x, idx.astype(np.int32), w, wg, wu, wd


def dispatch_ref(x, idx, w, wg, wu, wd, capacity=None):
    """Per-token loop; with ``capacity``, each expert keeps its first C pairs in
    token-major order (pair n*k + j) and the rest contribute nothing."""
    x, w, wg, wu, wd = (a.astype(np.float64) for a in (x, w, wg, wu, wd))
    y = np.zeros_like(x)
    used = np.zeros(wg.shape[0], int)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            y[n] += w[n, j] * swiglu_np(x[n], wg[e], wu[e], wd[e])
    return y


def test_dispatch_dropless_matches_loop(dispatch_case):
    y = np.asarray(_dropless(*map(jnp.asarray, dispatch_case)))
    assert y.shape == (N_TOK, DM)
    close(y, dispatch_ref(*dispatch_case), 1e-5)


def test_dispatch_capacity_ample_equals_dropless(dispatch_case):
    args = list(map(jnp.asarray, dispatch_case))
    y = np.asarray(_capacity(*args, capacity=N_TOK * K_DISP))
    close(y, dispatch_ref(*dispatch_case), 1e-5)
    close(y, np.asarray(_dropless(*args)), 1e-5)


def test_dispatch_ragged_matches_loop(dispatch_case):
    close(np.asarray(_ragged(*map(jnp.asarray, dispatch_case))), dispatch_ref(*dispatch_case), 1e-5)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_dispatch_blocked_matches_loop(dispatch_case, block):
    """Blocks smaller than, equal to and larger than an expert's group, and an empty expert."""
    y = np.asarray(_blocked(*map(jnp.asarray, dispatch_case), block=block))
    close(y, dispatch_ref(*dispatch_case), 1e-5)


def test_dispatch_blocked_worst_case_routing():
    """Every token on the same k experts: the static row bound must still hold them all."""
    x, _, w, wg, wu, wd = _make_dispatch_case()
    idx = np.tile(np.array([[4, 1]], np.int32), (N_TOK, 1))
    for block in (5, 16):
        y = np.asarray(_blocked(*map(jnp.asarray, (x, idx, w, wg, wu, wd)), block=block))
        close(y, dispatch_ref(x, idx, w, wg, wu, wd), 1e-5)


def _naive_moe(x, idx, w, wg, wu, wd):
    """Each (token, slot) pair with its expert's weights gathered: no sorting, no blocks."""
    g = jnp.einsum("nd,nkdf->nkf", x, wg[idx])
    u = jnp.einsum("nd,nkdf->nkf", x, wu[idx])
    return jnp.einsum("nkf,nkfd,nk->nd", jax.nn.silu(g) * u, wd[idx], w)


@pytest.mark.parametrize("block", [None, 3])
def test_dispatch_blocked_gradients_match_ragged_and_naive(dispatch_case, block):
    """Outputs and gradients (x, gate weights, the three expert stacks) of the blocked
    custom-VJP path against the ragged_dot path's autodiff and a naive gathered-weights
    formula's autodiff."""
    args = tuple(map(jnp.asarray, dispatch_case))
    r = jnp.asarray(np.random.default_rng(7).standard_normal((N_TOK, DM)), jnp.float32)

    def grads(fn):
        def f(x, w, wg, wu, wd):
            return jnp.sum(fn(x, args[1], w, wg, wu, wd) * r)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(args[0], *args[2:])

    got = grads(lambda *a: dispatch_blocked(*a, block=block))
    for ref in (grads(dispatch_ragged), grads(_naive_moe)):
        close(float(got[0]), float(ref[0]), 1e-5)
        for g, want in zip(got[1], ref[1]):
            # expert 5 gets no token: its gradient is exactly zero in every path
            close(np.asarray(g), np.asarray(want), 1e-5)
    assert np.all(np.asarray(got[1][2])[5] == 0)


def test_block_size_rule():
    """Balanced rows per expert as a power of two, within [8, 128]."""
    assert block_size(4096, 8) == 128 and block_size(2048, 8) == 128
    assert block_size(600, 8) == 64  # 75 rows per expert -> 64
    assert block_size(16, 8) == 8 and block_size(2, 64) == 8


def test_auto_dispatch_is_dropless_on_every_backend():
    assert resolve_dispatch("auto") == "dropless"
    assert resolve_dispatch("capacity") == "capacity"


@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_dispatch_capacity_drops_late_pairs(dispatch_case, capacity):
    args = list(map(jnp.asarray, dispatch_case))
    y = np.asarray(_capacity(*args, capacity=capacity))
    full = dispatch_ref(*dispatch_case)
    ref = dispatch_ref(*dispatch_case, capacity=capacity)
    assert np.abs(ref - full).max() > 1e-2  # this capacity really drops pairs
    close(y, ref, 1e-5)


# ---------------------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------------------


def test_balance_bias_update_formula():
    bias = np.array([0.1, -0.2, 0.0, 0.3, 0.05, -0.01], np.float32)
    load = np.array([3.0, 5.0, 4.0, 4.0, 0.0, 8.0], np.float32)  # mean 4
    got = np.asarray(balance_bias_update(jnp.asarray(bias), jnp.asarray(load), 0.01))
    want = bias.astype(np.float64) + 0.01 * np.array([1, -1, 0, 0, 1, -1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    # integer loads (what bincount gives) work the same
    got_i = np.asarray(balance_bias_update(jnp.asarray(bias), jnp.asarray(load, jnp.int32), 0.01))
    np.testing.assert_allclose(got_i, want, rtol=0, atol=1e-7)


def test_sequence_balance_loss_reference():
    rng = np.random.default_rng(6)
    B, T, E, k = 3, 5, 6, 2
    s = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, E))))
    idx = np.stack([[rng.choice(E, k, replace=False) for _ in range(T)] for _ in range(B)])
    got = float(sequence_balance_loss(jnp.asarray(s, jnp.float32), jnp.asarray(idx), E))
    assert got == pytest.approx(seq_balance_loss_np(s, idx, E), rel=1e-5)


def test_sequence_balance_loss_is_one_when_uniform():
    B, T, E, k = 2, 4, 4, 2
    # token t picks experts (2t, 2t+1) mod 4: every expert is chosen kT/E = 2 times
    idx = np.array([[[(2 * t) % E, (2 * t + 1) % E] for t in range(T)]] * B)
    s = np.full((B, T, E), 0.3)
    got = float(sequence_balance_loss(jnp.asarray(s, jnp.float32), jnp.asarray(idx), E))
    assert got == pytest.approx(1.0, rel=1e-6)
    # concentrated routing with matching scores is penalised (> 1)
    idx2 = np.zeros((B, T, k), int)
    idx2[..., 1] = 1
    s2 = np.full((B, T, E), 0.1)
    s2[..., :2] = 0.9
    got2 = float(sequence_balance_loss(jnp.asarray(s2, jnp.float32), jnp.asarray(idx2), E))
    assert got2 == pytest.approx(seq_balance_loss_np(s2, idx2, E), rel=1e-5)
    assert got2 > 1.5


def test_balance_bias_gets_no_gradient():
    """nnx.grad (w.r.t. nnx.Param, its default) of a loss through an MoE layer of a model
    has no BalanceBias leaf, though the bias changes the forward pass.  (The MoE layer
    alone: differentiating the whole model costs ~10 s of compilation on 2 CPU cores.)"""
    model = build(make_cfg("mla"), seed=10, bias_std=0.05)  # both layers MoE
    moe = model.blocks[1].ffn
    x = jnp.asarray(np.random.default_rng(7).standard_normal((4, T_CAUSAL, D)), jnp.float32)

    def loss_fn(m):
        y, aux = m(x)
        return jnp.mean(y**2) + aux["balance_loss"]

    grads = nnx.jit(nnx.grad(loss_fn))(moe)
    leaves = jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert leaves and all(isinstance(v, nnx.Param) for v in leaves)
    assert not any(isinstance(v, BalanceBias) for v in leaves)
    paths = {p for p, _ in nnx.to_flat_state(grads)}
    assert not any("bias_E" in p for p in paths)
    assert paths == {p for p, _ in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    assert ("bias_E",) in {p for p, _ in nnx.to_flat_state(nnx.state(moe))}
    # the router weight, on the same path as the bias, does get a gradient
    assert np.abs(np.asarray(grads["w_router_DE"][...])).max() > 0
    # ... while the bias does affect the forward pass (it is used, just not trained)
    tokens = np.random.default_rng(8).integers(0, V, (4, T_CAUSAL))
    before, _ = forward(model, tokens)
    moe.bias_E.set_value(jnp.asarray(np.eye(8)[0] * 5.0, jnp.float32))
    after, _ = forward(model, tokens)
    assert np.abs(after - before).max() > 1e-4


def test_update_balance_biases():
    cfg, model = _full_model(seed=11)
    before = [f64(m.bias_E) for m in model.moe_layers()]
    load = np.array([[3, 3, 3, 3, 3, 3, 3, 3], [9, 0, 1, 2, 3, 4, 5, 0]], np.float32)
    model.update_balance_biases(jnp.asarray(load), 0.02)
    for b0, m, l in zip(before, model.moe_layers(), load):
        want = b0 + 0.02 * np.sign(l.mean() - l)
        np.testing.assert_allclose(f64(m.bias_E), want, rtol=0, atol=1e-7)
        assert isinstance(m.bias_E, BalanceBias)
    np.testing.assert_array_equal(f64(model.moe_layers()[0].bias_E), before[0])  # balanced


# ---------------------------------------------------------------------------------------
# KV cache and parameter counts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, b", [("float32", 4), ("bfloat16", 2)])
def test_kv_cache_bytes(dtype, b):
    def cfg(attn):
        return from_dict({"model": {"dtype": dtype}, "attention": attn})

    nh, dh = 8, 64
    assert (
        kv_cache_bytes_per_token_per_layer(cfg(dict(kind="mha", n_heads=nh, head_dim=dh))) == 2 * nh * dh * b
    )
    assert (
        kv_cache_bytes_per_token_per_layer(cfg(dict(kind="gqa", n_heads=nh, n_kv_heads=2, head_dim=dh)))
        == 2 * 2 * dh * b
    )
    assert kv_cache_bytes_per_token_per_layer(cfg(dict(kind="mqa", n_heads=nh, head_dim=dh))) == 2 * dh * b
    mla = cfg(
        dict(
            kind="mla",
            n_heads=nh,
            kv_lora_rank=4 * dh,
            qk_nope_head_dim=dh,
            qk_rope_head_dim=dh // 2,
            v_head_dim=dh,
        )
    )
    latent = kv_cache_bytes_per_token_per_layer(mla)
    assert latent == (4 * dh + dh // 2) * b
    assert latent / b == 4.5 * dh  # DeepSeek-V2: like GQA with 2.25 groups
    assert kv_cache_bytes_per_token_per_layer(mla, absorbed=False) == nh * (dh + dh // 2 + dh) * b
    # explicit element size overrides the compute dtype
    assert kv_cache_bytes_per_token_per_layer(mla, dtype_bytes=1) == 4 * dh + dh // 2
    assert (
        kv_cache_bytes_per_token_per_layer(
            cfg(dict(kind="gqa", n_heads=nh, n_kv_heads=4, head_dim=dh)), dtype_bytes=2
        )
        == 2 * 4 * dh * 2
    )


def _param_formula(cfg):
    m, a, e = cfg.model, cfg.attention, cfg.moe
    Dm, N = m.d_model, a.n_heads
    total = m.vocab_size * Dm + Dm  # embedding, final norm
    if not m.tie_embeddings:
        total += Dm * m.vocab_size
    if a.kind == "mla":
        dn, dr, dv, R, Q = (
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
            a.q_lora_rank,
        )
        attn = (Dm * Q + Q + Q * N * (dn + dr)) if Q else Dm * N * (dn + dr)
        attn += Dm * (R + dr) + R + R * N * (dn + dv) + N * dv * Dm
    else:
        K = cfg.n_kv_heads
        attn = Dm * N * a.head_dim + 2 * Dm * K * a.head_dim + N * a.head_dim * Dm
    per_expert = 3 * Dm * e.expert_ffn_dim
    total_all, inactive = total, 0
    for layer in range(m.n_layers):
        total_all += 2 * Dm + attn  # two norms + attention
        if cfg.is_moe_layer(layer):
            total_all += Dm * e.n_routed_experts + e.n_routed_experts * per_expert
            total_all += e.n_shared_experts * per_expert
            inactive += (e.n_routed_experts - e.top_k) * per_expert
        else:
            total_all += 3 * Dm * m.ffn_dim
    return total_all, total_all - inactive


@pytest.mark.parametrize(
    "attn, moe, tie",
    [
        ("mla_qlora", FULL_MOE, False),
        ("mla", dict(FULL_MOE, first_k_dense_replace=0, n_shared_experts=0, top_k=2), True),
        ("gqa", {"n_routed_experts": 0}, False),
    ],
)
def test_count_params_formula(attn, moe, tie):
    cfg = make_cfg(attn, moe=moe, n_layers=3, tie_embeddings=tie)
    model = build(cfg)
    total, active = _param_formula(cfg)
    assert count_params(model) == total
    assert count_params(model, active=True) == active
    if cfg.moe.n_routed_experts:
        assert active < total  # BalanceBias (E per MoE layer) is not counted either


@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("moe", [{"n_routed_experts": 0}, dict(MOE, first_k_dense_replace=1)])
def test_graphdef_is_hashable(attn, moe):
    """A model's graphdef (its structure and static attributes, the MoE routing options
    among them) hashes, equal for two models of one config whatever their weights, and
    different when a routing option differs (mlalm.generate keys compiled programs on it)."""
    cfg = make_cfg(attn, moe=moe)
    g0, g1 = (nnx.graphdef(build(cfg, seed=s)) for s in (0, 1))
    assert hash(g0) == hash(g1) and g0 == g1
    if moe.get("n_routed_experts"):
        g2 = nnx.graphdef(build(make_cfg(attn, moe=dict(moe, top_k=3))))
        hash(g2)
        assert g2 != g0


def test_library_init():
    """The one real initialisation: parameter count, norm scales at one, truncated-normal
    weights with std init_std (output projections init_std / sqrt(2 n_layers))."""
    # few distinct parameter shapes ((32,32), (32,4,8), (4,8,32)): each costs a compile
    cfg = from_dict(
        {
            "model": dict(vocab_size=32, d_model=32, n_layers=2, ffn_dim=32, max_seq_len=32, init_std=0.05),
            "attention": dict(kind="mha", n_heads=4, head_dim=8),
            "train": {"seq_len": 16},
        }
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    total, active = _param_formula(cfg)
    assert count_params(model) == total == count_params(model, active=True)
    np.testing.assert_array_equal(f64(model.blocks[1].ffn_norm.scale), np.ones(32))
    trunc = 0.98658  # std of a standard normal truncated at +-3
    big = np.concatenate([f64(model.embed_VD).ravel(), f64(model.head_DV).ravel()])
    assert np.abs(big).max() <= 3 * 0.05 + 1e-6
    assert big.std() == pytest.approx(0.05 * trunc, rel=0.1)
    out = np.concatenate(
        [f64(b.attn.wo_NGD).ravel() for b in model.blocks]
        + [f64(b.ffn.w_down_FD).ravel() for b in model.blocks]
    )
    assert out.std() == pytest.approx(0.05 / 2 * trunc, rel=0.1)
    # different seeds give different weights, the same seed the same ones
    again = Transformer(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(f64(again.embed_VD), f64(model.embed_VD))
    other = Transformer(cfg, rngs=nnx.Rngs(1))
    assert np.abs(f64(other.embed_VD) - f64(model.embed_VD)).max() > 0


# ---------------------------------------------------------------------------------------
# bfloat16 compute
# ---------------------------------------------------------------------------------------


def test_bfloat16_compute_close_to_float32():
    cfg32, m32 = _full_model(seed=12)
    cfg16, m16 = _full_model(seed=12, dtype="bfloat16")
    assert cfg16.model.dtype == "bfloat16" and m16.blocks[0].attn.dtype == jnp.bfloat16
    # same seed, float32 parameters in both
    for (_p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(m32, nnx.Param)), nnx.to_flat_state(nnx.state(m16, nnx.Param))
    ):
        assert b[...].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    tokens = np.random.default_rng(8).integers(0, V, (2, 12))
    l32, _ = forward(m32, tokens)
    l16, _ = forward(m16, tokens)
    assert l32.dtype == np.float32 and l16.dtype == np.float32
    err = np.abs(l16 - l32).max()
    assert err > 0  # bfloat16 really was used
    assert err <= 5e-2 * max(1.0, np.abs(l32).max()), err


# ---------------------------------------------------------------------------------------
# Causal query blocks (the default for T >= 128) against a float64 softmax
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("N,K,blocks", [(4, 4, 4), (4, 2, 4), (4, 1, 2), (2, 2, 8)])
def test_attention_core_query_blocks_match_float64(N, K, blocks):
    from mlalm.model.attention import attention_core

    B, T, H, G = 2, 128, 8, 6
    r = np.random.default_rng(0)
    q, k, v = r.normal(size=(B, T, N, H)), r.normal(size=(B, T, K, H)), r.normal(size=(B, T, K, G))
    scale = H**-0.5
    kk, vv = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bnts,bsng->btng", p, vv)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    for nb in (blocks, 1, None):
        o, m = attention_core(*args, scale=scale, q_blocks=nb)
        close(o, want, rtol=2e-5)
        close(m, s.max(axis=(0, 2, 3)), rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("N,K,blocks", [(4, 4, 4), (4, 2, 4), (4, 1, 1)])
def test_attention_core_gradients_match_float64(N, K, blocks):
    """The core's own softmax VJP against the softmax gradient written out in float64."""
    from mlalm.model.attention import attention_core

    B, T, H, G = 2, 128, 8, 6
    r = np.random.default_rng(1)
    q, k, v = r.normal(size=(B, T, N, H)), r.normal(size=(B, T, K, H)), r.normal(size=(B, T, K, G))
    w = r.normal(size=(B, T, N, G))  # L = sum(w * o)
    scale, g = H**-0.5, N // K
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = np.einsum("btng,bsng->bnts", w, vv)
    delta = (dp * p).sum(-1, keepdims=True)
    ds = p * (dp - delta)
    want_dq = scale * np.einsum("bnts,bsnh->btnh", ds, kk)
    want_dk = (scale * np.einsum("bnts,btnh->bsnh", ds, q)).reshape(B, T, K, g, H).sum(3)
    want_dv = np.einsum("bnts,btng->bsng", p, w).reshape(B, T, K, g, G).sum(3)
    # floors: the same sums over |terms| (query 0 sees one key, so its dq is exactly 0)
    ds_abs = p * (np.abs(dp) + np.abs(delta))
    floors = (
        scale * np.einsum("bnts,bsnh->btnh", ds_abs, np.abs(kk)).max(),
        (scale * np.einsum("bnts,btnh->bsnh", ds_abs, np.abs(q))).reshape(B, T, K, g, H).sum(3).max(),
        np.einsum("bnts,btng->bsng", p, np.abs(w)).reshape(B, T, K, g, G).sum(3).max(),
    )
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    grads = jax.grad(
        lambda q, k, v: jnp.sum(
            jnp.asarray(w, jnp.float32) * attention_core(q, k, v, scale=scale, q_blocks=blocks)[0]
        ),
        argnums=(0, 1, 2),
    )(*args)
    for got, want, floor in zip(grads, (want_dq, want_dk, want_dv), floors):
        close(got, want, rtol=2e-5, scale=floor)


# ---------------------------------------------------------------------------------------
# jax_enable_x64: float32 models stay float32 (x64 switched on inside each test only)
# ---------------------------------------------------------------------------------------


def _loss_and_logits(graphdef, rest, tokens_BT1, chunk):
    """params -> (mean next-token NLL + 0.01 balance loss, logits): the plain logits path,
    or with ``chunk`` the fused head + cross-entropy of mlalm.model.loss."""

    def f(params):
        model = nnx.merge(graphdef, params, rest)
        h, aux = model.hidden(tokens_BT1[:, :-1])
        labels = tokens_BT1[:, 1:]
        logits = model.logits(h)
        if chunk:
            nll = lm_head_cross_entropy(h, model.head_weight(), labels, chunk_tokens=chunk)
        else:
            lse = jax.nn.logsumexp(logits, axis=-1)
            nll = jnp.mean(lse - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])
        return nll + 0.01 * aux["balance_loss"], logits

    return f


@pytest.mark.slow
@pytest.mark.parametrize(
    "attn, dispatch, chunk",
    [
        ("mla", "dropless", 0),
        ("mla_qlora", "capacity", 8),
        ("mha", "capacity", 0),
        ("gqa", "dropless", 8),
        ("mqa", "dropless", 0),
    ],
)
def test_x64_forward_and_grad_stay_float32(attn, dispatch, chunk):
    """With jax_enable_x64 on, a float32 model (dense layer, then MoE with either dispatch;
    plain or fused loss) fed int64 tokens computes in float32 throughout -- no float64
    value in forward or backward -- and gives the float64 reference's logits and the
    x64-off loss and gradients."""
    # capacity_factor = E: C = N k, nothing dropped, so the dropless reference applies
    moe = dict(
        MOE, dispatch=dispatch, capacity_factor=float(MOE["n_routed_experts"]), first_k_dense_replace=1
    )
    cfg = make_cfg(attn, moe=moe)
    tokens = np.random.default_rng(12).integers(0, V, (2, 13))

    def run():
        model = build(cfg, seed=13, bias_std=0.05)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        f = jax.value_and_grad(_loss_and_logits(graphdef, rest, jnp.asarray(tokens), chunk), has_aux=True)
        (loss, logits), grads = jax.jit(f)(params)
        return model, f, params, loss, logits, grads

    _, _, _, loss32, _, grads32 = run()
    with jax.enable_x64(True):
        assert jnp.asarray(tokens).dtype == jnp.int64
        model, f, params, loss, logits, grads = run()
        assert float64_ops(f, params) == []
    assert loss.dtype == logits.dtype == jnp.float32
    close(logits, transformer_ref(model, tokens[:, :-1])[0], 1e-5)
    assert_close(loss, loss32, rtol=1e-6, what="loss: x64 on vs off")
    g64, g32 = nnx.to_flat_state(grads), nnx.to_flat_state(grads32)
    assert [p for p, _ in g64] == [p for p, _ in g32]
    for (path, g), (_, g_off) in zip(g64, g32):
        assert g[...].dtype == jnp.float32, path
        # per leaf, relative: no parameter's gradient vanishes as a whole here
        assert_close(g[...], g_off[...], rtol=1e-6, what=f"{path}: x64 on vs off")


@pytest.mark.parametrize(
    "attn, absorbed, impl",
    [
        pytest.param("mla", True, "xla", id="mla-absorbed"),
        pytest.param("mla_qlora", False, "xla", id="mla-expanded"),
        pytest.param("mla", True, "pallas", id="mla-pallas_decode", marks=pytest.mark.slow),
        pytest.param("gqa", True, "xla", id="gqa"),
    ],
)
def test_x64_forward_cached_stays_float32(attn, absorbed, impl):
    """With x64 on and int64 positions, prefill then two decode steps over a float32 cache
    (MLA latent or expanded, GQA; the mla_decode kernel for impl=pallas) stay float32,
    hold no float64 value, and give the float64 reference's logits."""
    cfg = make_cfg(dict(ATTN[attn], impl=impl), moe=dict(MOE, first_k_dense_replace=1))
    tokens = np.random.default_rng(14).integers(0, V, (2, 8))
    want = transformer_ref(build(cfg, seed=15), tokens)[0]
    step = nnx.jit(lambda m, t, p, c: m.forward_cached(t, p, c))
    with jax.enable_x64(True):
        model = build(cfg, seed=15)
        caches = model.init_cache_layers(2, 16, jnp.float32, absorbed=absorbed)
        pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
        assert pos.dtype == jnp.int64
        tok = jnp.asarray(tokens)
        h, caches = step(model, tok[:, :6], pos[:, :6], caches)
        outs = [model.logits(h)]
        for t in (6, 7):
            if t == 7:  # the decode step itself holds no float64 value
                assert (
                    float64_ops(
                        lambda t_, p_, c_: model.forward_cached(t_, p_, c_),
                        tok[:, t : t + 1],
                        pos[:, t : t + 1],
                        caches,
                    )
                    == []
                )
            h, caches = step(model, tok[:, t : t + 1], pos[:, t : t + 1], caches)
            outs.append(model.logits(h))
    assert all(c.dtype == jnp.float32 for c in jax.tree.leaves(caches))
    logits = np.concatenate([np.asarray(o) for o in outs], axis=1)
    assert all(o.dtype == jnp.float32 for o in outs)
    close(logits, want, 1e-5)


@pytest.mark.parametrize("attn", ["mla", "mla_qlora", "gqa"])
def test_x64_qk_clip_and_bias_update_stay_float32(attn):
    """The in-step model updates (QK-clip, balancing-bias step) under x64: no float64
    value, float32 weights, and the formulas: head n's query by sqrt(gamma_n) (MLA: its
    rope part by gamma_n), MLA's k_nope by sqrt(gamma_n), a GQA kv head's key by the sqrt
    of its query heads' smallest gamma; b += rate·sign(mean(load) - load)."""
    cfg = make_cfg(attn, moe=dict(MOE, first_k_dense_replace=1))
    model = build(cfg, seed=16, bias_std=0.05)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tau, rate = 2.0, 0.01
    max_logit = np.array([[1.0, 3.0, 8.0, 2.5], [4.0, 0.5, 2.0, 16.0]], np.float32)
    load = np.array([[3, 0, 9, 4, 4, 4, 5, 3]], np.float32)

    def update(params, rest, max_logit_LN, load_LE):
        m = nnx.merge(graphdef, params, rest)
        m.apply_qk_clip(max_logit_LN, tau)
        m.update_balance_biases(load_LE, rate)
        return nnx.split(m, nnx.Param, ...)[1:]

    with jax.enable_x64(True):
        args = (params, rest, jnp.asarray(max_logit), jnp.asarray(load))
        assert float64_ops(update, *args) == []
        new_params, new_rest = jax.jit(update)(*args)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((new_params, new_rest)))
    new = nnx.merge(graphdef, new_params, new_rest)
    gamma = np.minimum(1.0, tau / max_logit.astype(np.float64))
    for layer in range(2):
        old_a, new_a, g = model.blocks[layer].attn, new.blocks[layer].attn, gamma[layer]
        if attn.startswith("mla"):
            dn = old_a.dn
            wq = "wq_b_QNH" if old_a.q_lora else "wq_DNH"
            q_scale = np.concatenate(
                [np.repeat(np.sqrt(g)[:, None], dn, 1), np.repeat(g[:, None], old_a.dr, 1)], 1
            )
            kv_scale = np.concatenate([np.repeat(np.sqrt(g)[:, None], dn, 1), np.ones((len(g), old_a.dv))], 1)
            close(f64(getattr(new_a, wq)), f64(getattr(old_a, wq)) * q_scale, 1e-6)
            close(f64(new_a.wkv_b_RNU), f64(old_a.wkv_b_RNU) * kv_scale, 1e-6)
        else:
            K = old_a.wk_DKH.shape[1]
            gk = np.sqrt(g.reshape(K, -1).min(1))
            close(f64(new_a.wq_DNH), f64(old_a.wq_DNH) * np.sqrt(g)[None, :, None], 1e-6)
            close(f64(new_a.wk_DKH), f64(old_a.wk_DKH) * gk[None, :, None], 1e-6)
    bias = f64(model.blocks[1].ffn.bias_E)
    close(f64(new.blocks[1].ffn.bias_E), bias + rate * np.sign(load[0].mean() - load[0]), 1e-6)
