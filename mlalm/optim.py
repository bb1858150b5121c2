"""Optimizers as optax compositions: parameter labels, schedules, AdamW, clipping."""

from __future__ import annotations

import jax
import optax

# Labels by parameter name (the last attribute of its path); anything else is 'hidden'.
_NAMED_LABELS = {"embed_VD": "embedding", "head_DV": "head", "scale": "norm",
                 "w_router_DE": "router"}


def _name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    keys = [k for k in keys if k != "value"]
    return str(keys[-1])


def param_labels(params):
    """One label per parameter leaf: 'embedding', 'head', 'norm', 'router' or 'hidden'.

    'hidden' are the weight matrices inside the blocks (attention projections, MLA's
    down/up projections, dense FFN, shared and routed experts).
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: _NAMED_LABELS.get(_name(p), "hidden"),
                                            params)


def make_schedule(o, steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup, then cosine / warmup-stable-decay / constant."""
    warmup = min(o.warmup_steps, max(steps - 1, 0))
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
        [warmup, stable_end])


def build_optimizer(cfg, steps: int):
    """(optax transform, schedule) for ``cfg.optim``.

    AdamW decays only the 'hidden' matrices (and the embedding and head when
    ``optim.decay_embeddings``); norms and the router are never decayed.  Gradients are
    clipped by global norm first when ``optim.clip_norm > 0``.
    """
    o = cfg.optim
    schedule = make_schedule(o, steps)
    decayed = {"hidden"} | ({"embedding", "head"} if o.decay_embeddings else set())

    def decay_mask(params):
        return jax.tree.map(lambda label: label in decayed, param_labels(params))

    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
