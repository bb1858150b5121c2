"""Flash attention in Pallas: forward with saved log-sum-exp, backward as two kernels.

Maths (one query row i, keys j, scale c):
    s_ij = c · q_i·k_j           (masked: s_ij = -inf)
    p_ij = exp(s_ij - L_i),      L_i = log Σ_j exp(s_ij)        (the saved log-sum-exp)
    o_i  = Σ_j p_ij v_j
Forward (online softmax, FlashAttention-2): walk the key blocks keeping a running max m,
running sum l and unnormalised accumulator a; on a new block with scores s
    m' = max(m, rowmax s),  α = exp(m - m'),  l' = α l + Σ exp(s - m'),  a' = α a + exp(s - m') v
and finally o = a / l, L = m + log l.
Backward, with δ_i = Σ_g dO_ig O_ig (= Σ_j p_ij dP_ij):
    dP = dO vᵀ,  dS = p ∘ (dP - δ),  dq = c · dS k,  dk = c · dSᵀ q,  dv = pᵀ dO
one kernel owns a query block and walks keys (dq), the other owns a key block and walks
the queries of every query head that shares its kv head (dk, dv summed in float32).
The forward also emits each row's final m (the largest visible scaled logit), from which
the wrapper returns the per-head max logit QK-clip needs, at no extra pass.

Layout inside the wrapper: q is transposed to [B, K, M, H] with M = g·Tp, the g = N/K query
heads of kv head K stacked along the rows (a free reshape of [B, N, Tp, H]), so query head
n = K·g + j uses kv head n // g by construction and K/V are never repeated.  Lengths are
padded to whole blocks (padded keys masked, padded query rows sliced off); on GPU and in
interpret mode head dims are padded to a power of two, which Triton requires (zero columns
change no dot product).  Kernels use only ref slicing, ``jnp``/``lax`` ops and BlockSpecs,
so the same code lowers through Triton (GPU) and Mosaic (TPU).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlalm.kernels.common import _MIN_BLOCK, NEG_INF, _call, _dot, _fit, _fori, _i32, _rows, _whole
from mlalm.utils import round_up


# A finite "minus infinity": exp(NEG_INF - m) underflows to 0 without inf - inf = nan.
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) for the three kernels, plus GPU launch hints.

    Blocks larger than a (padded) length are shrunk to fit, so small inputs never pay for
    a 128-row tile.  ``num_warps``/``num_stages`` only reach Triton (ignored elsewhere).
    """

    block_q: int = 64  # forward: query rows per program
    block_k: int = 64  # forward: keys per inner-loop step
    block_q_dq: int = 64  # dq kernel: query rows per program
    block_k_dq: int = 32  # dq kernel: keys per inner-loop step
    block_q_dkv: int = 32  # dk/dv kernel: query rows per inner-loop step
    block_k_dkv: int = 64  # dk/dv kernel: keys per program
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
            b = getattr(self, f)
            if not isinstance(b, int) or b < _MIN_BLOCK or b & (b - 1):
                raise ValueError(f"BlockSizes.{f}={b!r}: must be a power of two >= {_MIN_BLOCK}")


