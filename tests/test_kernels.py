"""mlalm.kernels in Pallas interpret mode against independent numpy float64 references.

The references below are written from the formulas (per batch, per head loops, float64),
not from the code under test.  Errors are ``tests/numerics.err``: max|kernel - ref| over
max(max|ref|, floor), the floor being the reference's own sum of |terms| (the size of
the terms that cancel, e.g. in dS = p ∘ (dP - δ), which is exactly 0 with one visible
key).  They must stay under 2e-5 in float32 and 2e-2 in bfloat16, for the output, the
max logit and dq, dk, dv of a random cotangent.  Sizes are small (B <= 2, H, G <= 32)
because interpret mode is slow: each case is one jit of forward + backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlalm.kernels import BlockSizes, attention_reference, flash_attention, mla_decode, mla_decode_reference
from mlalm.model.attention import attention_core
from numerics import as_f64, assert_close, err, float64_ops, term_scale

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def randn(rng, shape, dtype, scale=1.0):
    """A random array in `dtype` and the exact float64 values it holds."""
    x = jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


# ------------------------------------------------------------------ numpy references


def np_attention(q, k, v, do, *, causal, scale):
    """Output and (dq, dk, dv) of softmax(scale·q kᵀ) v per head, in float64.

    Query head n reads kv head n // (N/K); query i sees keys j <= i + S - T when causal;
    a row that sees nothing has p = 0.  Backward: dP = dO vᵀ, dS = P∘(dP - rowsum(P∘dP)).
    Also returns each head's largest visible scaled logit (over batch and positions), and
    the error floors (tests/numerics.py) of o, max_logit, dq, dk, dv: the same sums over
    |terms|, p·|v|, scale·|q|·|k|, scale·p∘(|dP| + |δ|)·|k| (·|q|), pᵀ|dO|.
    """
    B, T, N, H = q.shape
    S, K, G = k.shape[1], k.shape[2], v.shape[3]
    o, dq, dk, dv = (np.zeros(x) for x in ((B, T, N, G), q.shape, k.shape, v.shape))
    floor = dict.fromkeys(("o", "max_logit", "dq", "dk", "dv"), 0.0)
    dk_abs, dv_abs = np.zeros(k.shape), np.zeros(v.shape)
    aq, ak, av, ado = np.abs(q), np.abs(k), np.abs(v), np.abs(do)
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
            delta = (p * dp).sum(1, keepdims=True)
            ds = p * (dp - delta)
            dq[b, :, n] = ds @ k[b, :, kv] * scale
            dk[b, :, kv] += ds.T @ q[b, :, n] * scale
            dv[b, :, kv] += p.T @ do[b, :, n]
            # floors: the same sums over |terms|
            ds_abs = p * (np.abs(dp) + np.abs(delta))
            logit_abs = np.where(visible, aq[b, :, n] @ ak[b, :, kv].T * scale, 0.0)
            floor["max_logit"] = max(floor["max_logit"], logit_abs.max())
            floor["o"] = max(floor["o"], (p @ av[b, :, kv]).max())
            floor["dq"] = max(floor["dq"], (ds_abs @ ak[b, :, kv]).max() * scale)
            dk_abs[b, :, kv] += ds_abs.T @ aq[b, :, n] * scale
            dv_abs[b, :, kv] += p.T @ ado[b, :, n]
    floor["dk"], floor["dv"] = dk_abs.max(), dv_abs.max()
    return o, (dq, dk, dv), max_logit, floor


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
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32, block_k_dkv=16)
MIXED2 = BlockSizes(block_q=64, block_k=32, block_q_dq=32, block_k_dq=64, block_q_dkv=16, block_k_dkv=128)
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
    (1, 17, 40, 4, 2, 24, 16, True, SMALL, "float32"),  # queries are the last 17
    (1, 40, 17, 4, 1, 16, 16, True, SMALL, "float32"),  # first 23 queries see nothing
    (1, 17, 40, 4, 4, 24, 32, False, None, "float32"),
    (1, 128, 128, 8, 2, 24, 16, True, SMALL, "bfloat16"),
    (1, 200, 200, 8, 8, 16, 16, False, None, "bfloat16"),
    (2, 17, 17, 8, 1, 24, 16, True, MIXED, "bfloat16"),
]


def _case_id(c):
    B, T, S, N, K, H, G, causal, bs, dt = c
    blocks = "default" if bs is None else f"bq{bs.block_q}bk{bs.block_k}"
    return f"B{B}T{T}S{S}N{N}K{K}H{H}G{G}-{'causal' if causal else 'full'}-{blocks}-{dt}"


def _flash_inputs(case):
    """(q, k, v, dO) in the case's dtype and their float64 values, from a per-case seed."""
    B, T, S, N, K, H, G, causal, bs, dt = case
    dtype = jnp.dtype(dt)
    rng = np.random.default_rng(T * 1000 + S + N * 7 + K)
    q, q64 = randn(rng, (B, T, N, H), dtype, 1.5)  # larger scores: sharper softmax
    k, k64 = randn(rng, (B, S, K, H), dtype)
    v, v64 = randn(rng, (B, S, K, G), dtype)
    do, do64 = randn(rng, (B, T, N, G), dtype)
    return (q, k, v, do), (q64, k64, v64, do64)


