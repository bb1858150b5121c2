"""The train loop: one jit-compiled step, periodic validation, TensorBoard and JSONL logs.

State is a plain pytree ``{'params', 'opt_state', 'rest', 'step'}`` where ``rest`` holds
the non-trainable model variables (the MoE balancing biases).  The step:
  1. loss and gradients, accumulated over ``train.grad_accum`` micro-batches (lax.scan);
  2. the optax update (clipping, AdamW, schedule);
  3. the balancing-bias update from the step's expert loads, and QK-clip when
     ``optim.qk_clip_tau`` is set (each layer's largest logit per head is logged always);
  4. if the loss or gradient norm is not finite, the old state is kept (skip), and the
     host stops the run unless ``train.on_nonfinite: skip``.
The host reads each step's metrics one step late, so it never waits on the device
(multi-process runs add one scalar all-gather per step: agreeing to stop on SIGTERM).

Checkpoints (``mlalm.checkpoint``) are written every ``checkpoint.every`` steps and at the
end; ``train.resume`` picks up the newest complete one, and SIGTERM/SIGINT save and stop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mlalm.checkpoint import Checkpointer, abstract_arrays, find_checkpoint
from mlalm.config import Config, to_yaml
from mlalm.data import Windows, eval_batches, load_corpus, train_dataset
from mlalm.errors import CheckpointError, ConfigError
from mlalm.flops import flops_per_token, peak_flops
from mlalm.model import Transformer
from mlalm.model.loss import lm_head_cross_entropy
from mlalm.optim import build_optimizer
from mlalm.sharding import (batch_sharding, global_batch, make_mesh, maybe_initialize_distributed,
                            to_host, tree_shardings)


class NonFiniteError(RuntimeError):
    """The loss or gradient went non-finite; the message names the step."""


def split_model(model):
    """graphdef, trainable params, the rest (balancing biases)."""
    return nnx.split(model, nnx.Param, ...)


def lm_loss(graphdef, params, rest, tokens_BT1, aux_coef: float, loss_chunk: int = 0):
    """Mean next-token cross-entropy (float32) + aux_coef · sequence-wise balance loss.

    ``loss_chunk`` > 0: the LM head and cross-entropy fused in chunks of about that many
    tokens (``mlalm.model.loss``; never materialises the logits); 0: plain logits + optax.
    """
    model = nnx.merge(graphdef, params, rest)
    h, aux = model.hidden(tokens_BT1[:, :-1])
    labels = tokens_BT1[:, 1:]
    if loss_chunk:
        nll = lm_head_cross_entropy(h, model.head_weight(), labels, chunk_tokens=loss_chunk)
    else:
        nll = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), labels).mean()
    return nll + aux_coef * aux["balance_loss"], (nll, aux)


def make_train_step(graphdef, tx, schedule, cfg: Config, shardings=None):
    """The jit-compiled ``step(state, batch[B, T+1]) -> (state, metrics)``; state donated.

    ``shardings``: optional (state shardings, batch sharding, replicated sharding) from
    ``mlalm.sharding``; the step is then compiled with them as in/out shardings.
    """
    accum = cfg.train.grad_accum
    coef, rate = cfg.moe.seq_aux_loss_coef, cfg.moe.bias_update_rate
    grad_fn = jax.value_and_grad(
        lambda p, r, b: lm_loss(graphdef, p, r, b, coef, cfg.train.loss_chunk), has_aux=True)

    def step(state, batch):
        params, rest = state["params"], state["rest"]
        if accum == 1:
            (loss, (nll, aux)), grads = grad_fn(params, rest, batch)
            load, balance, max_logit = aux["expert_load"], aux["balance_loss"], aux["attn_max_logit"]
        else:
            micro = batch.reshape((accum, -1) + batch.shape[1:])

            def body(carry, mb):
                (l, (n, a)), g = grad_fn(params, rest, mb)
                summed = jax.tree.map(jnp.add, carry[:5], (l, n, a["expert_load"], a["balance_loss"], g))
                return summed + (jnp.maximum(carry[5], a["attn_max_logit"]),), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (0.0, 0.0, jnp.zeros(_load_shape(cfg)), 0.0, zeros,
                    jnp.full((cfg.model.n_layers, cfg.attention.n_heads), -jnp.inf))
            (loss, nll, load, balance, grads, max_logit), _ = jax.lax.scan(body, init, micro)
            loss, nll, balance = loss / accum, nll / accum, balance / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state, rest = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            model = nnx.merge(graphdef, optax.apply_updates(params, updates), rest)
            if rate > 0 and load.shape[0]:
                model.update_balance_biases(load, rate)
            if cfg.optim.qk_clip_tau is not None:
                model.apply_qk_clip(max_logit, cfg.optim.qk_clip_tau)
            _, params, rest = split_model(model)
            return params, opt_state, rest

        # a non-finite step keeps the old state.  lax.cond rather than jnp.where over the
        # whole state: the skip branch passes the donated buffers through, where a select
        # would read and write every parameter and moment once more (measured at the bench
        # configuration: 5.18 -> 4.98 GB accessed per step).
        with jax.named_scope("optimizer"):
            new_params, opt_state, new_rest = jax.lax.cond(
                finite, update, lambda operands: operands, (params, state["opt_state"], rest))
        new_state = {"params": new_params, "opt_state": opt_state, "rest": new_rest,
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "nll": nll, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "balance_loss": balance, "expert_load": load, "finite": finite,
                   "attn_max_logit": jnp.max(max_logit, axis=1)}
        return new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sh, batch_sh, repl = shardings
    return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                   donate_argnums=(0,))


def _load_shape(cfg):
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.model.n_layers))
    return (n_moe, max(cfg.moe.n_routed_experts, 1))


def make_eval_step(graphdef, placement=None):
    """``eval_step(params, rest, batch[B, T+1], weights[B]) -> (sum of NLL, token count)``."""
    def eval_step(params, rest, batch, weights):
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
        return (nll.sum(-1) * weights).sum(), weights.sum() * nll.shape[1]
    if placement is None:
        return jax.jit(eval_step)
    sh = placement.state_sh
    return jax.jit(eval_step, in_shardings=(sh["params"], sh["rest"], placement.batch_sh,
                                            placement.weights_sh), out_shardings=placement.repl)


def evaluate(eval_step, params, rest, tokens, *, seq_len: int, batch_size: int, max_batches: int = 0,
             placement=None):
    """Mean NLL per token over non-overlapping windows of the split (short batch padded)."""
    total, count = 0.0, 0.0
    for batch in eval_batches(tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches):
        n = batch.shape[0]
        weights = np.zeros(batch_size, np.float32)
        weights[:n] = 1.0
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, batch.shape[1]), batch.dtype)])
        if placement is not None:
            batch, weights = placement.global_rows(batch), placement.global_rows(weights, placement.weights_sh)
        s, c = eval_step(params, rest, batch, weights)
        total, count = total + float(to_host(s)), count + float(to_host(c))
    return total / count


class Placement:
    """Where the state and batches live: the mesh, and NamedShardings from its rules."""

    def __init__(self, cfg: Config, state, devices=None):
        self.mesh = make_mesh(cfg.mesh, devices)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.train.batch_size % (dp * cfg.train.grad_accum):
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by mesh data x fsdp "
                f"({dp}) x train.grad_accum ({cfg.train.grad_accum})")
        self.state_sh = tree_shardings(state, self.mesh)
        self.batch_sh = batch_sharding(self.mesh)
        self.weights_sh = NamedSharding(self.mesh, P(self.batch_sh.spec[0]))
        self.repl = NamedSharding(self.mesh, P())

    def put_state(self, state):
        return jax.device_put(state, self.state_sh)

    def global_rows(self, rows: np.ndarray, sharding=None):
        """A global array from a host array holding every row (each process keeps its slice)."""
        sharding = sharding or self.batch_sh
        n, p = jax.process_count(), jax.process_index()
        per = rows.shape[0] // n
        return global_batch(rows[p * per:(p + 1) * per], sharding, rows.shape[0])


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    m = cfg.model
    if m.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=vocab_size))
    if m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size}); remove it to use the tokenizer's size")
    return cfg


class _Logger:
    """metrics.jsonl + TensorBoard (tensorboardX) + console."""

    def __init__(self, run_dir: str, purge_step=None):
        from tensorboardX import SummaryWriter
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(run_dir, purge_step=purge_step)  # a resumed run replaces later events

    def log(self, step: int, record: dict, scalars: dict, loads=None):
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        if loads is not None:
            for i, load in enumerate(loads):
                frac = load / max(load.sum(), 1)
                self.tb.add_scalar(f"moe/load_cv/layer{i}", float(frac.std() / max(frac.mean(), 1e-9)), step)
                self.tb.add_histogram(f"moe/load/layer{i}", frac, step)
        self.tb.flush()

    def close(self):
        self.jsonl.close()
        self.tb.close()


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metrics.jsonl rows after the checkpoint a run resumes from: those steps run
    again (identically) and are logged again.  Written to a new file, then renamed."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


class _NullLogger:
    def log(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _unique_run_dir(cfg: Config, default_name: str) -> str:
    name = cfg.train.name or default_name
    path = os.path.join(cfg.train.run_dir, name)
    n = 2
    while os.path.exists(os.path.join(path, "metrics.jsonl")):
        path = os.path.join(cfg.train.run_dir, f"{name}-{n}")
        n += 1
    return path


def _has_checkpoint(run_dir: str) -> bool:
    d = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(d) and any(x.isdigit() for x in os.listdir(d))


def _choose_run_dir(cfg: Config, default_name: str):
    """(run_dir, checkpoints directory to resume from or None), as ``train.resume`` says.

    auto: the configured run directory when it holds checkpoints of an unfinished run
    (no summary.json); otherwise a fresh directory (``name-2``, ... when taken).
    A path: resume from that checkpoint; the run continues in that run directory when it
    is the configured one, else in a fresh one.
    """
    r = cfg.train.resume
    configured = os.path.join(cfg.train.run_dir, cfg.train.name or default_name)
    if r == "never":
        return _unique_run_dir(cfg, default_name), None
    if r == "auto":
        if _has_checkpoint(configured) and not os.path.exists(os.path.join(configured, "summary.json")):
            return configured, os.path.join(configured, "checkpoints")
        return _unique_run_dir(cfg, default_name), None
    if not os.path.exists(r):
        raise CheckpointError(f"train.resume={r}: no such checkpoint or run directory")
    step_dir = find_checkpoint(r)  # CheckpointError when it holds none
    ckpts = os.path.dirname(step_dir)
    same = os.path.abspath(os.path.dirname(ckpts)) == os.path.abspath(configured)
    return (configured if same else _unique_run_dir(cfg, default_name)), ckpts


_ARCH_SECTIONS = ("model", "attention", "moe")
_FREE_KEYS = {("attention", "impl"), ("moe", "dispatch"), ("moe", "capacity_factor"), ("model", "dtype"),
              ("moe", "bias_update_rate"), ("moe", "seq_aux_loss_coef")}  # same parameters either way


def _check_compatible(cfg: Config, saved: dict, where: str) -> None:
    """The checkpoint must describe the same model (optimizer and schedule may change)."""
    now = cfg.to_dict()
    keys = [(sec, k) for sec in _ARCH_SECTIONS for k in now[sec] if (sec, k) not in _FREE_KEYS]
    keys.append(("optim", "name"))  # the optimizer state's structure
    for section, key in keys:
        old, value = saved.get(section, {}).get(key), now[section][key]
        if old != value:
            raise CheckpointError(
                f"{where} was trained with {section}.{key}={old}, this config has {value}; "
                f"use the same model config, or train.resume=never to start a new run")


def _stop_requested(stop: "_StopFlag", n_proc: int) -> bool:
    """Whether to stop now; with several processes, all agree (one small all-gather)."""
    if n_proc == 1:
        return stop.requested is not None
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(stop.requested is not None))
    return bool(np.any(flags))


class _StopFlag:
    """SIGTERM/SIGINT: finish the current step, save, exit 0 (a second SIGINT aborts)."""

    def __init__(self, log):
        self.requested, self.log, self.old = None, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: finishing this step, saving a checkpoint, then stopping")

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def train(cfg: Config, *, default_name: str = "default", log=print) -> dict:
    """Run training as ``cfg`` says; returns a summary dict (final losses, run dir, speed).

    Raises:
        ConfigError, DataError: before anything is written to the run directory.
        NonFiniteError: a non-finite loss/gradient with ``train.on_nonfinite: stop``.
    """
    t = cfg.train
    maybe_initialize_distributed(cfg.mesh)  # before anything touches a device
    corpus = load_corpus(cfg.data)  # all input errors surface here, before any write
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    eval_bs = t.batch_size
    n_proc, proc = jax.process_count(), jax.process_index()
    train_ds = train_dataset(corpus.train, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed,
                             shard_index=proc, shard_count=n_proc,
                             prefetch=cfg.data.prefetch, num_threads=max(1, cfg.data.num_workers))
    Windows(corpus.val, t.seq_len, name="validation split")  # too short: DataError, before any write
    if corpus.test is not None:
        Windows(corpus.test, t.seq_len, name="test split")

    model = Transformer(cfg, rngs=nnx.Rngs(t.seed))
    graphdef, params, rest = split_model(model)
    tx, schedule = build_optimizer(cfg, t.steps)
    state = {"params": params, "opt_state": tx.init(params), "rest": rest,
             "step": jnp.zeros((), jnp.int32)}
    placement = Placement(cfg, state)  # a mesh that does not fit: ConfigError, before any write
    state = placement.put_state(state)
    step_fn = make_train_step(graphdef, tx, schedule, cfg,
                              shardings=(placement.state_sh, placement.batch_sh, placement.repl))
    eval_step = make_eval_step(graphdef, placement)

    run_dir, resume_dir = _choose_run_dir(cfg, default_name)
    is_main = proc == 0  # only process 0 writes
    if not is_main:
        log = lambda *_: None  # noqa: E731
    ck = cfg.checkpoint
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=ck.keep,
                                keep_best=ck.keep_best, async_save=ck.async_save, log=log)
    it = iter(train_ds)
    start_step, elapsed0 = 0, 0.0
    if resume_dir is not None:
        source = checkpointer if os.path.abspath(resume_dir) == checkpointer.directory else \
            Checkpointer(resume_dir, keep=ck.keep, keep_best=ck.keep_best, async_save=False, log=log)
        steps = source.steps()
        if steps:
            with open(os.path.join(resume_dir, str(steps[-1]), "meta", "metadata")) as f:
                saved = json.load(f)
            _check_compatible(cfg, saved["config"], f"checkpoint {resume_dir}/{steps[-1]}")
        restored = source.restore(abstract_arrays(state, placement.state_sh), it)
        if restored is not None:
            state, meta = restored
            start_step, elapsed0 = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
            log(f"resuming from {resume_dir}/{start_step} (step {start_step}/{t.steps})")
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        corpus.tokenizer.save(run_dir)
        if start_step:
            _truncate_metrics(run_dir, start_step)
    tokens_per_step = t.batch_size * t.seq_len
    fpt = flops_per_token(cfg, t.seq_len)
    peak = peak_flops()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"run dir {run_dir} | {n_params / 1e6:.2f}M parameters | {cfg.attention.kind} attention | "
        f"{'MoE ' + str(cfg.moe.n_routed_experts) + ' experts' if cfg.moe.n_routed_experts else 'dense'} | "
        f"{t.steps} steps x {tokens_per_step} tokens | devices: {jax.devices()[0].platform} x{jax.device_count()}"
        f" (mesh {dict(placement.mesh.shape)}{f', {n_proc} processes' if n_proc > 1 else ''})")

    use_bar = t.progress and sys.stderr.isatty() and is_main
    bar = None
    if use_bar:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=start_step, unit="step", dynamic_ncols=True)
    logger = _Logger(run_dir, purge_step=start_step + 1 if start_step else None) if is_main else _NullLogger()
    pending = []
    window_t, window_steps, eval_seconds = time.perf_counter(), 0, 0.0
    summary = {"run_dir": run_dir}
    evals = {}  # step -> validation loss, measured right after that step
    meta = {"seed": t.seed, "config": cfg.to_dict()}

    def handle(step, metrics):
        nonlocal window_t, window_steps, eval_seconds
        if not bool(to_host(metrics["finite"])):  # the only per-step transfer: one scalar
            m = jax.tree.map(to_host, metrics)
            msg = f"non-finite loss {float(m['loss'])} or gradient norm {float(m['grad_norm'])} at step {step}"
            if cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(msg + " (the update was not applied; set train.on_nonfinite=skip to skip such steps)")
            log(f"warning: {msg}; update skipped")
        window_steps += 1
        val_loss = evals.pop(step, None)
        if not (step % t.log_every == 0 or step == t.steps or step == start_step + 1 or val_loss is not None):
            if bar:
                bar.update(1)
            return
        m = jax.tree.map(to_host, metrics)
        now = time.perf_counter()
        tps = window_steps * tokens_per_step / max(now - window_t - eval_seconds, 1e-9)  # evaluation not charged
        window_t, window_steps, eval_seconds = now, 0, 0.0
        record = {"loss": float(m["loss"]), "lr": float(m["lr"]), "tokens_per_s": tps,
                  "grad_norm": float(m["grad_norm"]), "elapsed_s": now - start}
        if cfg.moe.n_routed_experts:
            record["balance_loss"] = float(m["balance_loss"])
        scalars = {"train/loss": record["loss"], "train/lr": record["lr"],
                   "train/grad_norm": record["grad_norm"], "train/tokens_per_s": tps,
                   "train/mfu": fpt * tps / peak}
        if cfg.moe.n_routed_experts:
            scalars["train/balance_loss"] = record["balance_loss"]
        record["attn_max_logit"] = [round(float(x), 3) for x in m["attn_max_logit"]]
        for i, x in enumerate(record["attn_max_logit"]):
            scalars[f"attn/max_logit/layer{i}"] = x
        if val_loss is not None:
            record["val_loss"] = val_loss
            scalars["val/loss"], scalars["val/perplexity"] = val_loss, math.exp(min(val_loss, 50))
        logger.log(step, record, scalars, loads=m["expert_load"] if cfg.moe.n_routed_experts else None)
        text = f"loss {record['loss']:.4f} | {tps:,.0f} tok/s" + (f" | val {val_loss:.4f}" if val_loss is not None else "")
        if bar:
            bar.set_postfix_str(text)
            bar.update(1)
        else:
            log(f"step {step}/{t.steps} | {text} | lr {record['lr']:.2e}")

    def save(step, val_loss=None):
        t0 = time.perf_counter()
        checkpointer.save(step, state, it, {**meta, "elapsed_s": time.perf_counter() - start},
                          val_loss=val_loss)
        return time.perf_counter() - t0

    start = time.perf_counter() - elapsed0
    step, saved_step, stopped = start_step, start_step if resume_dir else None, None
    try:
        with _StopFlag(log) as stop:
            for step in range(start_step + 1, t.steps + 1):
                batch = global_batch(next(it), placement.batch_sh, t.batch_size)
                state, metrics = step_fn(state, batch)
                pending.append((step, metrics))
                if len(pending) > 1:
                    handle(*pending.pop(0))
                val_loss = None
                if step % t.eval_every == 0 and step != t.steps:
                    t0 = time.perf_counter()
                    val_loss = evaluate(eval_step, state["params"], state["rest"], corpus.val, placement=placement,
                                        seq_len=t.seq_len, batch_size=eval_bs, max_batches=t.eval_batches)
                    evals[step] = val_loss
                    eval_seconds += time.perf_counter() - t0
                if (ck.every and step % ck.every == 0) or step == t.steps:
                    blocking = save(step, val_loss)
                    saved_step = step
                    if step == t.steps or step == ck.every:
                        log(f"checkpoint {step} saved in {checkpointer.directory} ({blocking:.2f}s blocking)")
                if _stop_requested(stop, n_proc):
                    stopped = stop.requested or "a signal on another process"
                    break
            while pending:
                handle(*pending.pop(0))
            if stopped:
                if saved_step != step:
                    save(step)
                checkpointer.close()
                log(f"stopped by {stopped} after step {step}; checkpoint {step} saved in "
                    f"{checkpointer.directory}; run again to resume")
                summary.update(stopped=stopped, step=step)
                summary["state"], summary["graphdef"], summary["cfg"] = state, graphdef, cfg
                return summary
        checkpointer.wait()
        train_time = time.perf_counter() - start - elapsed0
        final_val = evaluate(eval_step, state["params"], state["rest"], corpus.val, placement=placement,
                             seq_len=t.seq_len, batch_size=eval_bs, max_batches=t.final_eval_batches)
        final = {"val_loss": final_val, "final": True}
        if corpus.test is not None:
            final["test_loss"] = evaluate(eval_step, state["params"], state["rest"], corpus.test,
                                          placement=placement, seq_len=t.seq_len, batch_size=eval_bs)
        logger.log(t.steps, final, {"val/loss": final_val, "val/perplexity": math.exp(min(final_val, 50)),
                                    **({"test/loss": final["test_loss"]} if "test_loss" in final else {})})
        checkpointer.close()
    finally:
        if bar:
            bar.close()
        logger.close()
        try:  # an exception above: let a save in flight complete before the process ends
            checkpointer.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
            pass
    summary.update(val_loss=final_val, val_perplexity=math.exp(min(final_val, 50)),
                   val_bits_per_byte=final_val * len(corpus.val) / corpus.val_bytes / math.log(2),
                   train_seconds=train_time, tokens_per_s=(t.steps - start_step) * tokens_per_step / max(train_time, 1e-9),
                   params=int(n_params))
    if corpus.test is not None:
        summary.update(test_loss=final["test_loss"], test_perplexity=math.exp(min(final["test_loss"], 50)),
                       test_bits_per_byte=final["test_loss"] * len(corpus.test) / corpus.test_bytes / math.log(2))
        log(f"test loss {final['test_loss']:.4f} (perplexity {summary['test_perplexity']:.2f}, whole split)")
    log(f"done: validation loss {final_val:.4f} (perplexity {summary['val_perplexity']:.2f}, "
        f"{summary['val_bits_per_byte']:.3f} bits/byte, "
        f"{'whole split' if not t.final_eval_batches else str(t.final_eval_batches) + ' batches'}) | {train_time:.0f}s training, "
        f"{summary['tokens_per_s']:,.0f} tok/s")
    if is_main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    summary["state"], summary["graphdef"], summary["cfg"] = state, graphdef, cfg
    return summary
