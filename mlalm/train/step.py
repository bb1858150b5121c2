"""The jit-compiled train and eval steps.

Train step, for a batch [B, T+1] of token ids:
  1. loss and gradients, accumulated over ``train.grad_accum`` micro-batches (lax.scan);
  2. if the loss and gradient norm are finite: the optax update (clipping, AdamW/Muon,
     schedule), the balancing-bias update from the step's expert loads, and QK-clip when
     ``optim.qk_clip_tau`` is set; the result is kept only if the new parameters are
     finite too (their global norm), so no step ever writes NaN into the state;
  3. otherwise the old state is kept, and the metrics say why (``finite``: loss and
     gradient norm; ``applied``: the update was kept).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlalm.config import Config
from mlalm.model.loss import lm_head_cross_entropy
from mlalm.model.mtp import mtp_cross_entropy
from mlalm.train.state import TrainState, split_model


def lm_loss(
    graphdef, params, rest, tokens_BT1, aux_coef: float, loss_chunk: int = 0, mtp_weight: float = 0.0
):
    """Mean next-token cross-entropy (float32) + aux_coef · sequence-wise balance loss,
    + mtp_weight / D · Σ_k L_k with multi-token prediction (``model.mtp_depth`` = D > 0).

    ``loss_chunk`` > 0: the LM head and cross-entropy fused in chunks of about that many
    tokens (``mlalm.model.loss``; never materialises the logits), for the MTP depths too;
    0: plain logits + optax.  L_k is depth k's mean NLL of t_{i+k+1} over the T - k
    positions whose target lies in the window (``mlalm.model.mtp.mtp_cross_entropy``).
    Returns ``(loss, (nll, aux))``; with MTP, ``aux['mtp_nll']`` holds [L_1, ..., L_D].
    """
    model = nnx.merge(graphdef, params, rest)
    inputs, labels = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    if not model.mtp_depth:
        h, aux = model.hidden(inputs)
        mtp_h = []
    else:
        h, mtp_h, aux = model.hidden_mtp(inputs)
    w = model.head_weight()
    if loss_chunk:
        nll = lm_head_cross_entropy(h, w, labels, chunk_tokens=loss_chunk)
    else:
        nll = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), labels).mean()
    loss = nll + aux_coef * aux["balance_loss"]
    if mtp_h:
        with jax.named_scope("mtp_loss"):
            mtp_nll = jnp.stack(
                [
                    mtp_cross_entropy(hk, w, labels, k, chunk_tokens=loss_chunk)
                    for k, hk in enumerate(mtp_h, 1)
                ]
            )
        loss = loss + mtp_weight / len(mtp_h) * jnp.sum(mtp_nll)
        aux = {**aux, "mtp_nll": mtp_nll}
    return loss, (nll, aux)


def _load_shape(cfg: Config) -> tuple[int, int]:
    """expert_load's shape: the MoE layers of the main model, then those of the MTP modules."""
    n_layers = cfg.model.n_layers + cfg.model.mtp_depth
    n_moe = sum(cfg.is_moe_layer(i) for i in range(n_layers))
    return (n_moe, max(cfg.moe.n_routed_experts, 1))


# how each per-micro-batch figure combines over gradient accumulation
_SUMMED = ("loss", "nll", "balance_loss", "mtp_nll", "grads")  # then divided by the count
_ADDED = ("expert_load",)  # token counts: added
_MAXED = ("attn_max_logit",)


def _loss_and_grads(grad_fn, params, rest, batch, cfg: Config) -> dict:
    """Loss figures and gradients of the mean loss over ``train.grad_accum`` micro-batches
    of ``batch``: {'loss', 'nll', 'expert_load', 'balance_loss', 'attn_max_logit',
    'grads'} and 'mtp_nll' with MTP."""

    def one(mb):
        (l, (n, a)), g = grad_fn(params, rest, mb)
        return {"loss": l, "nll": n, "grads": g, **a}

    accum = cfg.train.grad_accum
    if accum == 1:
        return one(batch)
    micro = batch.reshape((accum, -1) + batch.shape[1:])

    def body(carry, mb):
        out = one(mb)
        combine = lambda k: jnp.maximum if k in _MAXED else jnp.add  # noqa: E731
        return {k: jax.tree.map(combine(k), carry[k], v) for k, v in out.items()}, None

    shapes = jax.eval_shape(one, micro[0])
    init = {
        k: jax.tree.map(lambda x: jnp.full(x.shape, -jnp.inf if k in _MAXED else 0, x.dtype), v)
        for k, v in shapes.items()
    }
    total, _ = jax.lax.scan(body, init, micro)
    return {k: jax.tree.map(lambda x: x / accum, v) if k in _SUMMED else v for k, v in total.items()}