def _flash_fwd_bwd(case):
    """The kernel's forward + VJP for the case, as one jitted function of (q, k, v, dO)."""
    causal, bs = case[7], case[8]

    def fwd_bwd(q, k, v, do):
        f = lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=bs, return_max_logit=True)
        o, vjp, max_logit = jax.vjp(f, q, k, v, has_aux=True)
        return o, vjp(do), max_logit

    return fwd_bwd


def _flash_errors(case, o, grads, max_logit, ref):
    """{name: err} of the kernel's results against np_attention's (with its floors)."""
    o_ref, grads_ref, max_logit_ref, floor = ref
    errs = {"o": err(o, o_ref, floor["o"]), "max_logit": err(max_logit, max_logit_ref, floor["max_logit"])}
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        errs[name] = err(g, g_ref, floor[name])
    return errs


def _check_flash_case(case, expect_dtype):
    (q, k, v, do), x64s = _flash_inputs(case)
    B, T, S, N, K, H, G, causal, bs, dt = case
    o, grads, max_logit = jax.jit(_flash_fwd_bwd(case))(q, k, v, do)
    ref = np_attention(*x64s, causal=causal, scale=H**-0.5)
    assert o.shape == (B, T, N, G) and o.dtype == expect_dtype
    assert max_logit.shape == (N,) and max_logit.dtype == jnp.float32
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == expect_dtype
    errs = _flash_errors(case, o, grads, max_logit, ref)
    assert max(errs.values()) <= TOL[dt], errs
    return o, grads, max_logit, ref


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_flash_attention_matches_float64(case):
    _check_flash_case(case, jnp.dtype(case[-1]))


def test_check_is_sensitive_to_the_mask():
    """The comparison above can fail: the causal kernel is far from the full reference."""
    rng = np.random.default_rng(0)
    q, q64 = randn(rng, (1, 17, 2, 16), jnp.float32)
    k, k64 = randn(rng, (1, 17, 1, 16), jnp.float32)
    v, v64 = randn(rng, (1, 17, 1, 16), jnp.float32)
    o = flash_attention(q, k, v, causal=True)
    o_full, _, _, floor = np_attention(q64, k64, v64, np.zeros((1, 17, 2, 16)), causal=False, scale=0.25)
    assert err(o, o_full, floor["o"]) > 1e-2


