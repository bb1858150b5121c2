"""MLA decode over the latent cache with absorbed weights, split-K (flash-decoding).

With W_UK folded into the query (q_abs_n = q_nope_n · W_UK_n, width R) every head reads
the same cache row [c_kv_s; k_pe_s] (width R + P), so decode is MQA with one kv head:
    s_ns = c · (q_abs_n · c_kv_s + q_pe_n · k_pe_s)     for s < length_b, else masked
    o_n  = Σ_s softmax(s_n)_s c_kv_s                    (value = the latent itself, width R)
W_UV and W_o are applied to o afterwards by the caller.

One program per (sequence, split) reads a contiguous chunk of the cache once for all N heads
(the [N, block_s] score tile) and returns a partial (m, l, a): running max, sum of
exp(s - m) and unnormalised accumulator.  The partials of the splits j combine exactly as
    M = max_j m_j,  w_j = exp(m_j - M),  o = Σ_j w_j a_j / Σ_j w_j l_j,
in plain jnp.  Splitting the key axis keeps the GPU busy when B·(one program) is far too
few programs to saturate memory bandwidth, which is the whole game in decode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlalm.kernels.common import _MIN_BLOCK, NEG_INF, _dot, _fit, _fori, _i32
from mlalm.utils import round_up

_TARGET_PROGRAMS = 128  # about one program per SM on an H100 (132 SMs)


def mla_decode_reference(q_abs_BNR, q_pe_BNP, c_kv_BSR, k_pe_BSP, lengths_B, *, sm_scale):
    """Plain-jnp absorbed MLA decode (the definition and the fallback).

    Args:
        q_abs_BNR: absorbed no-rope queries; q_pe_BNP: rotated rope queries.
        c_kv_BSR: latent cache; k_pe_BSP: rope-key cache (one for all heads).
        lengths_B: valid cache length per sequence (keys s >= length are masked).
        sm_scale: score scale, (d_n + d_r)**-0.5 for MLA.
    Returns:
        o_BNR in the dtype of q_abs (zeros where length is 0); float32 softmax.
    """
    hi = lax.Precision.HIGHEST
    s = (
        jnp.einsum("BNR,BSR->BNS", q_abs_BNR, c_kv_BSR, precision=hi, preferred_element_type=jnp.float32)
        + jnp.einsum("BNP,BSP->BNS", q_pe_BNP, k_pe_BSP, precision=hi, preferred_element_type=jnp.float32)
    ) * sm_scale
    mask = jnp.arange(c_kv_BSR.shape[1])[None, None, :] < lengths_B[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("BNS,BSR->BNR", p / jnp.where(l == 0, 1.0, l), c_kv_BSR.astype(jnp.float32), precision=hi)
    return o.astype(q_abs_BNR.dtype)


def _decode_kernel(
    len_ref, qa_ref, qp_ref, c_ref, kp_ref, acc_ref, m_ref, l_ref, *, block_s, chunk, sm_scale, precision
):
    length = len_ref[pl.program_id(0), 0]
    start = pl.program_id(1) * chunk  # first cache position of this split
    # only blocks holding a position < length: ceil((length - start) / block_s), clipped
    n_blocks = jnp.minimum(
        jnp.maximum(lax.div(length - start + block_s - 1, _i32(block_s)), 0), chunk // block_s
    )
    qa, qp = qa_ref[...], qp_ref[...]
    N, R = qa.shape

    def body(j, carry):
        acc, m, l = carry
        off = j * block_s
        c = c_ref[pl.ds(off, block_s), :]
        kp = kp_ref[pl.ds(off, block_s), :]
        s = (_dot(qa, c, 1, 1, precision) + _dot(qp, kp, 1, 1, precision)) * sm_scale
        valid = start + off + lax.broadcasted_iota(jnp.int32, (N, block_s), 1) < length
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(c.dtype), c, 1, 0, precision)
        return acc, m_new, l

    init = (
        jnp.zeros((N, R), jnp.float32),
        jnp.full((N, 1), NEG_INF, jnp.float32),
        jnp.zeros((N, 1), jnp.float32),
    )
    acc, m, l = _fori(0, n_blocks, body, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _check(q_abs, q_pe, c_kv, k_pe, lengths):
    if q_abs.ndim != 3 or q_pe.ndim != 3 or c_kv.ndim != 3 or k_pe.ndim != 3:
        raise ValueError(
            f"mla_decode wants q_abs [B,N,R], q_pe [B,N,P], c_kv [B,S,R], "
            f"k_pe [B,S,P]; got {q_abs.shape}, {q_pe.shape}, {c_kv.shape}, "
            f"{k_pe.shape}"
        )
    (B, N, R), (_, _, P) = q_abs.shape, q_pe.shape
    if q_pe.shape[:2] != (B, N):
        raise ValueError(f"q_pe{q_pe.shape} must match q_abs{q_abs.shape} in [B, N]")
    if c_kv.shape[0] != B or c_kv.shape[2] != R:
        raise ValueError(f"c_kv{c_kv.shape} must be [B={B}, S, R={R}] to match q_abs{q_abs.shape}")
    if k_pe.shape != (B, c_kv.shape[1], P):
        raise ValueError(f"k_pe{k_pe.shape} must be [B, S, P] = {(B, c_kv.shape[1], P)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths{lengths.shape} must be [B={B}]")
    if min(B, N, R, P, c_kv.shape[1]) == 0:
        raise ValueError(f"empty dimension in q_abs{q_abs.shape}, q_pe{q_pe.shape}, c_kv{c_kv.shape}")


def mla_decode(
    q_abs_BNR,
    q_pe_BNP,
    c_kv_BSR,
    k_pe_BSP,
    lengths_B,
    *,
    sm_scale,
    block_s: int | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
):
    """Absorbed-MLA decode attention for one new query per sequence.

    Args:
        q_abs_BNR: q_nope · W_UK per head [B, N, R].
        q_pe_BNP: rotated rope part of the query [B, N, P].
        c_kv_BSR, k_pe_BSP: the latent cache [B, S, R] and rope-key cache [B, S, P].
            S need not be a multiple of anything, but when num_splits·chunk != S the
            cache is copied once into a padded buffer: allocate S as a multiple of
            num_splits·block_s to avoid that.
        lengths_B: int valid lengths (clipped to [0, S]); length 0 gives zeros.
        sm_scale: score scale.
        block_s: cache rows per inner step (power of two >= 16, default 64).
        num_splits: chunks of the cache processed in parallel, default enough programs
            to fill a GPU (about 128 over the batch) with >= 4 blocks each.
        interpret: run the Pallas interpreter; None means on a CPU backend.
    Returns:
        o_BNR (latent output; apply W_UV then W_o) in the dtype of q_abs.
    Raises:
        ValueError: naming the shape that cannot work.
    """
    _check(q_abs_BNR, q_pe_BNP, c_kv_BSR, k_pe_BSP, lengths_B)
    B, N, R = q_abs_BNR.shape
    S, P = c_kv_BSR.shape[1], k_pe_BSP.shape[2]
    block_s = 64 if block_s is None else block_s
    if not isinstance(block_s, int) or block_s < _MIN_BLOCK or block_s & (block_s - 1):
        raise ValueError(f"block_s={block_s!r}: must be a power of two >= {_MIN_BLOCK}")
    bs = _fit(block_s, S)
    n_blocks = -(-S // bs)
    if num_splits is None:
        num_splits = max(1, min(-(-n_blocks // 4), -(-_TARGET_PROGRAMS // B)))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r}: must be an int >= 1")
    chunk = round_up(-(-S // num_splits), bs)
    s_pad = num_splits * chunk
    backend = jax.default_backend()
    interpret = backend == "cpu" if interpret is None else bool(interpret)
    len_spec = pl.BlockSpec((B, 1), lambda b, j: (0, 0))  # all lengths; each reads one
    if backend == "tpu" and not interpret:
        from jax.experimental.pallas import tpu as pltpu

        n_p, r_p, p_p, params = N, R, P, None
        len_spec = pl.BlockSpec(memory_space=pltpu.SMEM)  # Mosaic reads scalars from SMEM
    else:  # Triton: power-of-two tiles, tl.dot dims >= 16
        n_p, r_p, p_p = (max(_MIN_BLOCK, pl.next_power_of_2(d)) for d in (N, R, P))
        params = None
        if backend == "gpu" and not interpret:  # select Triton, not Mosaic GPU
            from jax.experimental.pallas import triton as pltriton

            params = pltriton.CompilerParams()
    dtype = q_abs_BNR.dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT

    def pad(x, rows, width):
        if x.shape[1:] == (rows, width):
            return x  # the usual case: no copy of the cache
        return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, width - x.shape[2])))

    qa, qp = pad(q_abs_BNR, n_p, r_p), pad(q_pe_BNP.astype(dtype), n_p, p_p)
    c, kp = pad(c_kv_BSR.astype(dtype), s_pad, r_p), pad(k_pe_BSP.astype(dtype), s_pad, p_p)
    lengths = jnp.clip(lengths_B.astype(jnp.int32), 0, S).reshape(B, 1)

    kernel = functools.partial(
        _decode_kernel, block_s=bs, chunk=chunk, sm_scale=float(sm_scale), precision=precision
    )
    part = lambda w: pl.BlockSpec((None, None, n_p, w), lambda b, j: (b, j, 0, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(B, num_splits),
        in_specs=[
            len_spec,
            pl.BlockSpec((None, n_p, r_p), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, n_p, p_p), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, chunk, r_p), lambda b, j: (b, j, 0)),
            pl.BlockSpec((None, chunk, p_p), lambda b, j: (b, j, 0)),
        ],
        out_specs=[part(r_p), part(1), part(1)],
        out_shape=[jax.ShapeDtypeStruct((B, num_splits, n_p, w), jnp.float32) for w in (r_p, 1, 1)],
        interpret=interpret,
        compiler_params=params,
        name="mlalm_mla_decode",
    )(lengths, qa, qp, c, kp)

    # combine the splits: empty splits have l = 0, a = 0 and drop out; if all are empty
    # (length 0) the denominator is 0 and the output is defined as 0
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))
    num = jnp.sum(w * acc, axis=1)
    den = jnp.sum(w * l, axis=1)
    o = num / jnp.where(den == 0, 1.0, den)
    return o[:, :N, :R].astype(dtype)
