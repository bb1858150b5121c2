"""Leaf layers: parameters with logical axes and optimizer roles, RMSNorm, rotary embedding,
SwiGLU."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.core import Tracer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class BalanceBias(nnx.Variable):
    """The MoE routing bias of auxiliary-loss-free balancing.

    A Variable but not an ``nnx.Param``: gradients are taken with respect to Params
    only, so the bias gets no gradient and the optimizer never sees it.  It is changed
    solely by :func:`mlalm.model.moe.balance_bias_update` after each step.
    """


# The role of a parameter, which decides its optimizer (mlalm.optim): 'hidden' matrices
# are orthogonalised by Muon; the rest always go to Adam(W).
LABELS = ("embedding", "head", "norm", "router", "hidden")


class Roles(NamedTuple):
    """What a parameter is, as the optimizer needs to know it (not parsed from its name).

    label: one of :data:`LABELS`.
    fan_in, fan_out, batch: axis indices.  A 'hidden' parameter is a linear map (or a
        stack of them) from its ``fan_in`` axes to its ``fan_out`` axes, one map per
        index of its ``batch`` axes; these three partition its axes.  Muon
        orthogonalises it as the matrix [prod(fan_in), prod(fan_out)] per batch index.
        Other labels may state fan_in/fan_out (empty when meaningless, e.g. a norm scale).
    """

    label: str
    fan_in: tuple[int, ...] = ()
    fan_out: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()


def check_roles(roles: Roles, ndim: int, where: str = "parameter") -> Roles:
    """``roles`` if it is consistent for an array of ``ndim`` axes, else ValueError."""
    if roles.label not in LABELS:
        raise ValueError(f"{where}: label {roles.label!r} is not one of {', '.join(LABELS)}")
    axes = roles.fan_in + roles.fan_out + roles.batch
    valid = all(isinstance(a, int) and 0 <= a < ndim for a in axes)
    if not valid or len(set(axes)) != len(axes):
        raise ValueError(
            f"{where}: fan_in={roles.fan_in}, fan_out={roles.fan_out}, "
            f"batch={roles.batch} must be distinct axis indices of a {ndim}-d array"
        )
    if roles.label == "hidden" and (not roles.fan_in or not roles.fan_out or len(axes) != ndim):
        raise ValueError(
            f"{where}: a 'hidden' parameter needs non-empty fan_in and fan_out that "
            f"with batch cover all {ndim} axes (got fan_in={roles.fan_in}, "
            f"fan_out={roles.fan_out}, batch={roles.batch})"
        )
    return roles


def param_roles(var, where: str = "parameter") -> Roles:
    """The :class:`Roles` a parameter made by :func:`param` carries as Variable metadata
    (optax's moments and the gradients keep the Param nodes and with them this metadata).

    Raises:
        TypeError: ``var`` is not an nnx.Variable.
        ValueError: ``var`` carries no (or inconsistent) roles.
    """
    if not isinstance(var, nnx.Variable):
        raise TypeError(
            f"{where}: a {type(var).__name__}, not an nnx.Param made by "
            f"mlalm.model.layers.param, so it has no optimizer label"
        )
    meta = var.get_metadata()
    if "label" not in meta:
        raise ValueError(
            f"{where}: no 'label' metadata; create it with mlalm.model.layers.param(..., label=...)"
        )
    roles = Roles(
        meta["label"],
        tuple(meta.get("fan_in", ())),
        tuple(meta.get("fan_out", ())),
        tuple(meta.get("batch", ())),
    )
    return check_roles(roles, len(var.shape), where)


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    label: str,
    fan_in: tuple[int, ...] = (),
    fan_out: tuple[int, ...] = (),
    batch: tuple[int, ...] = (),
    std: float | None = 0.02,
    dtype=jnp.float32,
    init: str = "normal",
) -> nnx.Param:
    """A parameter carrying its logical axis names (read by ``mlalm.sharding``) and its
    optimizer roles (read by ``mlalm.optim``; see :class:`Roles`).

    Args:
        shape: parameter shape; ``axes`` names each dimension (None: never sharded).
        label, fan_in, fan_out, batch: the roles, stored as Variable metadata beside
            ``axes``; checked by :func:`check_roles`.
        std: standard deviation of the (truncated at 3 sigma) normal initialiser.
        init: 'normal', 'ones' or 'zeros'.
    """
    assert len(shape) == len(axes), (shape, axes)
    roles = check_roles(
        Roles(label, tuple(fan_in), tuple(fan_out), tuple(batch)),
        len(shape),
        f"parameter of shape {tuple(shape)}",
    )
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = jnp.asarray(std * _truncated_normal(rngs.params(), shape), dtype)
    return nnx.Param(value, axes=tuple(axes), **roles._asdict())


def _truncated_normal(key, shape):
    """Standard normal truncated to [-3, 3], drawn with numpy from a seed taken from ``key``.

    jax.random in eager mode compiles one program per distinct shape (10 s to build the
    default model on 2 CPU cores); numpy needs none and builds it in well under a second.
    Under a trace (jit, eval_shape) the same numpy draw runs as a host callback, so every
    path gives the same values.
    """
    key_data = jax.random.key_data(key)
    if isinstance(key_data, Tracer):
        return jax.pure_callback(
            lambda k: _np_truncated_normal(k, shape), jax.ShapeDtypeStruct(shape, jnp.float32), key_data
        )
    return _np_truncated_normal(key_data, shape)


def _np_truncated_normal(key_data, shape) -> np.ndarray:
    rng = np.random.default_rng(np.asarray(key_data).astype(np.uint32).tolist())
    x = rng.standard_normal(shape, dtype=np.float32)
    bad = np.abs(x) > 3.0
    while bad.any():  # resample the tails (0.27% of draws)
        x[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
        bad = np.abs(x) > 3.0
    return x


def linear(x, w, n_in: int = 1, *, preferred_element_type=None):
    """Contract the last ``n_in`` axes of x with the first ``n_in`` of w, as ONE 2-D matmul
    over flattened rows: [..., I] x [I, O] -> [..., O] (e.g. BTD,DNH->BTNH or BTNG,NGD->BTD).

    Same result as the einsum, but the weight gradient then contracts a single row axis.
    With the batch and position axes kept apart, XLA on CPU copies every activation into
    a transposed layout before each weight-gradient matmul (measured: a dense SwiGLU's
    forward + backward at 2,048 tokens took 112 ms as 3-D einsums, 80 ms as 2-D matmuls).
    """
    lead, k = x.shape[: x.ndim - n_in], math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *w.shape[n_in:])


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32.

    Written out (rather than ``nnx.RMSNorm``) to pin the DeepSeek numerics: normalise in
    float32, cast back to the compute dtype, then multiply by the scale.
    """

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), label="norm", init="ones", dtype=param_dtype)
        self.eps = eps
        self.dtype = dtype

    @jax.named_scope("norm")
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rope_tables(positions_BT, dim: int, theta: float):
    """cos, sin tables [B, T, dim/2] in float32 for the 'half' (NeoX) rotary layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNP, cos_BTp, sin_BTp):
    """Rotate pairs (i, i + P/2) of the last axis by the position's angle.

    x: [B, T, N, P]; cos/sin: [B, T, P/2].  Computed in float32, returned in x's dtype.
    mlalm keeps the half layout internally; ``mlalm.hf`` permutes weights to and from
    DeepSeek's interleaved layout, which gives the same attention scores.
    """
    with jax.named_scope("rope"):
        return _rope(x_BTNP, cos_BTp, sin_BTp)


def _rope(x_BTNP, cos_BTp, sin_BTp):
    x = x_BTNP.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos_BTp[:, :, None, :], sin_BTp[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x_BTNP.dtype)


class SwiGLU(nnx.Module):
    """down(silu(x W_gate) * (x W_up)): the dense FFN and the shared experts."""

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        *,
        std: float,
        out_std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        matrix = {"label": "hidden", "fan_in": (0,), "fan_out": (1,), "dtype": param_dtype}
        self.w_gate_DF = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std=std, **matrix)
        self.w_up_DF = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std=std, **matrix)
        self.w_down_FD = param(rngs, (ffn_dim, d_model), ("mlp", "embed"), std=out_std, **matrix)
        self.dtype = dtype

    def __call__(self, x_BTD):
        dt = self.dtype
        g = linear(x_BTD, self.w_gate_DF[...].astype(dt))
        u = linear(x_BTD, self.w_up_DF[...].astype(dt))
        return linear(jax.nn.silu(g) * u, self.w_down_FD[...].astype(dt))
