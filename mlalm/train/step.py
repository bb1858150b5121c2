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
from mlalm.train.state import TrainState, split_model


def lm_loss(graphdef, params, rest, tokens_BT1, aux_coef: float, loss_chunk: int = 0):
    """Mean next-token cross-entropy (float32) + aux_coef · sequence-wise balance loss.

    ``loss_chunk`` > 0: the LM head and cross-entropy fused in chunks of about that many
    tokens (``mlalm.model.loss``; never materialises the logits); 0: plain logits + optax.
    Returns ``(loss, (nll, aux))``.
    """
    model = nnx.merge(graphdef, params, rest)
    h, aux = model.hidden(tokens_BT1[:, :-1])
    labels = tokens_BT1[:, 1:]
    if loss_chunk:
        nll = lm_head_cross_entropy(h, model.head_weight(), labels, chunk_tokens=loss_chunk)
    else:
        nll = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), labels).mean()
    return nll + aux_coef * aux["balance_loss"], (nll, aux)


def _load_shape(cfg: Config) -> tuple[int, int]:
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.model.n_layers))
    return (n_moe, max(cfg.moe.n_routed_experts, 1))


def _loss_and_grads(grad_fn, params, rest, batch, cfg: Config):
    """Gradients of the mean loss over ``train.grad_accum`` micro-batches of ``batch``."""
    accum = cfg.train.grad_accum
    if accum == 1:
        (loss, (nll, aux)), grads = grad_fn(params, rest, batch)
        return loss, nll, aux["expert_load"], aux["balance_loss"], aux["attn_max_logit"], grads
    micro = batch.reshape((accum, -1) + batch.shape[1:])

    def body(carry, mb):
        (l, (n, a)), g = grad_fn(params, rest, mb)
        summed = jax.tree.map(jnp.add, carry[:5], (l, n, a["expert_load"], a["balance_loss"], g))
        return summed + (jnp.maximum(carry[5], a["attn_max_logit"]),), None

    zero = jnp.zeros((), jnp.float32)
    init = (
        zero,
        zero,
        jnp.zeros(_load_shape(cfg), jnp.float32),
        zero,
        jax.tree.map(jnp.zeros_like, params),
        jnp.full((cfg.model.n_layers, cfg.attention.n_heads), -jnp.inf, jnp.float32),
    )
    (loss, nll, load, balance, grads, max_logit), _ = jax.lax.scan(body, init, micro)
    grads = jax.tree.map(lambda g: g / accum, grads)
    return loss / accum, nll / accum, load, balance / accum, max_logit, grads


def make_train_step(graphdef, tx, schedule, cfg: Config, placement=None):
    """The jit-compiled ``step(state, batch[B, T+1]) -> (state, metrics)``; state donated.

    ``placement`` (``mlalm.sharding.Placement``): compiled with its state and batch
    shardings as in/out shardings; None: single device.
    """
    coef, rate = cfg.moe.seq_aux_loss_coef, cfg.moe.bias_update_rate
    grad_fn = jax.value_and_grad(
        lambda p, r, b: lm_loss(graphdef, p, r, b, coef, cfg.train.loss_chunk), has_aux=True
    )

    def step(state: TrainState, batch):
        params, rest = state.params, state.rest
        loss, nll, load, balance, max_logit, grads = _loss_and_grads(grad_fn, params, rest, batch, cfg)
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
            "nll": nll,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "balance_loss": balance,
            "expert_load": load,
            "finite": finite,
            "applied": applied,
            "attn_max_logit": jnp.max(max_logit, axis=1),
        }
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
