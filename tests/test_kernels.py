"""mlalm.kernels in Pallas interpret mode against independent numpy float64 references.

The references below are written from the formulas (per batch, per head loops, float64),
not from the code under test.  Errors are measured as max|kernel - ref| / max|ref| and must
stay under 2e-5 in float32 and 2e-2 in bfloat16, for the output and for dq, dk, dv of a
random cotangent.  Sizes are small (B <= 2, H, G <= 32) because interpret mode is slow:
each case is one jit of forward + backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlalm.kernels import (BlockSizes, attention_reference, flash_attention, mla_decode,
                           mla_decode_reference)
from mlalm.model.attention import attention_core

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def randn(rng, shape, dtype, scale=1.0):
    """A random array in `dtype` and the exact float64 values it holds."""
    x = jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


# ------------------------------------------------------------------ numpy references

def np_attention(q, k, v, do, *, causal, scale):
    """Output and (dq, dk, dv) of softmax(scale·q kᵀ) v per head, in float64.

    Query head n reads kv head n // (N/K); query i sees keys j <= i + S - T when causal;
    a row that sees nothing has p = 0.  Backward: dP = dO vᵀ, dS = P∘(dP - rowsum(P∘dP)).
    Also returns each head's largest visible scaled logit (over batch and positions).
    """
    B, T, N, H = q.shape
    S, K, G = k.shape[1], k.shape[2], v.shape[3]
    o, dq, dk, dv = (np.zeros(x) for x in ((B, T, N, G), q.shape, k.shape, v.shape))
    max_logit = np.full(N, -np.inf)
    visible = np.ones((T, S), bool)
    if causal:
        visible = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            s = np.where(visible, q[b, :, n] @ k[b, :, kv].T * scale, -np.inf)
            max_logit[n] = max(max_logit[n], s.max())
            p = np.zeros((T, S))
            rows = visible.any(1)
            e = np.exp(s[rows] - s[rows].max(1, keepdims=True))
            p[rows] = e / e.sum(1, keepdims=True)
            o[b, :, n] = p @ v[b, :, kv]
            dp = do[b, :, n] @ v[b, :, kv].T
            ds = p * (dp - (p * dp).sum(1, keepdims=True))
            dq[b, :, n] = ds @ k[b, :, kv] * scale
            dk[b, :, kv] += ds.T @ q[b, :, n] * scale
            dv[b, :, kv] += p.T @ do[b, :, n]
    return o, (dq, dk, dv), max_logit


def np_mla_full(q_nope, q_pe, c_kv, k_pe, w_kvb, lengths, *, dn, scale):
    """MLA decode without absorption: expand per-head keys and values from the latent."""
    B, N, _ = q_nope.shape
    out = np.zeros((B, N, w_kvb.shape[2] - dn))
    for b in range(B):
        L = lengths[b]
        for n in range(N):
            if L == 0:
                continue
            k = np.concatenate([c_kv[b, :L] @ w_kvb[:, n, :dn], k_pe[b, :L]], axis=1)
            v = c_kv[b, :L] @ w_kvb[:, n, dn:]
            s = k @ np.concatenate([q_nope[b, n], q_pe[b, n]]) * scale
            p = np.exp(s - s.max())
            out[b, n] = (p / p.sum()) @ v
    return out


# ------------------------------------------------------------------ flash attention

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                   block_q_dkv=32, block_k_dkv=16)
MIXED2 = BlockSizes(block_q=64, block_k=32, block_q_dq=32, block_k_dq=64,
                    block_q_dkv=16, block_k_dkv=128)
LARGE = BlockSizes(*(256,) * 6)

# (B, T, S, N, K, H, G, causal, blocks, dtype): every N/K in {1,2,4,8}, H != G and H == G,
# causal and not, T = S in {1, 17, 128, 200}, blocks below and above the length, T != S
CASES = [
    (1, 1, 1, 8, 8, 24, 16, True, None, "float32"),
    (2, 1, 1, 8, 1, 16, 16, False, None, "float32"),
    (1, 17, 17, 8, 4, 24, 16, True, SMALL, "float32"),
    (1, 17, 17, 8, 2, 16, 16, False, LARGE, "float32"),
    (2, 128, 128, 8, 1, 24, 16, True, MIXED, "float32"),
    (1, 128, 128, 8, 8, 16, 16, False, None, "float32"),
    (1, 200, 200, 8, 2, 24, 16, True, MIXED2, "float32"),
    (1, 200, 200, 8, 4, 24, 16, False, LARGE, "float32"),
    (1, 200, 200, 4, 4, 16, 16, True, None, "float32"),
    (1, 17, 40, 4, 2, 24, 16, True, SMALL, "float32"),     # queries are the last 17
    (1, 40, 17, 4, 1, 16, 16, True, SMALL, "float32"),     # first 23 queries see nothing
    (1, 17, 40, 4, 4, 24, 32, False, None, "float32"),
    (1, 128, 128, 8, 2, 24, 16, True, SMALL, "bfloat16"),
    (1, 200, 200, 8, 8, 16, 16, False, None, "bfloat16"),
    (2, 17, 17, 8, 1, 24, 16, True, MIXED, "bfloat16"),
]


def _case_id(c):
    B, T, S, N, K, H, G, causal, bs, dt = c
    blocks = "default" if bs is None else f"bq{bs.block_q}bk{bs.block_k}"
    return f"B{B}T{T}S{S}N{N}K{K}H{H}G{G}-{'causal' if causal else 'full'}-{blocks}-{dt}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_flash_attention_matches_float64(case):
    B, T, S, N, K, H, G, causal, bs, dt = case
    dtype = jnp.dtype(dt)
    rng = np.random.default_rng(T * 1000 + S + N * 7 + K)
    q, q64 = randn(rng, (B, T, N, H), dtype, 1.5)  # larger scores: sharper softmax
    k, k64 = randn(rng, (B, S, K, H), dtype)
    v, v64 = randn(rng, (B, S, K, G), dtype)
    do, do64 = randn(rng, (B, T, N, G), dtype)
    scale = H ** -0.5

    @jax.jit
    def fwd_bwd(q, k, v, do):
        f = lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=bs,
                                            return_max_logit=True)
        o, vjp, max_logit = jax.vjp(f, q, k, v, has_aux=True)
        return o, vjp(do), max_logit

    o, grads, max_logit = fwd_bwd(q, k, v, do)
    o_ref, grads_ref, max_logit_ref = np_attention(q64, k64, v64, do64, causal=causal,
                                                   scale=scale)
    assert o.shape == (B, T, N, G) and o.dtype == dtype
    errs = {"o": rel_err(o, o_ref), "max_logit": rel_err(max_logit, max_logit_ref)}
    for name, g, g_ref, x in zip("qkv", grads, grads_ref, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype
        errs["d" + name] = rel_err(g, g_ref)
    assert max(errs.values()) <= TOL[dt], errs


def test_check_is_sensitive_to_the_mask():
    """The comparison above can fail: the causal kernel is far from the full reference."""
    rng = np.random.default_rng(0)
    q, q64 = randn(rng, (1, 17, 2, 16), jnp.float32)
    k, k64 = randn(rng, (1, 17, 1, 16), jnp.float32)
    v, v64 = randn(rng, (1, 17, 1, 16), jnp.float32)
    o = flash_attention(q, k, v, causal=True)
    o_full, _, _ = np_attention(q64, k64, v64, np.zeros((1, 17, 2, 16)), causal=False,
                                scale=0.25)
    assert rel_err(o, o_full) > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_jnp_reference_and_attention_core_agree(causal):
    """attention_reference (the fallback) is the numpy maths, and equals the model's
    attention_core for T == S with the same mask convention."""
    rng = np.random.default_rng(1)
    q, q64 = randn(rng, (2, 33, 6, 24), jnp.float32)
    k, k64 = randn(rng, (2, 33, 3, 24), jnp.float32)
    v, v64 = randn(rng, (2, 33, 3, 8), jnp.float32)
    o_ref, _, max_ref = np_attention(q64, k64, v64, np.zeros((2, 33, 6, 8)), causal=causal,
                                     scale=0.3)
    o, mx = attention_reference(q, k, v, causal=causal, sm_scale=0.3, return_max_logit=True)
    assert rel_err(o, o_ref) <= 2e-5 and rel_err(mx, max_ref) <= 2e-5
    core = attention_core(q, k, v, scale=0.3, causal=causal)
    if isinstance(core, tuple):  # (o, max_logit_N) since QK-clip
        core, core_max = core
        assert rel_err(core_max, max_ref) <= 2e-5
    assert rel_err(core, o_ref) <= 2e-5
    # and the kernel's plain (o only) path, with a non-default scale
    assert rel_err(flash_attention(q, k, v, causal=causal, sm_scale=0.3), o_ref) <= 2e-5


@pytest.mark.parametrize("shapes, match", [
    (((1, 8, 6, 16), (1, 8, 4, 16), (1, 8, 4, 16)), "not divisible by kv heads"),
    (((2, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "batch differs"),
    (((1, 8, 4, 16), (1, 8, 2, 24), (1, 8, 2, 16)), "head dim"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 9, 2, 16)), "must share"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 16)), "wants q"),
    (((1, 0, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "empty"),
])
def test_flash_attention_shape_errors(shapes, match):
    q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


def test_flash_attention_dtype_and_block_errors():
    x = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="float32/bfloat16"):
        flash_attention(x, x, x.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="block_q=48"):
        BlockSizes(block_q=48)
    with pytest.raises(ValueError, match="block_k_dq=8"):
        BlockSizes(block_k_dq=8)


# ------------------------------------------------------------------ MLA decode

@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_mla_decode_matches_reference_and_full_recompute(num_splits, dt):
    """Ragged lengths (0, 1, mid, full) with S = 50 not a multiple of block_s = 16."""
    B, N, R, P, S, dn, dv = 4, 4, 32, 16, 50, 16, 24
    dtype = jnp.dtype(dt)
    rng = np.random.default_rng(num_splits)
    lengths = np.array([0, 1, 29, S])
    q_nope64 = rng.standard_normal((B, N, dn))
    w_kvb64 = rng.standard_normal((R, N, dn + dv)) * R ** -0.5
    # absorb W_UK (the k_nope columns of W_kvb) into the query: q_abs_n = W_UK_n q_nope_n
    q_abs = jnp.asarray(np.einsum("BNd,RNd->BNR", q_nope64, w_kvb64[:, :, :dn]),
                        jnp.float32).astype(dtype)
    q_abs64 = np.asarray(q_abs.astype(jnp.float32), np.float64)
    q_pe, q_pe64 = randn(rng, (B, N, P), dtype)
    c_kv, c_kv64 = randn(rng, (B, S, R), dtype)
    k_pe, k_pe64 = randn(rng, (B, S, P), dtype)
    scale = (dn + P) ** -0.5

    o = mla_decode(q_abs, q_pe, c_kv, k_pe, jnp.asarray(lengths), sm_scale=scale,
                   block_s=16, num_splits=num_splits)
    assert o.shape == (B, N, R) and o.dtype == dtype
    assert np.all(np.asarray(o[0], np.float32) == 0.0)  # length 0 -> zeros

    # absorbed float64 reference
    ref = np.zeros((B, N, R))
    for b in range(1, B):
        L = lengths[b]
        s = (q_abs64[b] @ c_kv64[b, :L].T + q_pe64[b] @ k_pe64[b, :L].T) * scale
        p = np.exp(s - s.max(1, keepdims=True))
        ref[b] = (p / p.sum(1, keepdims=True)) @ c_kv64[b, :L]
    assert rel_err(o, ref) <= TOL[dt]
    assert rel_err(mla_decode_reference(q_abs, q_pe, c_kv, k_pe, jnp.asarray(lengths),
                                        sm_scale=scale), ref) <= TOL[dt]

    # full recompute: per-head keys/values expanded from the latent, then W_UV on o
    if dt == "float32":
        full = np_mla_full(q_nope64, q_pe64, c_kv64, k_pe64, w_kvb64, lengths, dn=dn,
                           scale=scale)
        o_v = np.einsum("BNR,RNv->BNv", np.asarray(o, np.float64), w_kvb64[:, :, dn:])
        assert rel_err(o_v, full) <= TOL[dt]


def test_mla_decode_default_splits_and_short_cache():
    """Defaults (block_s 64 shrunk to the cache, automatic num_splits) and S < 16."""
    rng = np.random.default_rng(7)
    B, N, R, P, S = 2, 16, 64, 16, 9
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    args = (f(B, N, R), f(B, N, P), f(B, S, R), f(B, S, P), jnp.array([9, 4]))
    o = mla_decode(*args, sm_scale=0.1)
    assert rel_err(o, np.asarray(mla_decode_reference(*args, sm_scale=0.1), np.float64)) <= 2e-5


@pytest.mark.parametrize("shapes, kw, match", [
    (((2, 4, 32), (2, 4, 16), (2, 50, 24), (2, 50, 16), (2,)), {}, "c_kv"),
    (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 40, 16), (2,)), {}, "k_pe"),
    (((2, 4, 32), (2, 3, 16), (2, 50, 32), (2, 50, 16), (2,)), {}, "q_pe"),
    (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 50, 16), (3,)), {}, "lengths"),
    (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 50, 16), (2,)), {"block_s": 24}, "block_s"),
    (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 50, 16), (2,)), {"num_splits": 0},
     "num_splits"),
])
def test_mla_decode_shape_errors(shapes, kw, match):
    *xs, lengths = shapes
    args = [jnp.zeros(s, jnp.float32) for s in xs] + [jnp.zeros(lengths, jnp.int32)]
    with pytest.raises(ValueError, match=match):
        mla_decode(*args, sm_scale=1.0, **kw)


# ------------------------------------------------------------------ portability

@pytest.mark.parametrize("platform, target", [("cuda", "__gpu$xla.gpu.triton"),
                                              ("tpu", "tpu_custom_call")])
def test_kernels_lower_to_triton_and_mosaic(platform, target, monkeypatch):
    """Cross-lower (no device needed) forward + backward and decode for GPU (Triton) and
    TPU (Mosaic): catches ops without a lowering rule and non-portable block shapes.
    Compiling the Triton/Mosaic IR to machine code still needs the device."""
    monkeypatch.setattr(jax, "default_backend", lambda: {"cuda": "gpu"}.get(platform, platform))
    bf = jnp.bfloat16
    sd = jax.ShapeDtypeStruct

    def train(q, k, v):  # MLA-like: H = 192 (padded to 256 for Triton), G = 128, g = 3
        o, vjp = jax.vjp(lambda *x: flash_attention(*x, interpret=False), q, k, v)
        return o, vjp(o)

    def decode(*x):
        return mla_decode(*x, sm_scale=0.1, num_splits=3, interpret=False)

    cases = [(train, (sd((2, 100, 12, 192), bf), sd((2, 100, 4, 192), bf),
                      sd((2, 100, 4, 128), bf))),
             (decode, (sd((2, 16, 512), bf), sd((2, 16, 64), bf), sd((2, 300, 512), bf),
                       sd((2, 300, 64), bf), sd((2,), jnp.int32)))]
    for f, args in cases:
        try:
            text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        except ImportError as e:  # a jaxlib built without this backend's dialects
            pytest.skip(f"no {platform} lowering in this jaxlib: {e}")
        assert target in text


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_training_step_pallas_equals_xla(kind):
    """attention.impl=pallas (interpret mode on CPU) gives the XLA path's loss and gradients."""
    from flax import nnx

    from mlalm.config import from_dict
    from mlalm.model import Transformer
    from mlalm.trainer import lm_loss, split_model

    grads, losses = {}, {}
    for impl in ("xla", "pallas"):
        cfg = from_dict({"model": {"vocab_size": 50, "d_model": 32, "n_layers": 2, "ffn_dim": 64,
                                   "max_seq_len": 64},
                         "attention": {"kind": kind, "n_heads": 4, "n_kv_heads": 2 if kind == "gqa" else None,
                                       "head_dim": 8, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                       "qk_rope_head_dim": 4, "v_head_dim": 8, "impl": impl},
                         "moe": {"n_routed_experts": 4, "top_k": 2, "expert_ffn_dim": 16,
                                 "first_k_dense_replace": 1, "dispatch": "dropless"},
                         "train": {"seq_len": 20}})
        graphdef, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
        batch = jax.random.randint(jax.random.key(1), (2, 21), 0, 50)
        (loss, _), g = jax.jit(jax.value_and_grad(
            lambda p: lm_loss(graphdef, p, rest, batch, 0.0), has_aux=True))(params)
        losses[impl], grads[impl] = float(loss), jax.tree.leaves(g)
    assert losses["pallas"] == pytest.approx(losses["xla"], rel=1e-5)
    for gx, gp in zip(grads["xla"], grads["pallas"]):
        scale = float(jnp.max(jnp.abs(gx))) + 1e-12
        assert float(jnp.max(jnp.abs(gx - gp))) <= 2e-5 * scale
