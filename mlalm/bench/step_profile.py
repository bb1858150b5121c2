"""Where the training step's time goes (``scripts/bench.py --profile``).

Timed entries, in groups:
  parts        the whole step, the forward (loss), forward + backward, the optimizer update
  layer_parts  one layer's attention (and, for MLA, the attention core alone), dense FFN,
               MoE FFN and its shared experts, the final norm + LM head + loss; each
               forward + backward on a random input with a non-trivial cotangent
  what_if      the attention core with other numbers of causal query blocks, the LM head
               + loss unfused
  variants     the whole step with the other MoE dispatch, capacity factor 1.0, bfloat16
               compute, no buffer donation, no clipping, the unfused LM head + loss
Everything is compiled first, then timed round-robin (one call of each per round), so
that load from other processes falls on all entries alike and the ratios between them
stay meaningful on a shared machine.  Then a per-HLO-op trace of the step
(``mlalm.profiling.op_profile``).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

from mlalm.bench import train_step
from mlalm.bench.common import load_config, log, summarise, xla_cost


class _Entries:
    """Compiled functions with their arguments, timed round-robin."""

    def __init__(self):
        self.entries, self.errors = [], {}

    def add(self, group, name, fn, *args, donate: int = 0):
        """Compile ``fn`` for ``args``; ``donate``: how many leading arguments it donates
        (their outputs are carried into the next call)."""
        try:
            t0 = time.perf_counter()
            compiled = fn.lower(*args).compile()
            comp = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - report and go on
            self.errors[name] = {"group": group, "error": f"{type(e).__name__}: {e}"}
            log(f"  {name}: {type(e).__name__}: {e}")
            return
        log(f"  compiled {name} ({comp:.1f}s)")
        self.entries.append(
            {
                "group": group,
                "name": name,
                "fn": compiled,
                "args": list(args),
                "donate": donate,
                "compile_s": comp,
                "cost": xla_cost(compiled),
                "times": [],
                "cpu": [],
            }
        )

    def time_round_robin(self, rounds: int, warmup: int):
        import jax

        def call(e, record):
            a, c = time.perf_counter(), time.process_time()
            r = e["fn"](*e["args"])
            jax.block_until_ready(r)
            if record:
                e["times"].append(time.perf_counter() - a)
                e["cpu"].append(time.process_time() - c)
            for i in range(e["donate"]):
                e["args"][i] = r[i]

        for _ in range(warmup):
            for e in self.entries:
                call(e, False)
        for i in range(rounds):
            for e in self.entries:
                call(e, True)
            log(f"  round {i + 1}/{rounds} done")


def _pieces(E: _Entries, cfg):
    """The step, its forward, forward + backward and update; returns the model (sharing
    the arrays of a second state) and the batch, for the layer parts."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mlalm.train import lm_loss

    t, coef = cfg.train, cfg.moe.seq_aux_loss_coef
    _, _, _, state, step_fn, batch = train_step.build(cfg)
    E.add("parts", "train_step", step_fn, state, batch, donate=1)
    # a second state (same seed) for the entries that do not donate
    graphdef, tx, _, state2, step_fn, batch = train_step.build(cfg)
    params, rest, opt_state = state2.params, state2.rest, state2.opt_state

    def loss(p, r, b):
        return lm_loss(graphdef, p, r, b, coef, t.loss_chunk)[0]

    E.add("parts", "forward (loss)", jax.jit(loss), params, rest, batch)
    grad = jax.jit(jax.value_and_grad(loss))
    E.add("parts", "forward + backward", grad, params, rest, batch)
    grads = grad(params, rest, batch)[1]

    def opt_update(o, p, g):
        u, o = tx.update(g, o, p)
        return o, optax.apply_updates(p, u)

    # donated as in the step (own copies: the entries above keep using params)
    E.add(
        "parts",
        "optimizer update (clip + AdamW)",
        jax.jit(opt_update, donate_argnums=(0, 1)),
        jax.tree.map(jnp.copy, opt_state),
        jax.tree.map(jnp.copy, params),
        grads,
        donate=2,
    )
    wrapped = getattr(step_fn, "__wrapped__", None)
    if wrapped is not None:  # the same step function without buffer donation
        E.add("variants", "no buffer donation", jax.jit(wrapped), state2, batch)
    return nnx.merge(graphdef, params, rest), batch


