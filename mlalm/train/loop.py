"""``train(cfg)``: the orchestration of a run (data, state, steps, evaluation, checkpoints).

The pieces live beside it: ``state`` (TrainState), ``step`` (the jitted steps),
``run_dir`` (which directory, resume policy, lock), ``report``/``metrics`` (logging and
the non-finite policy), ``signals`` (SIGTERM/SIGINT) and ``mlalm.checkpoint`` (storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Set as AbstractSet

import jax

from mlalm.checkpoint import Checkpointer, abstract_arrays
from mlalm.config import Config, to_yaml
from mlalm.data import Windows, load_corpus
from mlalm.errors import ConfigError
from mlalm.evaluate import score, scored_bytes
from mlalm.flops import flops_per_token, peak_flops
from mlalm.inference import check_fits
from mlalm.optim import build_optimizer, effective_warmup
from mlalm.sharding import Placement, global_batch, maybe_initialize_distributed
from mlalm.train import init_from
from mlalm.train.metrics import MetricsLogger, perplexity
from mlalm.train.report import SourceTokens, StepReporter
from mlalm.train.run_dir import (
    RunLock,
    check_compatible,
    plan_run,
    set_aside_after,
    truncate_metrics,
    write_json_atomic,
)
from mlalm.train.signals import StopFlag
from mlalm.train.state import TrainState, check_memory, init_state
from mlalm.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class TrainResult:
    """What a run ended with.  ``summary`` is what summary.json holds (None when the run
    stopped early on a signal: ``stopped`` names it, and the same command resumes)."""

    run_dir: str
    cfg: Config
    graphdef: object
    state: TrainState
    step: int
    summary: dict | None = None
    stopped: str | None = None


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    m = cfg.model
    if m.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=vocab_size))
    if m.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); remove it to use the tokenizer's size"
        )
    return cfg


def enable_compile_cache(cache_dir: str | None) -> None:
    """JAX's persistent compilation cache in ``CACHE_DIR/jax`` (``data.cache_dir``, default
    ~/.cache/mlalm), unless one is configured already (JAX_COMPILATION_CACHE_DIR): a second
    start of the same model skips XLA compilation (the tiny test model: 4.4 s -> 1.1 s).
    Programs are keyed by their HLO, the compile options and the JAX/XLA versions."""
    # jax.config's flags are attributes set at run time, which its stubs do not declare
    if jax.config.jax_compilation_cache_dir:  # pyright: ignore[reportAttributeAccessIssue] - dynamic
        return
    root = cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlalm"
    )
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def train(
    cfg: Config,
    *,
    default_name: str = "default",
    log=print,
    given: AbstractSet[tuple[str, str]] = frozenset(),
) -> TrainResult:
    """Run training as ``cfg`` says (resuming as ``train.resume`` says).

    ``given``: the (section, key) pairs the user set; with ``train.init_from`` a model key
    among them that disagrees with the source is an error (``mlalm.train.init_from``).

    Raises:
        ConfigError, DataError: before anything is written to the run directory.
        CheckpointError: a checkpoint that cannot be resumed or saved.
        NonFiniteError: a non-finite loss, gradient or update (``train.on_nonfinite``).
    """
    t = cfg.train
    maybe_initialize_distributed(cfg.mesh)  # before anything touches a device
    if t.compile_cache:
        enable_compile_cache(cfg.data.cache_dir)
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *_: None)
    cfg = init_from.resolve(cfg, given)  # the source's model sections and tokenizer, if any
    t = cfg.train
    log(f"reading {cfg.data.path or 'the built-in corpus'} ({cfg.data.tokenizer} tokenizer) ...")
    # all input errors surface here, before any write; raw text is prepared into the cache once
    corpus = load_corpus(cfg.data, log=log, progress=t.progress and is_main and sys.stderr.isatty())
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    if effective_warmup(cfg.optim, t.steps) != cfg.optim.warmup_steps:
        log(
            f"note: optim.warmup_steps={cfg.optim.warmup_steps} is not below train.steps={t.steps}; "
            f"warming up over {effective_warmup(cfg.optim, t.steps)} steps instead, so the schedule decays"
        )
    train_ds = corpus.train_dataset(
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        seed=t.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        prefetch=cfg.data.prefetch,
        num_threads=max(1, cfg.data.num_workers),
        with_source=corpus.sources is not None,
    )
    for split, tokens in (("validation", corpus.val), ("test", corpus.test)):
        if tokens is not None:  # too short: DataError, before any write
            Windows(tokens, t.seq_len, name=f"{split} split")
    check_memory(cfg)
    tx, schedule = build_optimizer(cfg, t.steps)
    graphdef, state = init_state(cfg, tx, seed=t.seed)
    placement = Placement(cfg, state)  # a mesh that does not fit: ConfigError, before any write
    state = placement.put_state(state)
    plan = plan_run(cfg, default_name)
    if plan.note:
        log(plan.note)
    with RunLock(plan.run_dir) if is_main else contextlib.nullcontext():
        return _run(cfg, plan, corpus, train_ds, graphdef, state, placement, tx, schedule, log)


def _run(cfg, plan, corpus, train_ds, graphdef, state, placement, tx, schedule, log) -> TrainResult:
    t, ck, run_dir = cfg.train, cfg.checkpoint, plan.run_dir
    is_main = jax.process_index() == 0
    it = iter(train_ds)
    checkpointer = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=ck.keep,
        keep_best=ck.keep_best,
        async_save=ck.async_save,
        log=log,
    )
    start_step, elapsed0, meta = 0, 0.0, {}
    if plan.checkpoints is not None:
        same = os.path.abspath(plan.checkpoints) == checkpointer.directory
        source = checkpointer if same else Checkpointer(plan.checkpoints, async_save=False, log=log)

        def check(meta, step_dir):  # a different model is an error, not damage
            check_compatible(cfg, meta["config"], f"checkpoint {step_dir}")
            check_fits(os.path.join(step_dir, "state"), {"params": state.params, "rest": state.rest})

        restored = source.restore(abstract_arrays(state, placement.state_sh), it, step=plan.step, check=check)
        if restored is not None:
            state, meta = restored
            start_step, elapsed0 = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
            if start_step > t.steps:
                raise ConfigError(
                    f"the checkpoint is at step {start_step}, past train.steps={t.steps}; "
                    f"raise train.steps to train further"
                )
            log(f"resuming from {source.directory}/{start_step} (step {start_step}/{t.steps})")
    if start_step == 0 and t.init_from is not None:  # fresh optimizer at step 0
        params, rest = init_from.load_weights(cfg, state.params, state.rest)
        state = placement.put_state(
            dataclasses.replace(state, params=params, opt_state=tx.init(params), rest=rest)
        )
        log(f"initialised from {t.init_from} (step 0, fresh optimizer)")
    if is_main:
        if start_step:
            set_aside_after(run_dir, start_step, log)
            checkpointer.steps()  # the manager forgets the checkpoints moved aside
        truncate_metrics(run_dir, start_step)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        corpus.tokenizer.save(run_dir)
    mix = (
        SourceTokens([s.path for s in corpus.sources], t.seq_len, meta.get("source_tokens"))
        if corpus.sources
        else None
    )
    step_fn = make_train_step(graphdef, tx, schedule, cfg, placement)
    eval_step = make_eval_step(cfg, placement)
    logger = MetricsLogger(
        run_dir if is_main else None,
        total_steps=t.steps,
        start_step=start_step,
        progress=t.progress and is_main,
        log=log,
    )
    reporter = StepReporter(
        cfg,
        logger,
        start_step=start_step,
        flops_per_token=flops_per_token(cfg, t.seq_len),
        peak=peak_flops(),
        extra=mix.record if mix else None,
    )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    m = cfg.moe
    log(
        f"run dir {run_dir} | {n_params / 1e6:.2f}M parameters | {cfg.attention.kind} attention | "
        f"{f'MoE {m.n_routed_experts} experts' if m.n_routed_experts else 'dense'} | {t.steps} steps x "
        f"{t.batch_size * t.seq_len} tokens | {jax.devices()[0].platform} x{jax.device_count()} "
        f"(mesh {dict(placement.mesh.shape)}"
        f"{f', {jax.process_count()} processes' if jax.process_count() > 1 else ''})"
    )
    meta = {"seed": t.seed, "config": cfg.to_dict()}

    def evaluate(tokens, n_bytes, max_batches, stop=None):
        nll, n = score(
            eval_step,
            state.params,
            state.rest,
            tokens,
            eos_id=corpus.tokenizer.eos_id,
            seq_len=t.seq_len,
            batch_size=t.batch_size,
            max_batches=max_batches,
            placement=placement,
            stop=stop,
        )
        return {
            "loss": nll / n,
            "tokens": n,
            "whole_split": n == len(tokens),
            "bits_per_byte": nll / math.log(2) / scored_bytes(tokens, n, corpus.tokenizer, n_bytes),
        }

    def save(step, val_loss=None):
        nonlocal last_saved
        last_saved = step
        t0 = time.perf_counter()
        extra = {"source_tokens": mix.totals()} if mix else {}
        checkpointer.save(
            step, state, it, {**meta, **extra, "elapsed_s": time.perf_counter() - start}, val_loss=val_loss
        )
        reporter.paused(time.perf_counter() - t0)

    def report_saves(done):
        if done is not None:
            logger.console(f"checkpoint {done[0]} saved in {checkpointer.directory} ({done[1]:.1f}s)")

    start = time.perf_counter() - elapsed0
    step, pending, stopped, last_saved = start_step, [], None, start_step if plan.checkpoints else None
    try:
        with StopFlag(logger.console) as stop:
            if start_step < t.steps:
                logger.console("compiling the train step (the first step takes longer) ...")
            for step in range(start_step + 1, t.steps + 1):
                batch = next(it) if mix is None else mix.count(next(it))
                state, metrics = step_fn(state, global_batch(batch, placement.batch_sh, t.batch_size))
                val = None
                if step % t.eval_every == 0 and step != t.steps:
                    t0 = time.perf_counter()
                    val = evaluate(corpus.val, corpus.val_bytes, t.eval_batches)
                    reporter.paused(time.perf_counter() - t0)
                pending.append((step, metrics, val))
                if len(pending) > 1:
                    reporter.step(*pending.pop(0))
                if (ck.every and step % ck.every == 0) or step == t.steps:
                    save(step, val["loss"] if val else None)
                    logger.console(f"saving checkpoint {step} ...")
                report_saves(checkpointer.finished())
                if stop.agreed(jax.process_count()):
                    stopped = stop.requested or "a signal on another process"
                    break
            while pending:
                reporter.step(*pending.pop(0))
            if stopped is None:  # the final evaluation, interruptible between batches
                report_saves(checkpointer.wait())
                logger.console("final evaluation ...")
                agreed = lambda: stop.agreed(jax.process_count())  # noqa: E731
                final = evaluate(corpus.val, corpus.val_bytes, t.final_eval_batches, stop=agreed)
                test = (
                    evaluate(corpus.test, corpus.test_bytes, 0, stop=agreed)
                    if corpus.test is not None
                    else None
                )
                if stop.requested:  # cut short: the next run of the same command evaluates again
                    stopped = stop.requested
            if stopped:
                if last_saved != step:
                    save(step)
                checkpointer.close()
                logger.console(
                    f"stopped by {stopped} after step {step}; checkpoint {step} is saved in "
                    f"{checkpointer.directory}; run the same command again to continue"
                )
                return TrainResult(run_dir, cfg, graphdef, state, step, stopped=stopped)
            checkpointer.close()
            summary = _summary(cfg, run_dir, final, test, start, elapsed0, start_step, n_params)
            logger.write(
                t.steps,
                {
                    "final": True,
                    "val_loss": final["loss"],
                    "val_tokens": final["tokens"],
                    "val_whole_split": final["whole_split"],
                    **({"test_loss": test["loss"]} if test else {}),
                },
                {
                    "val/loss": final["loss"],
                    "val/perplexity": perplexity(final["loss"]),
                    **({"test/loss": test["loss"]} if test else {}),
                },
            )
            if is_main:
                write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    except BaseException:
        checkpointer.abandon()
        raise
    finally:
        logger.close()
    _log_done(log, summary, run_dir)
    return TrainResult(run_dir, cfg, graphdef, state, t.steps, summary=summary)


def _summary(cfg, run_dir, final, test, start, elapsed0, start_step, n_params) -> dict:
    t = cfg.train
    train_time = time.perf_counter() - start - elapsed0
    s = {
        "run_dir": run_dir,
        "steps": t.steps,
        "params": int(n_params),
        "val_loss": final["loss"],
        "val_perplexity": perplexity(final["loss"]),
        "val_bits_per_byte": final["bits_per_byte"],
        "val_tokens": final["tokens"],
        "val_whole_split": final["whole_split"],
        "train_seconds": train_time,
        "tokens_per_s": (t.steps - start_step) * t.batch_size * t.seq_len / max(train_time, 1e-9),
    }
    if test is not None:
        s.update(
            test_loss=test["loss"],
            test_perplexity=perplexity(test["loss"]),
            test_bits_per_byte=test["bits_per_byte"],
            test_tokens=test["tokens"],
        )
    return s


def _log_done(log, s: dict, run_dir: str) -> None:
    if "test_loss" in s:
        log(f"test loss {s['test_loss']:.4f} (perplexity {s['test_perplexity']:.2f}, whole split)")
    cover = "whole split" if s["val_whole_split"] else f"first {s['val_tokens']:,} tokens"
    log(
        f"done: validation loss {s['val_loss']:.4f} (perplexity {s['val_perplexity']:.2f}, "
        f"{s['val_bits_per_byte']:.3f} bits/byte, {cover}) | {s['train_seconds']:.0f}s training, "
        f"{s['tokens_per_s']:,.0f} tok/s"
    )
    log(
        f"outputs in {run_dir}; next:\n"
        f"  python eval.py {run_dir}\n"
        f'  python scripts/generate.py {run_dir} --prompt "..."\n'
        f"  python scripts/export.py {run_dir} {run_dir}-hf --format hf"
    )