def attention_reference(
    q_BTNH, k_BSKH, v_BSKG, *, causal: bool = True, sm_scale=None, return_max_logit: bool = False
):
    """Plain-jnp attention with the kernel's semantics (the readable definition, and the
    fallback where Pallas is unavailable).

    Query i attends keys j <= i + (S - T) when causal (bottom-right aligned); a query that
    sees no key outputs zeros.  Scores and softmax in float32.

    Args:
        q_BTNH: queries; k_BSKH: keys; v_BSKG: values, K dividing N.
        causal: apply the causal mask.  sm_scale: defaults to H**-0.5.
        return_max_logit: also return max_logit_N as :func:`flash_attention` does.
    Returns:
        o_BTNG in the dtype of q (and max_logit_N).
    """
    B, T, N, H = q_BTNH.shape
    S, K, G = k_BSKH.shape[1], k_BSKH.shape[2], v_BSKG.shape[-1]
    c = H**-0.5 if sm_scale is None else sm_scale
    q = q_BTNH.reshape(B, T, K, N // K, H)  # query head n = K·g + j uses kv head n // g
    s = (
        jnp.einsum(
            "BTKgH,BSKH->BKgTS",
            q,
            k_BSKH,
            preferred_element_type=jnp.float32,
            precision=lax.Precision.HIGHEST,
        )
        * c
    )
    if causal:
        mask = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
        s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no visible key: all p = 0
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    o = jnp.einsum("BKgTS,BSKG->BTKgG", p, v_BSKG.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    o_BTNG = o.reshape(B, T, N, G).astype(q_BTNH.dtype)
    if not return_max_logit:
        return o_BTNG
    return o_BTNG, lax.stop_gradient(jnp.max(s, axis=(0, 3, 4)).reshape(N))


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static facts the kernels are specialised on (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    sm_scale: float
    g: int  # query heads per kv head
    t_pad: int  # padded query length (rows per head in the M axis)
    s_len: int  # real key length S (keys >= S are padding)
    s_pad: int
    offset: int  # S - T: query i sees keys j <= i + offset
    bq: int
    bk: int
    bq_dq: int
    bk_dq: int
    bq_dkv: int
    bk_dkv: int
    interpret: bool
    precision: lax.Precision
    compiler_params: object = None


def _mask(cfg: _Cfg, q_start, k_start, rows, cols):
    """Boolean [rows, cols] of visible (query, key) pairs, or None when all are visible."""
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    mask = None
    if cfg.causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
        mask = k_pos <= q_pos + cfg.offset
    if cfg.s_pad != cfg.s_len:
        kmask = k_pos < cfg.s_len
        mask = kmask if mask is None else jnp.logical_and(mask, kmask)
    return mask


def _causal_key_blocks(cfg: _Cfg, q_start, bq, bk):
    """Number of key blocks a query block starting at q_start must visit."""
    n = cfg.s_pad // bk
    if not cfg.causal:
        return n
    # the block's last row sees keys up to q_start + bq - 1 + offset: ceil((.. + 1) / bk)
    hi = lax.div(q_start + bq + cfg.offset + bk - 1, _i32(bk))
    return jnp.minimum(jnp.maximum(hi, 0), n)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, mx_ref, *, cfg: _Cfg):
    bq, bk = cfg.bq, cfg.bk
    q_start = lax.rem(pl.program_id(2), _i32(cfg.t_pad // bq)) * bq  # position within its head
    q = q_ref[...]
    G = v_ref.shape[-1]

    def body(j, carry):
        acc, m, l = carry
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot(q, k, 1, 1, cfg.precision) * cfg.sm_scale  # [bq, bk]
        mask = _mask(cfg, q_start, k_start, bq, bk)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:  # a row with nothing visible yet has m_new = NEG_INF, p = 1
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, 1, 0, cfg.precision)
        return acc, m_new, l

    init = (
        jnp.zeros((bq, G), jnp.float32),
        jnp.full((bq, 1), NEG_INF, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    acc, m, l = _fori(0, _causal_key_blocks(cfg, q_start, bq, bk), body, init)
    empty = l == 0.0  # no visible key (causal with T > S): output 0, L = +inf so p = 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    mx_ref[...] = jnp.where(empty, -jnp.inf, m)  # row max of visible scaled logits


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Cfg):
    bq, bk = cfg.bq_dq, cfg.bk_dq
    q_start = lax.rem(pl.program_id(2), _i32(cfg.t_pad // bq)) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        p = jnp.exp(_dot(q, k, 1, 1, cfg.precision) * cfg.sm_scale - lse)
        mask = _mask(cfg, q_start, k_start, bq, bk)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot(do, v, 1, 1, cfg.precision) - delta)  # dS = p ∘ (dP - δ)
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, cfg.precision)

    dq = _fori(0, _causal_key_blocks(cfg, q_start, bq, bk), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Cfg):
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    nq = cfg.t_pad // bq
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]
    # causal: the first query block with a row i such that k_start <= i + offset
    lo = jnp.minimum(jnp.maximum(lax.div(k_start - cfg.offset, _i32(bq)), 0), nq) if cfg.causal else 0

    def q_block(i, carry, head):
        dk, dv = carry
        row = head * cfg.t_pad + i * bq  # rows of query head `head` in the M axis
        q = q_ref[pl.ds(row, bq), :]
        do = do_ref[pl.ds(row, bq), :]
        lse = lse_ref[pl.ds(row, bq), :]
        delta = delta_ref[pl.ds(row, bq), :]
        p = jnp.exp(_dot(q, k, 1, 1, cfg.precision) * cfg.sm_scale - lse)  # [bq, bk]
        mask = _mask(cfg, i * bq, k_start, bq, bk)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0, cfg.precision)  # pᵀ dO
        ds = p * (_dot(do, v, 1, 1, cfg.precision) - delta)
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, cfg.precision)  # dSᵀ q
        return dk, dv

    def head(h, carry):  # the g query heads sharing this kv head add into one dk, dv
        return _fori(lo, nq, functools.partial(q_block, head=h), carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _fori(0, cfg.g, head, init)
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------- pallas calls


def _forward(q, k, v, cfg: _Cfg):
    B, K, M, H = q.shape
    S, G = k.shape[2], v.shape[3]
    row = jax.ShapeDtypeStruct((B, K, M, 1), jnp.float32)
    return _call(
        _fwd_kernel,
        cfg,
        (B, K, M // cfg.bq),
        [_rows(cfg.bq, H), _whole(S, H), _whole(S, G)],
        [_rows(cfg.bq, G), _rows(cfg.bq, 1), _rows(cfg.bq, 1)],
        [jax.ShapeDtypeStruct((B, K, M, G), q.dtype), row, row],
        "mlalm_flash_fwd",
    )(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q_BKMH, k_BKSH, v_BKSG, cfg: _Cfg):
    """(o_BKMG, row max logit_BKM1); the max logit is a statistic with zero gradient."""
    o, _, mx = _forward(q_BKMH, k_BKSH, v_BKSG, cfg)
    return o, mx


def _flash_fwd(q, k, v, cfg):
    o, lse, mx = _forward(q, k, v, cfg)
    return (o, mx), (q, k, v, o, lse)


def _flash_bwd(cfg, res, cts):
    q, k, v, o, lse = res
    do, _ = cts  # the max-logit output is stop-gradient: its cotangent is dropped
    B, K, M, H = q.shape
    S, G = k.shape[2], v.shape[3]
    do = do.astype(q.dtype)
    # δ_i = Σ_g dO_ig O_ig: a cheap row reduction XLA fuses, no kernel needed
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1, keepdims=True)
    dq = _call(
        _dq_kernel,
        cfg,
        (B, K, M // cfg.bq_dq),
        [
            _rows(cfg.bq_dq, H),
            _whole(S, H),
            _whole(S, G),
            _rows(cfg.bq_dq, G),
            _rows(cfg.bq_dq, 1),
            _rows(cfg.bq_dq, 1),
        ],
        _rows(cfg.bq_dq, H),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        "mlalm_flash_dq",
    )(q, k, v, do, lse, delta)
    dk, dv = _call(
        _dkv_kernel,
        cfg,
        (B, K, S // cfg.bk_dkv),
        [_whole(M, H), _rows(cfg.bk_dkv, H), _rows(cfg.bk_dkv, G), _whole(M, G), _whole(M, 1), _whole(M, 1)],
        [_rows(cfg.bk_dkv, H), _rows(cfg.bk_dkv, G)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        "mlalm_flash_dkv",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- wrapper


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"flash_attention wants q [B,T,N,H], k [B,S,K,H], v [B,S,K,G]; "
            f"got q{q.shape}, k{k.shape}, v{v.shape}"
        )
    (B, T, N, H), (Bk, S, K, Hk), (Bv, Sv, Kv, G) = q.shape, k.shape, v.shape
    if not B == Bk == Bv:
        raise ValueError(f"batch differs: q{q.shape}, k{k.shape}, v{v.shape}")
    if (S, K) != (Sv, Kv):
        raise ValueError(f"k{k.shape} and v{v.shape} must share [B, S, K]")
    if H != Hk:
        raise ValueError(f"q head dim {H} (q{q.shape}) != k head dim {Hk} (k{k.shape})")
    if K == 0 or N % K:
        raise ValueError(
            f"query heads N={N} (q{q.shape}) not divisible by kv heads K={K} (k{k.shape}); K must divide N"
        )
    if min(B, T, S, H, G) == 0:
        raise ValueError(f"empty dimension in q{q.shape}, k{k.shape}, v{v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"q, k, v must share one of float32/bfloat16/float16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def flash_attention(
    q_BTNH,
    k_BSKH,
    v_BSKG,
    *,
    causal: bool = True,
    sm_scale=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    return_max_logit: bool = False,
):
    """softmax(c · q kᵀ) v by the Pallas flash kernels, differentiable (custom VJP).

    Args:
        q_BTNH: queries [B, T, N, H].
        k_BSKH: keys [B, S, K, H], K dividing N (query head n uses kv head n // (N/K)).
        v_BSKG: values [B, S, K, G]; G may differ from H (MLA).
        causal: query i sees keys j <= i + (S - T) (bottom-right aligned; the usual mask
            when T == S, as in ``attention_core``).  A query that sees no key outputs 0.
        sm_scale: score scale c, default H**-0.5.
        block_sizes: tile sizes (:class:`BlockSizes`), default ``BlockSizes()``.
        interpret: run the Pallas interpreter; None means on a CPU backend.
        return_max_logit: also return each query head's largest scaled logit over batch
            and positions, visible entries only (what QK-clip watches; no gradient).
    Returns:
        o_BTNG, in the dtype of q (softmax and accumulation in float32); with
        ``return_max_logit`` the pair (o_BTNG, max_logit_N), as ``attention_core``.
    Raises:
        ValueError: naming the shape or dtype that cannot work.
    """
    _check_shapes(q_BTNH, k_BSKH, v_BSKG)
    bs = block_sizes or BlockSizes()
    B, T, N, H = q_BTNH.shape
    S, K, G = k_BSKH.shape[1], k_BSKH.shape[2], v_BSKG.shape[3]
    backend = jax.default_backend()
    interpret = backend == "cpu" if interpret is None else bool(interpret)
    bq, bq_dq, bq_dkv = (_fit(b, T) for b in (bs.block_q, bs.block_q_dq, bs.block_q_dkv))
    bk, bk_dq, bk_dkv = (_fit(b, S) for b in (bs.block_k, bs.block_k_dq, bs.block_k_dkv))
    t_pad = round_up(T, max(bq, bq_dq, bq_dkv))  # powers of two: the max is the lcm
    s_pad = round_up(S, max(bk, bk_dq, bk_dkv))
    if backend == "tpu" and not interpret:
        hp, gp, params = H, G, None  # Mosaic takes a block equal to the full head dim
    else:  # Triton needs power-of-two tiles (interpret mode pads alike, so tests cover it)
        hp, gp = (max(_MIN_BLOCK, pl.next_power_of_2(d)) for d in (H, G))
        params = None
        if backend == "gpu" and not interpret:
            # JAX 0.10 lowers pallas_call to Mosaic GPU unless handed Triton's params
            from jax.experimental.pallas import triton as pltriton

            params = pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
    dtype = q_BTNH.dtype
    cfg = _Cfg(
        causal=bool(causal),
        sm_scale=float(H**-0.5 if sm_scale is None else sm_scale),
        g=N // K,
        t_pad=t_pad,
        s_len=S,
        s_pad=s_pad,
        offset=S - T,
        bq=bq,
        bk=bk,
        bq_dq=bq_dq,
        bk_dq=bk_dq,
        bq_dkv=bq_dkv,
        bk_dkv=bk_dkv,
        interpret=interpret,
        precision=(
            lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
        ),  # f32 must not silently drop to TF32
        compiler_params=params,
    )

    def to_kernel(x, length, pad_len, width):  # [B, L, heads, d] -> [B, heads, Lp, dp]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad_len - length), (0, width - x.shape[-1])))

    q = to_kernel(q_BTNH, T, t_pad, hp).reshape(B, K, (N // K) * t_pad, hp)
    k = to_kernel(k_BSKH, S, s_pad, hp)
    v = to_kernel(v_BSKG, S, s_pad, gp)
    # the custom_vjp decorated through functools.partial loses _flash's return type
    o, mx = cast("tuple[jax.Array, jax.Array]", _flash(q, k, v, cfg))
    o_BTNG = jnp.swapaxes(o.reshape(B, N, t_pad, gp)[:, :, :T, :G], 1, 2)
    if not return_max_logit:
        return o_BTNG
    max_logit_N = jnp.max(mx.reshape(B, N, t_pad)[:, :, :T], axis=(0, 2))
    return o_BTNG, lax.stop_gradient(max_logit_N)