def make_train_step(graphdef, tx, schedule, cfg: Config, placement=None):
    """The jit-compiled ``step(state, batch[B, T+1]) -> (state, metrics)``; state donated.

    ``placement`` (``mlalm.sharding.Placement``): compiled with its state and batch
    shardings as in/out shardings; None: single device.
    """
    coef, rate = cfg.moe.seq_aux_loss_coef, cfg.moe.bias_update_rate
    t = cfg.train
    grad_fn = jax.value_and_grad(
        lambda p, r, b: lm_loss(graphdef, p, r, b, coef, t.loss_chunk, t.mtp_loss_weight), has_aux=True
    )

    def step(state: TrainState, batch):
        params, rest = state.params, state.rest
        out = _loss_and_grads(grad_fn, params, rest, batch, cfg)
        loss, grads, load, max_logit = out["loss"], out["grads"], out["expert_load"], out["attn_max_logit"]
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(old):
            params, opt_state, rest = old
            updates, opt_state = tx.update(grads, opt_state, params)
            model = nnx.merge(graphdef, optax.apply_updates(params, updates), rest)
            if rate > 0 and load.shape[0]:
                model.update_balance_biases(load, rate)
            if cfg.optim.qk_clip_tau is not None:
                model.apply_qk_clip(max_logit, cfg.optim.qk_clip_tau)
            _, params, rest = split_model(model)
            # An update can be non-finite although loss and gradients are (e.g. a zero
            # denominator in the optimizer): keep the old state then.
            ok = jnp.isfinite(optax.tree_utils.tree_norm(params))
            new = (params, opt_state, rest)
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old), ok

        # a non-finite loss keeps the old state.  lax.cond rather than jnp.where over the
        # whole state: the skip branch passes the donated buffers through untouched.
        with jax.named_scope("optimizer"):
            (new_params, opt_state, new_rest), applied = jax.lax.cond(
                finite, update, lambda old: (old, jnp.zeros((), bool)), (params, state.opt_state, rest)
            )
        new_state = TrainState(params=new_params, opt_state=opt_state, rest=new_rest, step=state.step + 1)
        metrics = {
            "loss": loss,
            "nll": out["nll"],
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "balance_loss": out["balance_loss"],
            "expert_load": load,
            "finite": finite,
            "applied": applied,
            "attn_max_logit": jnp.max(max_logit, axis=1),  # [L + D]: the MTP blocks last
        }
        if "mtp_nll" in out:
            metrics["mtp_loss"] = out["mtp_nll"]  # [D]: depth k's mean NLL
        return new_state, metrics

    if placement is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(
        step,
        in_shardings=(placement.state_sh, placement.batch_sh),
        out_shardings=(placement.state_sh, placement.repl),
        donate_argnums=(0,),
    )


def eval_graphdef(cfg: Config):
    """The graphdef evaluation runs: ``cfg``'s model with dropless MoE routing, so that no
    token's score depends on the other tokens of its batch (capacity dispatch can drop
    tokens).  Parameters of the training graphdef merge into it unchanged."""
    from mlalm.model import Transformer

    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless"))
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef


def make_eval_step(cfg: Config, placement=None):
    """The jit-compiled ``eval_step(params, rest, x_BT, y_BT, w_BT) -> Σ w·NLL`` (float32).

    ``x`` are the inputs, ``y`` the targets, ``w`` 1 where a target is scored (see
    ``mlalm.evaluate.window_batches``); MoE routing is dropless (:func:`eval_graphdef`).
    """
    graphdef = eval_graphdef(cfg)

    def eval_step(params, rest, x_BT, y_BT, w_BT):
        logits_BTV = nnx.merge(graphdef, params, rest)(x_BT).astype(jnp.float32)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT)
        return jnp.sum(nll_BT * w_BT)

    if placement is None:
        return jax.jit(eval_step)
    sh = placement.state_sh
    rows = placement.batch_sh
    return jax.jit(
        eval_step, in_shardings=(sh.params, sh.rest, rows, rows, rows), out_shardings=placement.repl
    )
