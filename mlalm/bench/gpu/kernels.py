"""Stage ``kernels``: mlalm's Pallas kernels compiled for the device (the Pallas
interpreter on CPU) against float64 references computed in numpy from the formulas.

Flash attention: output, each head's max logit and the gradients dq, dk, dv of a random
cotangent, over MLA widths (d_qk ≠ d_v), GQA and MQA, causal and not, T ≠ S both ways,
lengths that are not a multiple of the block, float32 and bfloat16.  MLA decode: the
latent output over ragged cache lengths (0, 1, mid, full), S not a multiple of the block.
The plain-jnp fallbacks (``attention_reference``, ``mla_decode_reference``) are checked
on the device against the same float64 truth.

Error: ``common.err`` (relative where the reference is large, against the sum of |terms|
where it cancels).  Tolerances: bfloat16 2e-2 (inputs are bf16-exact, so this is the
kernel's own rounding: p is cast to bf16 before p·v, 2^-8 relative); float32 1e-4 (the
interpreter meets 2e-5 in tests/test_kernels.py; a GPU adds its approximate exp and a
different summation order; a wrong gradient or mask errs by more than 1e-1).
"""

from __future__ import annotations

import functools

import numpy as np

from mlalm.bench.gpu.common import err, f64, log, short_error

TOL = {"float32": 1e-4, "bfloat16": 2e-2}
_einsum = functools.partial(np.einsum, optimize=True)  # BLAS for the float64 references
PARTS = ("main",)

# flash cases: (B, T, S, N, K, H, G, causal, dtype)
_GPU_FLASH = [
    (2, 300, 300, 8, 8, 192, 128, True, "bfloat16"),  # MLA widths, T not a multiple of 64
    (2, 300, 300, 8, 2, 64, 64, False, "bfloat16"),  # GQA, not causal
    (1, 100, 260, 8, 1, 96, 64, True, "bfloat16"),  # MQA, queries are the last 100
    (1, 260, 100, 4, 2, 96, 64, True, "float32"),  # T > S: the first 160 rows see nothing
    (1, 512, 512, 4, 4, 192, 128, True, "float32"),  # MLA widths, whole default tiles
]
_DRY_FLASH = [(1, 24, 40, 4, 2, 24, 16, True, "float32")]
# decode cases: (B, N, R, P, S, dtype); lengths (0, 1, S // 2 + 17, S) cycled over B
_GPU_DECODE = [
    (4, 16, 512, 64, 1000, "bfloat16"),
    (4, 16, 512, 64, 1000, "float32"),
    (2, 12, 256, 32, 4096, "bfloat16"),
]
_DRY_DECODE = [(4, 4, 32, 16, 50, "bfloat16")]


def spec(dry: bool, stage: str) -> dict:
    if dry:  # small blocks so that the tiny lengths still span several tiles
        return {"flash": _DRY_FLASH, "decode": _DRY_DECODE, "blocks": 16, "decode_block": 16}
    return {"flash": _GPU_FLASH, "decode": _GPU_DECODE, "blocks": None, "decode_block": None}


