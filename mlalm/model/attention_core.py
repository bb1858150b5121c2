"""The attention arithmetic the modules in ``mlalm.model.attention`` share: the core
softmax(q kᵀ) v in query blocks with its own VJP, the cached (prefill/decode) variants, and
MLA's absorbed decode over the latent cache (``docs/architecture.md``, "MLA")."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _softmax(s, mask):
    """(softmax over the last axis of s where ``mask``, else 0; the row max [..., 1])."""
    return _softmax_fwd(s, mask)[0]


def _softmax_fwd(s, mask):
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    p = e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))
    return (p, m), p


def _softmax_bwd(p, cotangents):
    dp, _ = cotangents  # the row max is only reported (QK-clip), never differentiated
    return p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)), None


# jax.nn.softmax's gradient, but the forward shares its row max with the max-logit
# report (one reduction pass over the scores instead of two) and multiplies by the
# reciprocal of the row sum instead of dividing (measured on CPU: the reductions and the
# division were the largest elementwise ops of the training step)
_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _core_hm(q, k, v, causal, q_offset):
    """Head-major core over scaled queries q [B, K, g, T, H] (GQA/MQA) or, when K = N,
    q [B, N, T, H] (plain 4-D einsums, measured faster on CPU than a size-1 group axis);
    k [B, K, S, H], v [B, K, S, G].  Returns o like q with width G, and the largest
    logit per query head ([K, g] or [N])."""
    g = "g" if q.ndim == 5 else ""
    T, S = q.shape[-2], k.shape[-2]
    s = jnp.einsum(f"BK{g}TH,BKSH->BK{g}TS", q, k, preferred_element_type=jnp.float32)
    mask = (jnp.arange(T)[:, None] + q_offset) >= jnp.arange(S)[None, :] if causal else None
    p, row_max = _softmax(s, mask)
    o = jnp.einsum(f"BK{g}TS,BKSG->BK{g}TG", p.astype(v.dtype), v)
    return o, jax.lax.stop_gradient(jnp.max(row_max, axis=(0, q.ndim - 2, q.ndim - 1)))


def attention_core(
    q_BTNH,
    k_BSKH,
    v_BSKG,
    *,
    scale: float,
    causal: bool = True,
    q_offset: int = 0,
    q_blocks: int | None = None,
):
    """softmax(q kᵀ · scale) v with K kv heads shared by N/K query heads each.

    Scores, mask and softmax in float32; the head grouping is a reshape, so GQA/MQA never
    materialise repeated keys.  ``q_offset`` is the position of the first query relative
    to the first key (for decoding with a cache).

    Causal self-attention (T = S, no offset) is computed in ``q_blocks`` query blocks
    (default 4 when T is a multiple of 4 and at least 128): block i only multiplies the
    keys of blocks <= i, which skips 3/8 of the QK and PV products and of the softmax.
    Measured on a 2-core CPU: 2.3x faster forward + backward at T = 256 (scripts/bench.py).
    q, k and v are moved to a head-major layout once, before the blocks (1.2x faster
    than slicing and transposing each block), and the queries are scaled instead of the
    T x S scores.

    Returns:
        o_BTNG in the dtype of v, and each query head's largest scaled logit [N]
        (over batch and positions, unmasked entries only; what QK-clip watches).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if q_blocks is None:
        q_blocks = 4 if causal and T == S and q_offset == 0 and T % 4 == 0 and T >= 128 else 1
    if q_blocks > 1 and not (causal and T == S and q_offset == 0 and T % q_blocks == 0):
        raise ValueError(f"q_blocks={q_blocks} needs causal self-attention with T={T} a multiple of it")
    q = q_BTNH * jnp.asarray(scale, q_BTNH.dtype)
    k, v = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKG, 1, 2)
    if K == N:
        q, tax = jnp.swapaxes(q, 1, 2), 2
    else:
        q, tax = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4), 3
    c = T // q_blocks
    outs, maxes = [], []
    for i in range(q_blocks):  # query block i sees keys [0, (i + 1) c)
        qi = jax.lax.slice_in_dim(q, i * c, (i + 1) * c, axis=tax)
        kv = slice(0, (i + 1) * c) if q_blocks > 1 else slice(None)
        o, m = _core_hm(qi, k[:, :, kv], v[:, :, kv], causal, q_offset if q_blocks == 1 else i * c)
        outs.append(o)
        maxes.append(m)
    o = jnp.concatenate(outs, axis=tax) if q_blocks > 1 else outs[0]
    max_logit = jnp.max(jnp.stack(maxes), axis=0).reshape(N)
    if K == N:
        return jnp.swapaxes(o, 1, 2), max_logit
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, N, -1), max_logit