def test_error_floor_still_rejects_wrong_gradients():
    """With one key (T = S = 1) the true dq, dk are exactly 0 (p = 1, so dP = δ): the
    floor makes float32 rounding pass, but a wrong gradient of the size of the terms
    still fails, as does a perturbation far below the gradients' size in a generic case."""
    case = CASES[0]
    assert case[1:3] == (1, 1) and case[7]  # B1T1S1, causal
    (q, k, v, do), (q64, k64, v64, do64) = _flash_inputs(case)
    o, (dq, dk, dv), max_logit = jax.jit(_flash_fwd_bwd(case))(q, k, v, do)
    ref = np_attention(q64, k64, v64, do64, causal=True, scale=case[5] ** -0.5)
    _, (dq_ref, dk_ref, _), _, floor = ref
    assert np.max(np.abs(dq_ref)) == 0.0 and np.max(np.abs(dk_ref)) == 0.0
    assert max(_flash_errors(case, o, (dq, dk, dv), max_logit, ref).values()) <= TOL["float32"]
    # dS without its -δ term (dq = c·(dO·v)·k): exactly what a dropped δ would give
    c, g = case[5] ** -0.5, case[3] // case[4]
    dq_no_delta = (
        c * np.einsum("btng,btng->btn", do64, np.repeat(v64, g, 2))[..., None] * np.repeat(k64, g, 2)
    )
    assert err(dq_no_delta, dq_ref, floor["dq"]) > 0.1
    # a nudge of 10·TOL of the floor at one entry fails, in dq and in dk
    for x, x_ref, name in ((dq, dq_ref, "dq"), (dk, dk_ref, "dk")):
        bad = as_f64(x).copy()
        bad.flat[3] += 10 * TOL["float32"] * floor[name]
        assert err(bad, x_ref, floor[name]) > TOL["float32"]
    # generic case (T = S = 17, GQA): the gradients scaled by 1 + 1e-3 fail
    case = CASES[2]
    (q, k, v, do), x64s = _flash_inputs(case)
    o, grads, max_logit = jax.jit(_flash_fwd_bwd(case))(q, k, v, do)
    ref = np_attention(*x64s, causal=case[7], scale=case[5] ** -0.5)
    assert max(_flash_errors(case, o, grads, max_logit, ref).values()) <= TOL["float32"]
    scaled = [as_f64(g) * (1 + 1e-3) for g in grads]
    errs = _flash_errors(case, as_f64(o) * (1 + 1e-3), scaled, as_f64(max_logit) * (1 + 1e-3), ref)
    assert min(errs.values()) > TOL["float32"], errs


# x64 on: every kind of case (T = S = 1, GQA and MQA, T != S both ways, non-causal, the
# three kernels' blocks differing) with float32 inputs must give float32 results and hold
# no float64 value, with the same values as with x64 off.
X64_CASES = [CASES[i] for i in (0, 2, 3, 9, 10)]


@pytest.mark.parametrize("case", X64_CASES, ids=[_case_id(c) for c in X64_CASES])
def test_flash_attention_under_x64(case):
    o32, grads32, max32, ref = _check_flash_case(case, jnp.float32)  # x64 off
    with jax.enable_x64(True):
        (q, k, v, do), _ = _flash_inputs(case)
        assert q.dtype == jnp.float32
        assert float64_ops(_flash_fwd_bwd(case), q, k, v, do) == []
        o, grads, max_logit, _ = _check_flash_case(case, jnp.float32)
    # the same float32 computation either way (index dtypes must not change a value)
    floor = ref[3]
    assert_close(o, o32, rtol=1e-6, scale=floor["o"], what="o")
    assert_close(max_logit, max32, rtol=1e-6, scale=floor["max_logit"], what="max_logit")
    for name, g, g32 in zip(("dq", "dk", "dv"), grads, grads32):
        assert_close(g, g32, rtol=1e-6, scale=floor[name], what=name)