def attention_f64(q, k, v, do, *, causal: bool, scale: float):
    """Output, max logit per head, (dq, dk, dv) and the error floors, in float64.

    Query head n reads kv head n // (N/K); query i sees keys j <= i + S - T when causal; a
    row that sees nothing has p = 0.  Backward: dP = dO vᵀ, δ = rowsum(p ∘ dP),
    dS = p ∘ (dP - δ), dq = c·dS k, dk = c·dSᵀ q, dv = pᵀ dO (summed over the heads that
    share a kv head).  Floors: the same sums over |terms|.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    g = N // K
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = _einsum("btnh,bsnh->bnts", q, kr) * scale
    vis = np.ones((T, S), bool)
    if causal:
        vis = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / np.where(l == 0, 1.0, l)
    o = _einsum("bnts,bsng->btng", p, vr)
    dp = _einsum("btng,bsng->bnts", do, vr)
    delta = np.sum(p * dp, -1, keepdims=True)
    ds = p * (dp - delta)
    ds_abs = p * (np.abs(dp) + np.abs(delta))

    def per_kv(x_BSNW):  # sum the g query heads of each kv head
        return x_BSNW.reshape(B, S, K, g, -1).sum(3)

    dq = _einsum("bnts,bsnh->btnh", ds, kr) * scale
    dk = per_kv(_einsum("bnts,btnh->bsnh", ds, q)) * scale
    dv = per_kv(_einsum("bnts,btng->bsng", p, do))
    max_logit = np.max(np.where(vis, s, -np.inf), axis=(0, 2, 3))
    floors = {
        "o": _einsum("bnts,bsng->btng", p, np.abs(vr)).max(),
        "max_logit": (np.where(vis, _einsum("btnh,bsnh->bnts", np.abs(q), np.abs(kr)), 0).max() * scale),
        "dq": _einsum("bnts,bsnh->btnh", ds_abs, np.abs(kr)).max() * scale,
        "dk": per_kv(_einsum("bnts,btnh->bsnh", ds_abs, np.abs(q))).max() * scale,
        "dv": per_kv(_einsum("bnts,btng->bsng", p, np.abs(do))).max(),
    }
    return o, max_logit, (dq, dk, dv), floors


def decode_f64(q_abs, q_pe, c_kv, k_pe, lengths, *, scale: float):
    """Absorbed MLA decode in float64 and its floor max Σ_s p_s |c_kv_s| (the output is a
    convex combination of cache rows); length 0 gives zeros."""
    s = (_einsum("bnr,bsr->bns", q_abs, c_kv) + _einsum("bnp,bsp->bns", q_pe, k_pe)) * scale
    valid = np.arange(c_kv.shape[1])[None, None, :] < np.asarray(lengths)[:, None, None]
    s = np.where(valid, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.where(valid, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / np.where(l == 0, 1.0, l)
    return _einsum("bns,bsr->bnr", p, c_kv), _einsum("bns,bsr->bnr", p, np.abs(c_kv)).max()


def _randn(rng, shape, dtype, scale=1.0):
    """A random device array in ``dtype`` and the float64 values it holds exactly."""
    import jax.numpy as jnp

    x = jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)
    return x, f64(x)


def flash_case(case, blocks) -> dict:
    """{'errors': {o, max_logit, dq, dk, dv, reference_o}, 'tol', 'ok'} of one flash case."""
    import jax
    import jax.numpy as jnp

    from mlalm.kernels import BlockSizes, attention_reference, flash_attention

    B, T, S, N, K, H, G, causal, dt = case
    rng = np.random.default_rng(T * 1000 + S + 7 * N + K)
    q, q64 = _randn(rng, (B, T, N, H), dt, 1.5)  # larger scores: a sharper softmax
    k, k64 = _randn(rng, (B, S, K, H), dt)
    v, v64 = _randn(rng, (B, S, K, G), dt)
    do, do64 = _randn(rng, (B, T, N, G), dt)
    bs = BlockSizes(*(blocks,) * 6) if blocks else None

    @jax.jit
    def fwd_bwd(q, k, v, do):
        f = lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=bs, return_max_logit=True)
        (o, mx), vjp = jax.vjp(f, q, k, v)
        return o, mx, vjp((do, jnp.zeros_like(mx)))  # the max logit has no gradient

    o, mx, grads = fwd_bwd(q, k, v, do)
    o_ref, mx_ref, grads_ref, fl = attention_f64(q64, k64, v64, do64, causal=causal, scale=H**-0.5)
    errors = {"o": err(f64(o), o_ref, fl["o"]), "max_logit": err(f64(mx), mx_ref, fl["max_logit"])}
    for name, gr, gr_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        errors[name] = err(f64(gr), gr_ref, fl[name])
    fallback = jax.jit(lambda q, k, v: attention_reference(q, k, v, causal=causal))(q, k, v)
    errors["reference_o"] = err(f64(fallback), o_ref, fl["o"])
    return {"errors": errors, "tol": TOL[dt], "ok": max(errors.values()) <= TOL[dt]}


def decode_case(case, block_s) -> dict:
    """{'errors': {o, reference_o}, 'tol', 'ok'} of one MLA decode case."""
    import jax
    import jax.numpy as jnp

    from mlalm.kernels import mla_decode, mla_decode_reference

    B, N, R, P, S, dt = case
    rng = np.random.default_rng(S + N)
    scale = 2.0 * (R + P) ** -0.5  # scores of standard deviation ~2: a peaked softmax
    q_abs, qa64 = _randn(rng, (B, N, R), dt)
    q_pe, qp64 = _randn(rng, (B, N, P), dt)
    c_kv, c64 = _randn(rng, (B, S, R), dt)
    k_pe, kp64 = _randn(rng, (B, S, P), dt)
    lengths = np.array([(0, 1, S // 2 + 17, S)[b % 4] for b in range(B)])
    args = (q_abs, q_pe, c_kv, k_pe, jnp.asarray(lengths, jnp.int32))
    o = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale, block_s=block_s))(*args)
    fallback = jax.jit(lambda *a: mla_decode_reference(*a, sm_scale=scale))(*args)
    ref, floor = decode_f64(qa64, qp64, c64, kp64, lengths, scale=scale)
    errors = {"o": err(f64(o), ref, floor), "reference_o": err(f64(fallback), ref, floor)}
    zero_rows = bool(np.all(f64(o)[lengths == 0] == 0.0))
    return {
        "errors": errors,
        "tol": TOL[dt],
        "zero_length_gives_zeros": zero_rows,
        "ok": max(errors.values()) <= TOL[dt] and zero_rows,
    }


def run(part: str, spec: dict, out) -> None:
    import jax

    out["interpret"] = jax.default_backend() == "cpu"
    out["tolerances"] = TOL
    out["flash"], out["decode"] = [], []
    for kind, cases, fn, arg in (
        ("flash", spec["flash"], flash_case, spec["blocks"]),
        ("decode", spec["decode"], decode_case, spec["decode_block"]),
    ):
        keys = (
            ("B", "T", "S", "N", "K", "H", "G", "causal", "dtype")
            if kind == "flash"
            else ("B", "N", "R", "P", "S", "dtype")
        )
        for case in cases:
            row: dict = dict(zip(keys, case, strict=True))
            try:
                row.update(fn(tuple(case), arg))
            except Exception as e:  # noqa: BLE001 - one case's failure must not hide the rest
                row.update(ok=False, error=short_error(e, 600))
            log(f"{kind} {row}")
            out[kind].append(row)
            out.save()
    bad = [r for r in out["flash"] + out["decode"] if not r["ok"]]
    out["cases"], out["failed_cases"] = len(out["flash"]) + len(out["decode"]), len(bad)
    out["all_ok"] = not bad
    out.save()
    if bad:
        raise RuntimeError(
            f"{len(bad)} of {out['cases']} kernel cases exceed their tolerance or "
            f"failed: " + "; ".join(_describe(r) for r in bad)[:1500]
        )


def _describe(row: dict) -> str:
    shape = {k: row[k] for k in row if k in ("B", "T", "S", "N", "K", "H", "G", "R", "P", "causal", "dtype")}
    if "error" in row:
        return f"{shape}: {row['error']}"
    return f"{shape}: errors {row['errors']} > {row['tol']}"