@jax.named_scope("core")
def core_attention(impl: str, q, k, v, *, scale: float):
    """``attention_core`` (XLA) or the Pallas flash kernel, by ``attention.impl``."""
    if impl == "pallas":
        from mlalm.kernels import flash_attention

        return flash_attention(q, k, v.astype(q.dtype), causal=True, sm_scale=scale, return_max_logit=True)
    return attention_core(q, k, v, scale=scale)


# ---------------------------------------------------------------------------------------
# Cache-aware paths (prefill and decode).  A layer's cache is a dict of arrays whose keys
# name the layout:  {'k', 'v'}: keys/values per kv head (MHA/GQA/MQA, and MLA without
# absorption: N heads of width d_n + d_r and d_v);  {'c_kv', 'k_pe'}: MLA's latent cache.
# Row b, slot s holds the token at position s of sequence b; slots past a row's length
# are masked, so stale or padding entries there are never attended.
# ---------------------------------------------------------------------------------------


def cache_write(cache_BS_, new_BT_, positions_BT):
    """cache[b, positions[b, t]] = new[b, t] (a scatter; positions >= S are dropped)."""
    b = jnp.arange(cache_BS_.shape[0])[:, None]
    return cache_BS_.at[b, positions_BT].set(new_BT_.astype(cache_BS_.dtype), mode="drop")


def cached_attention(q_BTNH, k_BSKH, v_BSKG, positions_BT, *, scale: float):
    """softmax(q kᵀ · scale) v over a cache, query (b, t) seeing slots s <= positions[b, t].

    K kv heads are shared by N/K query heads each (a reshape, as in ``attention_core``).
    Scores and softmax in float32.  Returns o_BTNG in the dtype of v.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    s = jnp.einsum("BTKgH,BSKH->BKgTS", q, k_BSKH, preferred_element_type=jnp.float32) * scale
    mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
    s = jnp.where(mask_BTS[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BKgTS,BSKG->BTKgG", p.astype(v_BSKG.dtype), v_BSKG)
    return o.reshape(B, T, N, v_BSKG.shape[-1])


def absorbed_mla_attention(q_abs_BTNR, q_pe_BTNP, c_kv_BSR, k_pe_BSP, positions_BT, *, scale: float):
    """MLA over the latent cache with W_UK absorbed into the query (see "MLA" in
    docs/architecture.md):

        s_ns = scale · (q_abs_n · c_kv_s + q_pe_n · k_pe_s),   s <= position
        o_n  = Σ_s softmax(s_n)_s c_kv_s                       (latent output, width R)

    MQA with one kv head of width R + P whose value is its first R dims.  Float32 scores.
    Returns o_BTNR in the dtype of c_kv.
    """
    S = c_kv_BSR.shape[1]
    s = (
        jnp.einsum("BTNR,BSR->BTNS", q_abs_BTNR, c_kv_BSR, preferred_element_type=jnp.float32)
        + jnp.einsum("BTNP,BSP->BTNS", q_pe_BTNP, k_pe_BSP, preferred_element_type=jnp.float32)
    ) * scale
    mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
    s = jnp.where(mask_BTS[:, :, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("BTNS,BSR->BTNR", p.astype(c_kv_BSR.dtype), c_kv_BSR)


def _mla_decode_splits(S: int, B: int) -> int | None:
    """A ``num_splits`` for ``mla_decode`` that cuts S into whole 64-row blocks, so the
    kernel never copies the cache into a padded buffer (None: let the kernel choose)."""
    from mlalm.kernels.mla_decode import _TARGET_PROGRAMS

    if S % 64:
        return None
    n_blocks = S // 64
    target = max(1, min(-(-n_blocks // 4), -(-_TARGET_PROGRAMS // B)))
    return max(d for d in range(1, target + 1) if n_blocks % d == 0)