@pytest.mark.parametrize("causal", [True, False])
def test_jnp_reference_and_attention_core_agree(causal):
    """attention_reference (the fallback) is the numpy maths, and equals the model's
    attention_core for T == S with the same mask convention."""
    rng = np.random.default_rng(1)
    q, q64 = randn(rng, (2, 33, 6, 24), jnp.float32)
    k, k64 = randn(rng, (2, 33, 3, 24), jnp.float32)
    v, v64 = randn(rng, (2, 33, 3, 8), jnp.float32)
    o_ref, _, max_ref, floor = np_attention(q64, k64, v64, np.zeros((2, 33, 6, 8)), causal=causal, scale=0.3)
    o, mx = attention_reference(q, k, v, causal=causal, sm_scale=0.3, return_max_logit=True)
    assert_close(o, o_ref, rtol=2e-5, scale=floor["o"], what="attention_reference o")
    assert_close(mx, max_ref, rtol=2e-5, scale=floor["max_logit"], what="max_logit")
    core, core_max = attention_core(q, k, v, scale=0.3, causal=causal)
    assert_close(core_max, max_ref, rtol=2e-5, scale=floor["max_logit"], what="core max_logit")
    assert_close(core, o_ref, rtol=2e-5, scale=floor["o"], what="attention_core o")
    # and the kernel's plain (o only) path, with a non-default scale
    assert_close(
        flash_attention(q, k, v, causal=causal, sm_scale=0.3),
        o_ref,
        rtol=2e-5,
        scale=floor["o"],
        what="flash_attention o",
    )


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 8, 6, 16), (1, 8, 4, 16), (1, 8, 4, 16)), "not divisible by kv heads"),
        (((2, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "batch differs"),
        (((1, 8, 4, 16), (1, 8, 2, 24), (1, 8, 2, 16)), "head dim"),
        (((1, 8, 4, 16), (1, 8, 2, 16), (1, 9, 2, 16)), "must share"),
        (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 16)), "wants q"),
        (((1, 0, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "empty"),
    ],
)
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

DEC = dict(B=4, N=4, R=32, P=16, S=50, dn=16, dv=24)


def _decode_case(num_splits, dt):
    """Absorbed-MLA decode inputs with ragged lengths (0, 1, mid, full), S = 50 not a
    multiple of block_s = 16, and their float64 values and weights."""
    B, N, R, P, S, dn, dv = DEC.values()
    dtype = jnp.dtype(dt)
    rng = np.random.default_rng(num_splits)
    lengths = np.array([0, 1, 29, S])
    q_nope64 = rng.standard_normal((B, N, dn))
    w_kvb64 = rng.standard_normal((R, N, dn + dv)) * R**-0.5
    # absorb W_UK (the k_nope columns of W_kvb) into the query: q_abs_n = W_UK_n q_nope_n
    q_abs = jnp.asarray(np.einsum("BNd,RNd->BNR", q_nope64, w_kvb64[:, :, :dn]), jnp.float32).astype(dtype)
    q_pe, q_pe64 = randn(rng, (B, N, P), dtype)
    c_kv, c_kv64 = randn(rng, (B, S, R), dtype)
    k_pe, k_pe64 = randn(rng, (B, S, P), dtype)
    args = (q_abs, q_pe, c_kv, k_pe, jnp.asarray(lengths, jnp.int32))
    return args, (as_f64(q_abs), q_pe64, c_kv64, k_pe64, lengths), q_nope64, w_kvb64


