"""What the Pallas kernels share: int32 index arithmetic whatever jax_enable_x64 says,
float32-accumulated dots, the block-size rule, and the masking constant."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # Triton's tl.dot needs every dimension >= 16


# Index arithmetic is int32 throughout, whatever jax_enable_x64 says: program_id is int32,
# and a Python int handed to lax.rem/lax.div would become int64 under x64 (lax ops do not
# promote: int32 op int64 is a TypeError).  Loop counters likewise (see _fori).
_i32 = jnp.int32


def _fori(lo, hi, body, init):
    """``lax.fori_loop(lo, hi, body, init)`` whose index is int32 whatever jax_enable_x64 says.

    With static bounds fori_loop becomes a scan whose counter is a Python int (int64 under
    x64; Mosaic then fails to verify the cast back to int32), so that case is the same
    scan written out with an int32 counter -- the (i, carry) -> (i + 1, ...) form Pallas
    lowers as a for loop.  Traced bounds are int32 already and give an int32 index.
    """
    if isinstance(lo, int) and isinstance(hi, int):

        def step(carry, _):
            j, x = carry
            return (j + 1, body(j, x)), None

        (_, out), _ = lax.scan(step, (_i32(lo), init), None, length=max(hi - lo, 0))
        return out
    return lax.fori_loop(lo, hi, body, init)


def _dot(a, b, ca, cb, precision):
    """a·b contracting a's dim ca with b's dim cb, accumulated in float32."""
    return lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _fit(block: int, n: int) -> int:
    """Shrink a power-of-two block to the smallest power of two >= n (at least 16)."""
    return min(block, max(_MIN_BLOCK, pl.next_power_of_2(n)))


def _rows(block, width):
    """Spec for a [block, width] tile of a [B, K, rows, width] array, grid (b, kv, r)."""
    return pl.BlockSpec((None, None, block, width), lambda b, h, r: (b, h, r, 0))


def _whole(rows, width):
    """Spec for all rows of one (batch, kv head) of a [B, K, rows, width] array."""
    return pl.BlockSpec((None, None, rows, width), lambda b, h, r: (b, h, 0, 0))


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=cfg.compiler_params,
        name=name,
    )
