"""Optimizers as optax compositions: parameter labels, schedules, AdamW, Muon, clipping."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

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


# Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign
# Methods and Their Application to the Muon Algorithm", arXiv 2505.16932, Algorithm 1):
# per-iteration minimax-optimal quintics (a, b, c).  The paper divides all but the last by
# the safety factor 1.01 (a/1.01, b/1.01^3, c/1.01^5) and normalises the input by
# 1.01·||X||_F; iterations past the list repeat its last triple.
_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def newton_schulz_coeffs(o) -> jax.Array:
    """The quintic coefficients optax's ``scale_by_muon`` iterates with (float32): one
    triple used for every step, or one row per step.

    ``quintic``/``normuon``: ``optim.ns_coeffs`` (a list of triples: the first
    ``ns_steps``).  ``polar_express``: the paper's schedule above for ``ns_steps`` steps.
    optax normalises by ||X||_F alone, so the paper's extra 1/1.01 of the input is folded
    into the first polynomial: p(x / s) = (a/s) x + (b/s^3) x^3 + (c/s^5) x^5.
    """
    if o.muon_variant == "polar_express":
        safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS[:-1]]
        safe.append(_POLAR_EXPRESS[-1])
        rows = [safe[min(i, len(safe) - 1)] for i in range(o.ns_steps)]
        a, b, c = rows[0]
        rows[0] = (a / 1.01, b / 1.01**3, c / 1.01**5)
        return jnp.asarray(rows, jnp.float32)
    coeffs = jnp.asarray(o.ns_coeffs, jnp.float32)
    return coeffs[: o.ns_steps] if coeffs.ndim == 2 else coeffs


class NeuronRMSState(NamedTuple):
    nu: optax.Updates  # per output neuron: the decayed mean square of the update


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def scale_by_neuron_rms(beta2: float, eps: float = 1e-10) -> optax.GradientTransformation:
    """NorMuon's neuron-wise normalisation of an orthogonalised update O (Li et al. 2025,
    "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491; the reference
    implementation github.com/zichongli5/NorMuon, normuon.py):

        v  <- beta2 · v + (1 - beta2) · mean over fan-in of O²   (one value per output
                                                                  neuron of each matrix)
        O' =  O / (sqrt(v) + eps), rescaled to O's Frobenius norm, matrix by matrix.

    The fan-in and fan-out axes come from each parameter's roles; the batch axes of
    stacked experts keep separate matrices (in v and in the norms).
    """

    def init(params):
        def zeros(roles, var):
            shape = tuple(1 if i in roles.fan_in else n for i, n in enumerate(var.shape))
            return var.replace(jnp.zeros(shape, jnp.float32))

        return NeuronRMSState(nu=_map_params(zeros, params))

    def update(updates, state, params=None):
        del params

        def one(u, nu):
            roles = param_roles(u)
            o, v = u.get_value(), nu.get_value()
            matrix = tuple(roles.fan_in) + tuple(roles.fan_out)
            v = beta2 * v + (1 - beta2) * jnp.mean(jnp.square(o), axis=roles.fan_in, keepdims=True)
            scaled = o / (jnp.sqrt(v) + eps)
            before = jnp.sqrt(jnp.sum(jnp.square(o), axis=matrix, keepdims=True))
            after = jnp.sqrt(jnp.sum(jnp.square(scaled), axis=matrix, keepdims=True))
            return u.replace((scaled * (before / (after + eps))).astype(o.dtype)), nu.replace(v)

        pairs = jax.tree.map(one, updates, state.nu, is_leaf=_is_var)
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and _is_var(x[0])  # noqa: E731
        new_updates = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
        new_nu = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
        return new_updates, NeuronRMSState(nu=new_nu)

    return optax.GradientTransformation(init, update)


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

    ``adamw``: AdamW on every parameter, learning rate ``optim.lr``.  ``muon``: Muon on
    the 'hidden' matrices at ``optim.muon_lr``, Adam (``optim.adam_lr``, else
    ``optim.lr``; betas, eps) on embeddings, head, norms and router, joined with
    ``optax.partition``.  The Muon branch is optax's ``scale_by_muon`` (Nesterov momentum,
    Frobenius pre-normalisation, the Newton-Schulz coefficients of ``muon_variant``) with
    explicit dimension numbers, NorMuon's neuron-wise normalisation for
    ``muon_variant=normuon``, then the update-RMS scaling, decoupled weight decay and the
    schedule.  Weight decay touches only 'hidden' matrices (and embedding/head with
    ``optim.decay_embeddings``).  Gradients are clipped by global norm first when
    ``optim.clip_norm > 0``.  The schedule returned (logged as ``lr``) is AdamW's, or
    Muon's for ``muon``.
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
    coeffs = newton_schulz_coeffs(o)
    muon_wd = o.weight_decay if o.muon_weight_decay is None else o.muon_weight_decay
    muon_schedule = make_schedule(replace(o, lr=o.muon_lr), steps)
    muon = optax.chain(
        scale_by_muon(
            # optax annotates a tuple, and reads the coefficients with jnp.asarray
            ns_coeffs=coeffs,  # pyright: ignore[reportArgumentType] - an array works too
            ns_steps=o.ns_steps,
            beta=o.muon_momentum,
            nesterov=True,
            weight_dimension_numbers=_muon_dims_tree,
        ),
        *([scale_by_neuron_rms(o.normuon_beta2)] if o.muon_variant == "normuon" else []),
        scale_muon_update(o.muon_scale),
        optax.add_decayed_weights(muon_wd),
        optax.scale_by_learning_rate(muon_schedule),
    )
    adam = optax.adamw(
        adam_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    parts.append(optax.partition({"muon": muon, "adam": adam}, lambda params: optimizer_labels(cfg, params)))
    return optax.chain(*parts), muon_schedule