def np_mla_absorbed(q_abs, q_pe, c_kv, k_pe, lengths, *, scale):
    """Absorbed decode in float64, and the floor of each output: Σ_s p_s |c_kv_s|
    (the output is a convex combination of cache rows)."""
    B, N, R = q_abs.shape
    ref, ref_abs = np.zeros((B, N, R)), np.zeros((B, N, R))
    for b in range(B):
        L = lengths[b]
        if L == 0:
            continue
        s = (q_abs[b] @ c_kv[b, :L].T + q_pe[b] @ k_pe[b, :L].T) * scale
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ref[b], ref_abs[b] = p @ c_kv[b, :L], p @ np.abs(c_kv[b, :L])
    return ref, ref_abs


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_mla_decode_matches_reference_and_full_recompute(num_splits, dt):
    """Ragged lengths (0, 1, mid, full) with S = 50 not a multiple of block_s = 16."""
    B, N, R, dn = DEC["B"], DEC["N"], DEC["R"], DEC["dn"]
    dtype = jnp.dtype(dt)
    args, args64, q_nope64, w_kvb64 = _decode_case(num_splits, dt)
    scale = (dn + DEC["P"]) ** -0.5

    o = mla_decode(*args, sm_scale=scale, block_s=16, num_splits=num_splits)
    assert o.shape == (B, N, R) and o.dtype == dtype
    assert np.all(np.asarray(o[0], np.float32) == 0.0)  # length 0 -> zeros

    ref, ref_abs = np_mla_absorbed(*args64, scale=scale)
    assert_close(o, ref, rtol=TOL[dt], scale=ref_abs.max(), what="mla_decode")
    assert_close(
        mla_decode_reference(*args, sm_scale=scale),
        ref,
        rtol=TOL[dt],
        scale=ref_abs.max(),
        what="mla_decode_reference",
    )

    # full recompute: per-head keys/values expanded from the latent, then W_UV on o
    if dt == "float32":
        _, q_pe64, c_kv64, k_pe64, lengths = args64
        full = np_mla_full(q_nope64, q_pe64, c_kv64, k_pe64, w_kvb64, lengths, dn=dn, scale=scale)
        w_uv = w_kvb64[:, :, dn:]
        o_v = np.einsum("BNR,RNv->BNv", as_f64(o), w_uv)
        assert_close(o_v, full, rtol=TOL[dt], scale=term_scale("BNR,RNv->BNv", ref_abs, w_uv), what="o·W_UV")


def test_mla_decode_default_splits_and_short_cache():
    """Defaults (block_s 64 shrunk to the cache, automatic num_splits) and S < 16."""
    rng = np.random.default_rng(7)
    B, N, R, P, S = 2, 16, 64, 16, 9
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    args = (f(B, N, R), f(B, N, P), f(B, S, R), f(B, S, P), jnp.array([9, 4]))
    o = mla_decode(*args, sm_scale=0.1)
    ref, ref_abs = np_mla_absorbed(*(as_f64(a) for a in args[:4]), [9, 4], scale=0.1)
    assert_close(o, ref, rtol=2e-5, scale=ref_abs.max(), what="mla_decode")


def test_mla_decode_under_x64():
    """x64 on: float32 in, float32 out, no float64 value, the float64 reference's result
    and the same values as with x64 off."""
    scale = (DEC["dn"] + DEC["P"]) ** -0.5
    decode = lambda *a: mla_decode(*a, sm_scale=scale, block_s=16, num_splits=3)
    args, args64, _, _ = _decode_case(3, "float32")
    o32 = decode(*args)
    ref, ref_abs = np_mla_absorbed(*args64, scale=scale)
    with jax.enable_x64(True):
        args, _, _, _ = _decode_case(3, "float32")
        args = args[:4] + (args[4].astype(jnp.int64),)  # int64 lengths, as x64 code passes
        assert float64_ops(decode, *args) == []
        o = decode(*args)
    assert o.dtype == jnp.float32
    assert_close(o, ref, rtol=2e-5, scale=ref_abs.max(), what="mla_decode under x64")
    assert_close(o, o32, rtol=1e-6, scale=ref_abs.max(), what="x64 on vs off")


@pytest.mark.parametrize(
    "shapes, kw, match",
    [
        (((2, 4, 32), (2, 4, 16), (2, 50, 24), (2, 50, 16), (2,)), {}, "c_kv"),
        (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 40, 16), (2,)), {}, "k_pe"),
        (((2, 4, 32), (2, 3, 16), (2, 50, 32), (2, 50, 16), (2,)), {}, "q_pe"),
        (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 50, 16), (3,)), {}, "lengths"),
        (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 50, 16), (2,)), {"block_s": 24}, "block_s"),
        (((2, 4, 32), (2, 4, 16), (2, 50, 32), (2, 50, 16), (2,)), {"num_splits": 0}, "num_splits"),
    ],
)
def test_mla_decode_shape_errors(shapes, kw, match):
    *xs, lengths = shapes
    args = [jnp.zeros(s, jnp.float32) for s in xs] + [jnp.zeros(lengths, jnp.int32)]
    with pytest.raises(ValueError, match=match):
        mla_decode(*args, sm_scale=1.0, **kw)


