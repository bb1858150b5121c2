"""mlalm's training step: forward, backward and optimizer update, exactly as train.py
runs it (``mlalm.train.init_state`` + ``make_train_step`` + ``mlalm.optim.build_optimizer``,
on one device), timed on one fixed random batch.

tokens/s = batch x seq_len / (median step time after warm-up, each step blocked on);
the model FLOPs per token are ``mlalm.flops.flops_per_token`` (MFU is computed from them
and the peak in ``mlalm.bench.report``).
"""

from __future__ import annotations

import time

from mlalm.bench.common import (
    SEED,
    batch_tokens,
    jax_info,
    load_config,
    max_rss_bytes,
    peak_memory,
    summarise,
    xla_cost,
)

# The schedule's length does not change what a step costs; any length past the warm-up will do.
SCHEDULE_STEPS = 1000


def build(cfg, *, seed: int = SEED):
    """``(graphdef, tx, schedule, state, step_fn, batch)``: the train state and the jitted
    step as the trainer builds them (without a mesh), and the fixed batch [B, T+1]."""
    import jax.numpy as jnp

    from mlalm.optim import build_optimizer
    from mlalm.train import init_state, make_train_step

    tx, schedule = build_optimizer(cfg, SCHEDULE_STEPS)
    graphdef, state = init_state(cfg, tx, seed=seed)
    step_fn = make_train_step(graphdef, tx, schedule, cfg)
    t = cfg.train
    batch = jnp.asarray(batch_tokens(cfg.model.vocab_size, t.batch_size, t.seq_len))
    return graphdef, tx, schedule, state, step_fn, batch


def time_steps(step_fn, state, batch, steps: int, warmup: int):
    """``warmup`` then ``steps`` donated steps, each blocked on.

    Returns:
        (state, last metrics, wall seconds per timed step, process CPU seconds per step).
    """
    import jax

    metrics = None
    for _ in range(warmup):
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return state, metrics, times, cpu


def measure(cfg, *, steps: int, warmup: int) -> dict:
    """Time ``cfg``'s training step.

    Returns:
        step times ('step_s' median, 'step_s_min', 'step_s_max', 'step_times_s',
        'cpu_per_wall'), 'tokens_per_step', 'tokens_per_s', 'compile_s',
        'flops_per_token', 'macs_per_token' (by part), 'model_flops_per_step', XLA's
        'xla_flops' / 'xla_bytes_accessed', 'params', 'active_params', 'moe_dispatch'
        (as resolved on this backend; None for a dense model), 'dtype', 'param_dtype',
        'final_loss', 'rss_after_import_bytes', 'peak_memory_bytes' and its source, and
        the backend facts.
    """
    from flax import nnx

    from mlalm.flops import flops_per_token, macs_per_token
    from mlalm.model import count_params
    from mlalm.model.moe import resolve_dispatch

    rss_import = max_rss_bytes()
    t = cfg.train
    graphdef, _, _, state, step_fn, batch = build(cfg)
    model = nnx.merge(graphdef, state.params, state.rest)  # shares the state's arrays
    n_params, n_active = count_params(model), count_params(model, active=True)
    del model
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = xla_cost(compiled)
    state, metrics, times, cpu = time_steps(compiled, state, batch, steps, warmup)
    assert metrics is not None, "steps must be >= 1 (scripts/bench.py checks it)"
    tokens = t.batch_size * t.seq_len
    s = summarise(times, cpu)
    fpt = flops_per_token(cfg, t.seq_len)
    moe = cfg.moe.n_routed_experts > 0
    return {
        **jax_info(),
        **s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / s["step_s"],
        "compile_s": compile_s,
        "flops_per_token": fpt,
        "macs_per_token": macs_per_token(cfg, t.seq_len),
        "model_flops_per_step": fpt * tokens,
        **cost,
        "params": n_params,
        "active_params": n_active,
        "moe_dispatch": resolve_dispatch(cfg.moe.dispatch) if moe else None,
        "dtype": cfg.model.dtype,
        "param_dtype": cfg.model.param_dtype,
        "final_loss": float(metrics["loss"]),
        "rss_after_import_bytes": rss_import,
        **peak_memory(),
    }


def worker(spec: dict) -> dict:
    """Spec: 'config', 'overrides', 'steps', 'warmup'."""
    return measure(load_config(spec), steps=spec["steps"], warmup=spec["warmup"])
