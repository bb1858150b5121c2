"""Optimizers as optax compositions: parameter labels, schedules, AdamW, Muon, clipping."""

from __future__ import annotations

import math
from dataclasses import replace

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from mlalm.model.layers import param_roles


def _map_params(fn, tree):
    """``fn(roles, var)`` for every parameter (nnx.Variable) of ``tree``, in its place.

    ``tree`` is a parameter tree or one with its structure (gradients, updates, optax
    moments: all keep the Param nodes and their metadata); optax's MaskedNodes (the
    leaves another ``optax.partition`` branch owns) have no leaves and are kept as they
    are.  A leaf that is not a Variable raises TypeError naming its path.
    """

    def one(path, var):
        return fn(param_roles(var, f"parameter {jax.tree_util.keystr(path) or '(root)'}"), var)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_labels(params):
    """One label per parameter, from its metadata (``mlalm.model.layers.param``, never
    its name): 'embedding', 'head', 'norm', 'router' or 'hidden'.

    'hidden' are the weight matrices inside the blocks (attention projections, MLA's
    down/up projections, dense FFN, shared and routed experts).  Returns the tree with
    each parameter replaced by its label.
    """
    return _map_params(lambda roles, _: roles.label, params)


def effective_warmup(o, steps: int) -> int:
    """``optim.warmup_steps``, or a tenth of ``steps`` when the run is not longer than its
    warmup (which would otherwise only warm up and never decay; the trainer says so)."""
    return o.warmup_steps if o.warmup_steps < steps else steps // 10


def make_schedule(o, steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup (:func:`effective_warmup`), then cosine /
    warmup-stable-decay / constant."""
    warmup = effective_warmup(o, steps)
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(steps, warmup + 1), floor)
    warm = optax.linear_schedule(0.0, o.lr, warmup) if warmup else optax.constant_schedule(o.lr)
    if o.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(o.lr)], [warmup])
    decay_steps = max(1, int(round(steps * o.decay_fraction)))
    stable_end = max(warmup, steps - decay_steps)
    return optax.join_schedules(
        [warm, optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, floor, decay_steps)],
        [warmup, stable_end],
    )


def muon_dimension_numbers(var) -> MuonDimensionNumbers:
    """How Muon sees a 'hidden' parameter as a matrix (or a batch of matrices): reduction
    axes = its fan-in axes, output axes = its fan-out axes, the remaining (batch) axes
    each orthogonalised on their own -- all from the roles the parameter carries
    (``mlalm.model.layers.param``), never from its name.

    E.g. MLA's W_kvb [R, N, d_n + d_v] is one R x N·(d_n + d_v) matrix (not N per-head
    matrices), W_o [N, d_v, D] is (N·d_v) x D, and routed experts [E, D, F] are E
    matrices D x F.

    Raises:
        ValueError: ``var`` carries no roles, or is not 'hidden'.
    """
    roles = param_roles(var)
    if roles.label != "hidden":
        raise ValueError(f"a {roles.label!r} parameter is not a Muon matrix (only 'hidden' ones are)")
    return MuonDimensionNumbers(reduction_axis=roles.fan_in, output_axis=roles.fan_out)


def _muon_dims_tree(params):
    """The dimension numbers as optax wants them: a tree of ``params``'s structure down to
    the Param nodes, each holding its MuonDimensionNumbers in place of its array."""
    return _map_params(lambda _, var: jax.tree.map(lambda _: muon_dimension_numbers(var), var), params)


def scale_muon_update(mode: str) -> optax.GradientTransformation:
    """Rescale orthogonalised updates by their matrix shape.

    'rms' (Moonlight, 2502.16982): 0.2·sqrt(max(fan_in, fan_out)), so the update RMS
    matches AdamW's and both share one learning rate.  'shape' (Keller Jordan's
    original): sqrt(max(1, fan_out / fan_in)).  (optax has the same rule, but does not
    export it.)
    """

    def scale(roles, u):  # u: the update's Param node, with the parameter's roles
        fan_in = math.prod(u.shape[a] for a in roles.fan_in)
        fan_out = math.prod(u.shape[a] for a in roles.fan_out)
        if mode == "rms":
            factor = 0.2 * math.sqrt(max(fan_in, fan_out))
        else:
            factor = math.sqrt(max(1.0, fan_out / fan_in))
        return jax.tree.map(lambda x: x * factor, u)

    def update(updates, state, params=None):
        del params
        return _map_params(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer_labels(cfg, params):
    """Which optax branch updates each leaf: 'muon' or 'adam'."""
    use_muon = cfg.optim.name == "muon"
    return jax.tree.map(
        lambda label: "muon" if use_muon and label == "hidden" else "adam", param_labels(params)
    )


def build_optimizer(cfg, steps: int):
    """(optax transform, schedule) for ``cfg.optim``.

    ``adamw``: AdamW on every parameter.  ``muon``: Muon on the 'hidden' matrices, Adam
    (own learning rate ``adam_lr``, betas, eps) on embeddings, head, norms and router,
    joined with ``optax.partition``.  The Muon branch is optax's ``scale_by_muon``
    (Nesterov momentum, Frobenius pre-normalisation, quintic Newton-Schulz) with explicit
    dimension numbers, then the update-RMS scaling, decoupled weight decay and the
    schedule.  Weight decay touches only 'hidden' matrices (and embedding/head with
    ``optim.decay_embeddings``).  Gradients are clipped by global norm first when
    ``optim.clip_norm > 0``.  The schedule returned is the main (``optim.lr``) one.
    """
    o = cfg.optim
    schedule = make_schedule(o, steps)
    decayed = {"hidden"} | ({"embedding", "head"} if o.decay_embeddings else set())

    def decay_mask(params):
        return jax.tree.map(lambda label: label in decayed, param_labels(params))

    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    if o.name == "adamw":
        parts.append(
            optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
        )
        return optax.chain(*parts), schedule
    adam_schedule = make_schedule(replace(o, lr=o.adam_lr), steps) if o.adam_lr else schedule
    # float32 explicitly: optax keeps the coefficients as a state leaf, which would be
    # float64 under jax_enable_x64 (a different checkpoint layout)
    coeffs = jnp.asarray(o.ns_coeffs, jnp.float32)
    muon_wd = o.weight_decay if o.muon_weight_decay is None else o.muon_weight_decay
    muon = optax.chain(
        scale_by_muon(
            # optax annotates a tuple, and reads the coefficients with jnp.asarray
            ns_coeffs=coeffs,  # pyright: ignore[reportArgumentType] - an array works too
            ns_steps=o.ns_steps,
            beta=o.muon_momentum,
            nesterov=True,
            weight_dimension_numbers=_muon_dims_tree,
        ),
        scale_muon_update(o.muon_scale),
        optax.add_decayed_weights(muon_wd),
        optax.scale_by_learning_rate(schedule),
    )
    adam = optax.adamw(
        adam_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    parts.append(optax.partition({"muon": muon, "adam": adam}, lambda params: optimizer_labels(cfg, params)))
    return optax.chain(*parts), schedule