# ------------------------------------------------------------------ portability


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("platform, target", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
def test_kernels_lower_to_triton_and_mosaic(platform, target, x64, monkeypatch):
    """Cross-lower (no device needed) forward + backward and decode for GPU (Triton) and
    TPU (Mosaic), with jax_enable_x64 off and on: catches ops without a lowering rule,
    non-portable block shapes and int32/int64 index mixing.  Compiling the Triton/Mosaic
    IR to machine code still needs the device."""
    monkeypatch.setattr(jax, "default_backend", lambda: {"cuda": "gpu"}.get(platform, platform))
    bf = jnp.bfloat16
    sd = jax.ShapeDtypeStruct

    def train(q, k, v):  # MLA-like: H = 192 (padded to 256 for Triton), G = 128, g = 3
        o, vjp = jax.vjp(lambda *x: flash_attention(*x, interpret=False), q, k, v)
        return o, vjp(o)

    def decode(*x):
        return mla_decode(*x, sm_scale=0.1, num_splits=3, interpret=False)

    cases = [
        (train, (sd((2, 100, 12, 192), bf), sd((2, 100, 4, 192), bf), sd((2, 100, 4, 128), bf))),
        (
            decode,
            (
                sd((2, 16, 512), bf),
                sd((2, 16, 64), bf),
                sd((2, 300, 512), bf),
                sd((2, 300, 64), bf),
                sd((2,), jnp.int32),
            ),
        ),
    ]
    for f, args in cases:
        try:
            with jax.enable_x64(x64):
                text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        except ImportError as e:  # a jaxlib built without this backend's dialects
            pytest.skip(f"no {platform} lowering in this jaxlib: {e}")
        assert target in text


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_training_step_pallas_equals_xla(kind):
    """attention.impl=pallas (interpret mode on CPU) gives the XLA path's loss and gradients."""
    from flax import nnx

    from mlalm.config import from_dict
    from mlalm.model import Transformer
    from mlalm.train import lm_loss, split_model

    grads, losses = {}, {}
    for impl in ("xla", "pallas"):
        cfg = from_dict(
            {
                "model": {"vocab_size": 50, "d_model": 32, "n_layers": 2, "ffn_dim": 64, "max_seq_len": 64},
                "attention": {
                    "kind": kind,
                    "n_heads": 4,
                    "n_kv_heads": 2 if kind == "gqa" else None,
                    "head_dim": 8,
                    "kv_lora_rank": 16,
                    "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4,
                    "v_head_dim": 8,
                    "impl": impl,
                },
                "moe": {
                    "n_routed_experts": 4,
                    "top_k": 2,
                    "expert_ffn_dim": 16,
                    "first_k_dense_replace": 1,
                    "dispatch": "dropless",
                },
                "train": {"seq_len": 20},
            }
        )
        graphdef, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
        batch = jax.random.randint(jax.random.key(1), (2, 21), 0, 50)
        (loss, _), g = jax.jit(
            jax.value_and_grad(lambda p: lm_loss(graphdef, p, rest, batch, 0.0), has_aux=True)
        )(params)
        losses[impl], grads[impl] = float(loss), jax.tree_util.tree_leaves_with_path(g)
    assert losses["pallas"] == pytest.approx(losses["xla"], rel=1e-5)
    # per leaf, relative (no floor): each leaf's gradient sums 40 tokens' outer products
    # and none cancels to 0 (their max|.| span 1e-4..1e-1); one that did would read as an
    # infinite error here, never as a pass
    for (path, gx), (_, gp) in zip(grads["xla"], grads["pallas"]):
        assert_close(gp, gx, rtol=2e-5, what=jax.tree_util.keystr(path))