def _layer_parts(E: _Entries, cfg, model, batch):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mlalm.model.attention import attention_core
    from mlalm.model.layers import rope_tables
    from mlalm.model.loss import lm_head_cross_entropy

    t, a = cfg.train, cfg.attention
    B, T = t.batch_size, t.seq_len
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.model.d_model), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_tables(pos, model.rope_dim, cfg.model.rope_theta)

    def grad_of_sum_cos(f, argnums):
        # Σ y·cos(y): a cotangent that varies with y, unlike Σ y's constant one
        def loss(*args):
            y = f(*args)
            return jnp.sum(y * jnp.cos(y))

        return jax.jit(jax.value_and_grad(loss, argnums=argnums))

    def part(name, module, call):
        gd, st = nnx.split(module)
        E.add("layer_parts", name, grad_of_sum_cos(lambda s, x: call(nnx.merge(gd, s), x), (0, 1)), st, x)

    blocks = list(model.blocks)
    part("attention, one layer (norm excluded)", blocks[0].attn, lambda m, x: m(x, cos, sin)[0])
    if a.kind == "mla":
        N, dqk, dv = a.n_heads, a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
        qkv = (
            jax.random.normal(k1, (B, T, N, dqk)),
            jax.random.normal(k2, (B, T, N, dqk)),
            jax.random.normal(k3, (B, T, N, dv)),
        )
        core = partial(attention_core, scale=dqk**-0.5)
        E.add(
            "layer_parts",
            "  of which attention core (QK^T, mask, softmax, PV)",
            grad_of_sum_cos(lambda q, k, v: core(q, k, v)[0], (0, 1, 2)),
            *qkv,
        )
        # what-if: other numbers of causal query blocks (block i only multiplies the keys
        # of blocks <= i)
        for nb in (1, 2, 8):
            if T % nb == 0:
                E.add(
                    "what_if",
                    f"attention core with q_blocks={nb}",
                    grad_of_sum_cos(lambda q, k, v, nb=nb: core(q, k, v, q_blocks=nb)[0], (0, 1, 2)),
                    *qkv,
                )
    dense = [b for b in blocks if not b.is_moe]
    moe = [b for b in blocks if b.is_moe]
    if dense:
        part("dense FFN, one layer", dense[0].ffn, lambda m, x: m(x))
    if moe:
        part("MoE FFN, one layer", moe[0].ffn, lambda m, x: m(x)[0])
        if moe[0].ffn.shared is not None:
            part("  of which shared expert(s)", moe[0].ffn.shared, lambda m, x: m(x))
    norm_gd, norm_st = nnx.split(model.final_norm)
    labels = batch[:, 1:]

    def head_loss(p, x, chunk=t.loss_chunk):  # the final norm, then what lm_loss computes
        h = nnx.merge(norm_gd, p[0])(x)
        if chunk:
            return lm_head_cross_entropy(h, p[1], labels, chunk_tokens=chunk)
        logits = jnp.einsum("BTD,DV->BTV", h, p[1], preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    head = (norm_st, model.head_weight())
    E.add(
        "layer_parts",
        "final norm + LM head + loss",
        jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1))),
        head,
        x,
    )
    if t.loss_chunk:
        E.add(
            "what_if",
            "final norm + LM head + loss, unfused (train.loss_chunk=0)",
            jax.jit(jax.value_and_grad(partial(head_loss, chunk=0), argnums=(0, 1))),
            head,
            x,
        )


def _variants(E: _Entries, cfg):
    from mlalm.model.moe import resolve_dispatch

    R, t = dataclasses.replace, cfg.train

    def variant(name, new_cfg):
        try:
            _, _, _, st, fn, b = train_step.build(new_cfg)
        except Exception as e:  # noqa: BLE001 - report and go on
            E.errors[name] = {"group": "variants", "error": f"{type(e).__name__}: {e}"}
            return
        E.add("variants", name, fn, st, b, donate=1)

    if cfg.moe.n_routed_experts:
        other = "dropless" if resolve_dispatch(cfg.moe.dispatch) == "capacity" else "capacity"
        variant(f"moe.dispatch={other}", R(cfg, moe=R(cfg.moe, dispatch=other)))
        variant("moe.capacity_factor=1.0", R(cfg, moe=R(cfg.moe, dispatch="capacity", capacity_factor=1.0)))
    if cfg.model.dtype != "bfloat16":
        variant("model.dtype=bfloat16 (compute)", R(cfg, model=R(cfg.model, dtype="bfloat16")))
    if cfg.optim.clip_norm > 0:
        variant("optim.clip_norm=0 (no clipping)", R(cfg, optim=R(cfg.optim, clip_norm=0.0)))
    if t.loss_chunk:
        variant("train.loss_chunk=0 (unfused LM head + loss)", R(cfg, train=R(t, loss_chunk=0)))


def measure(cfg, *, rounds: int, warmup: int) -> dict:
    """{'rounds', 'parts', 'layer_parts', 'what_if', 'variants' (name -> step times,
    compile_s, XLA cost; or 'error'), 'ops' (the per-op trace of the step),
    'macs_per_token', 'tokens_per_step'}."""
    from mlalm import profiling
    from mlalm.flops import macs_per_token

    E = _Entries()
    model, batch = _pieces(E, cfg)
    _layer_parts(E, cfg, model, batch)
    _variants(E, cfg)
    E.time_round_robin(rounds, warmup)
    base = next((e for e in E.entries if e["name"] == "train_step"), None)
    op = None
    if base is not None:
        log("  per-op trace of train_step")
        try:
            op = profiling.op_profile(base["fn"], base["args"], True, max(2, min(rounds, 5)))
        except Exception as e:  # noqa: BLE001 - the profiler is optional
            op = {"error": f"{type(e).__name__}: {e}"}
    t = cfg.train
    out = {
        "rounds": rounds,
        "parts": {},
        "layer_parts": {},
        "variants": {},
        "what_if": {},
        "ops": op,
        "macs_per_token": macs_per_token(cfg, t.seq_len),
        "tokens_per_step": t.batch_size * t.seq_len,
    }
    for e in E.entries:
        out[e["group"]][e["name"]] = {
            **summarise(e["times"], e["cpu"]),
            "compile_s": e["compile_s"],
            **e["cost"],
        }
    for name, err in E.errors.items():
        out[err["group"]][name] = {"error": err["error"]}
    return out


def worker(spec: dict) -> dict:
    """Spec: 'config', 'overrides', 'steps' (rounds), 'warmup'."""
    return measure(load_config(spec), rounds=spec["steps"], warmup=spec["warmup"])
