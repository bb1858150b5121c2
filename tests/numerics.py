"""Shared numerics for the tests: one error metric, sound where the reference vanishes,
and a check that a computation holds no float64 value.

The metric.  For a result x and its float64 reference r,

    err(x, r, scale) = max|x - r| / max(max|r|, scale)

where ``scale`` >= 0 is an absolute floor derived from the *inputs* of the computation,
never from the result under test: the size the quantity has when its terms do not cancel.
Where the reference is large this is the usual relative error; where the reference is
zero or tiny because its terms cancel (dq and dk of attention with one visible key,
where dS = p ∘ (dP - δ) and dP = δ exactly) it is the absolute error measured against
the cancelled terms, which is what float32 arithmetic can promise: a computed sum of
terms t_i is off by about n·u·Σ|t_i| (u the unit roundoff), however small Σ t_i is.
Dividing by max|r| alone there divides rounding noise by zero (errors of 1e23).

Good floors, in increasing looseness:
  * the same computation done on absolute values, e.g. ``term_scale(spec, a, b)`` for a
    contraction ``einsum(spec, a, b)`` (= max Σ|a||b|, an upper bound of max|r|), or the
    reference's own sum of |terms|;
  * a product of input magnitudes (for dq of attention: scale · max|dO|·|v|·|k|).
If both the reference and the floor are 0 the comparison is exact: err is 0 for x == r
and infinite otherwise.  A floor is no licence for a loose tolerance: keep each test able
to fail (a deliberately wrong result must give err above its tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def as_f64(x) -> np.ndarray:
    """Any array (jax or numpy, bfloat16 included) as a float64 numpy array."""
    if isinstance(x, jax.Array) and x.dtype not in (jnp.float32, jnp.float64):
        x = x.astype(jnp.float32)  # bfloat16/float16: exact in float32
    return np.asarray(x).astype(np.float64)


def err(x, ref, scale: float = 0.0) -> float:
    """max|x - ref| / max(max|ref|, scale); 0 or inf when that denominator is 0."""
    x, ref = as_f64(x), as_f64(ref)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: result {x.shape}, reference {ref.shape}")
    diff = float(np.max(np.abs(x - ref), initial=0.0))
    denom = max(float(np.max(np.abs(ref), initial=0.0)), float(scale))
    if np.isnan(diff):
        return float("inf")
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def assert_close(x, ref, *, rtol: float, scale: float = 0.0, what: str = "result"):
    """Assert err(x, ref, scale) <= rtol, with a message naming ``what`` and the figures."""
    e = err(x, ref, scale)
    assert e <= rtol, (
        f"{what}: error {e:.3e} > {rtol:.1e} (max|ref| "
        f"{float(np.max(np.abs(as_f64(ref)), initial=0.0)):.3e}, floor {scale:.3e})"
    )


def term_scale(spec: str, *operands) -> float:
    """max of ``einsum(spec, |operands|)``: the largest sum of |terms| of the contraction,
    the floor for comparing ``einsum(spec, *operands)`` (see the module docstring)."""
    return float(np.max(np.einsum(spec, *(np.abs(as_f64(a)) for a in operands)), initial=0.0))


def float64_ops(fn, *args) -> list[str]:
    """Primitives of ``jax.make_jaxpr(fn)(*args)`` that produce a float64 value, inner
    jaxprs included (jit, scan, cond, custom_vjp, pallas_call kernels), each with the
    place that emitted it.  Empty means no silent upcast, whatever jax_enable_x64 says."""
    found: list[str] = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if any(getattr(v.aval, "dtype", None) == jnp.float64 for v in eqn.outvars):
                found.append(f"{eqn.primitive} at {_where(eqn)}")
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _where(eqn) -> str:
    """The user source line that emitted ``eqn`` (jax's private helper; '?' if it moved)."""
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # only the message loses its location
        return "?"
