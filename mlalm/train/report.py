"""Turning each step's device metrics into log rows, and the non-finite policy.

The host reads each step's metrics one step late, so it never waits on the device; per
step it fetches one scalar (whether the update was applied), and everything else only
on logged steps.
"""

from __future__ import annotations

import time

import jax

from mlalm.config import Config
from mlalm.sharding import to_host
from mlalm.train.metrics import MetricsLogger, perplexity


class NonFiniteError(RuntimeError):
    """Training cannot continue: a non-finite loss, gradient or update; names the step."""


class StepReporter:
    """Logs steps (console, metrics.jsonl, TensorBoard) and applies ``train.on_nonfinite``.

    Args:
        cfg: the run's config; logger: its MetricsLogger.
        start_step: the step the run starts after; flops_per_token, peak: for MFU.
        extra: ``extra() -> dict`` of more fields for each logged row (e.g. a mixture's
            tokens per source).
    """

    def __init__(
        self,
        cfg: Config,
        logger: MetricsLogger,
        *,
        start_step: int,
        flops_per_token: float,
        peak: float,
        extra=None,
    ):
        self.cfg, self.logger, self.extra = cfg, logger, extra
        self.start_step = start_step
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.fpt, self.peak = flops_per_token, peak
        self.skipped = 0  # consecutive steps whose update was not applied
        self.window_t, self.window_steps, self.pause = None, 0, 0.0
        self.first_step_s = None
        self.t0 = time.perf_counter()

    def paused(self, seconds: float) -> None:
        """Time spent outside training steps (evaluation, blocking saves): not charged."""
        self.pause += seconds

    def _check(self, step: int, metrics) -> None:
        if bool(to_host(metrics["applied"])):  # the only per-step transfer: one scalar
            self.skipped = 0
            return
        m = jax.tree.map(to_host, metrics)
        t = self.cfg.train
        if not bool(m["finite"]):
            what = f"non-finite loss {float(m['loss'])} or gradient norm {float(m['grad_norm'])}"
        else:
            what = (
                f"the update would have made the parameters or optimizer state non-finite "
                f"(loss {float(m['loss']):.4f} and gradient norm {float(m['grad_norm']):.3g} "
                f"were finite; e.g. optim.eps too small or optim.lr too large)"
            )
        if t.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{what} at step {step}; the update was not applied and nothing "
                f"non-finite was saved (train.on_nonfinite=skip skips such steps)"
            )
        self.skipped += 1
        if self.skipped >= t.max_consecutive_skips:
            raise NonFiniteError(
                f"{what} at step {step}: {self.skipped} consecutive steps skipped "
                f"(train.max_consecutive_skips={t.max_consecutive_skips}); stopping. "
                f"The newest checkpoint holds the last finite state"
            )
        self.logger.console(f"warning: {what} at step {step}; update skipped")

    def step(self, step: int, metrics, val: dict | None = None) -> None:
        """Account for step ``step`` (its metrics) and its periodic validation, if any."""
        self._check(step, metrics)
        now = time.perf_counter()
        if self.window_t is None:  # the first step: compilation; rates start after it
            self.first_step_s = now - self.t0
            self.window_t, self.window_steps, self.pause = now, 0, 0.0
        else:
            self.window_steps += 1
        t = self.cfg.train
        due = step % t.log_every == 0 or step == t.steps or step == self.start_step + 1 or val is not None
        if not due:
            self.logger.advance(step)
            return
        m = jax.tree.map(to_host, metrics)
        elapsed = now - self.window_t - self.pause
        tps = (
            self.window_steps * self.tokens_per_step / elapsed if self.window_steps and elapsed > 0 else None
        )
        if self.window_steps:
            self.window_t, self.window_steps, self.pause = now, 0, 0.0
        record = {
            "loss": float(m["loss"]),
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens_per_s": tps,
            "elapsed_s": now - self.t0,
        }
        scalars = {
            "train/loss": record["loss"],
            "train/lr": record["lr"],
            "train/grad_norm": record["grad_norm"],
        }
        if tps:
            scalars.update({"train/tokens_per_s": tps, "train/mfu": self.fpt * tps / self.peak})
        moe = self.cfg.moe.n_routed_experts > 0
        if moe:
            record["balance_loss"] = scalars["train/balance_loss"] = float(m["balance_loss"])
        if self.extra is not None:
            record.update(self.extra())
        if "mtp_loss" in m:  # multi-token prediction: the main head's loss and each depth's
            record["main_loss"] = scalars["train/main_loss"] = float(m["nll"])
            record["mtp_loss"] = [float(x) for x in m["mtp_loss"]]
            for k, x in enumerate(record["mtp_loss"], start=1):
                scalars[f"train/mtp_loss/depth{k}"] = x
        # one entry per block: the model's layers, then the MTP modules' (DeepSeek's layer
        # numbering: the MTP block of depth k is layer n_layers + k - 1)
        record["attn_max_logit"] = [round(float(x), 3) for x in m["attn_max_logit"]]
        for i, x in enumerate(record["attn_max_logit"]):
            scalars[f"attn/max_logit/layer{i}"] = x
        if val is not None:
            record.update(
                {"val_loss": val["loss"], "val_tokens": val["tokens"], "val_whole_split": val["whole_split"]}
            )
            scalars["val/loss"], scalars["val/perplexity"] = val["loss"], perplexity(val["loss"])
        self.logger.write(step, record, scalars, loads=m["expert_load"] if moe else None)
        rate = f"{tps:,.0f} tok/s" if tps else f"compiled in {self.first_step_s:.1f}s"
        text = f"loss {record['loss']:.4f} | {rate}"
        if val is not None:
            text += f" | val {val['loss']:.4f}" + (
                "" if val["whole_split"] else f" ({val['tokens']:,}-token prefix)"
            )
            self.logger.console(f"step {step}/{t.steps} | {text}")  # evaluations stay on screen
        elif not self.logger.has_bar:
            self.logger.console(f"step {step}/{t.steps} | {text} | lr {record['lr']:.2e}")
        self.logger.advance(step, text)


class SourceTokens:
    """Training tokens each source of a ``data.mix`` contributed (logged, and kept in the
    checkpoint so a resumed run goes on counting).

    Args:
        names: the sources' paths; seq_len: tokens a row trains on.
        restored: the global totals from the checkpoint (process 0 carries them on).
    """

    def __init__(self, names, seq_len: int, restored=None):
        import numpy as np

        self.names, self.seq_len = list(names), seq_len
        self.local = np.zeros(len(self.names), np.int64)
        if restored is not None and jax.process_index() == 0:
            self.local += np.asarray(restored, np.int64)

    def count(self, batch):
        """``(rows, source ids)`` -> rows, counting each row's source."""
        import numpy as np

        rows, ids = batch
        self.local += np.bincount(np.asarray(ids), minlength=len(self.names)) * self.seq_len
        return rows

    def totals(self) -> list[int]:
        """Global totals (summed over processes: a collective, called by all at once)."""
        import numpy as np

        if jax.process_count() == 1:
            return self.local.tolist()
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(self.local)).sum(0).tolist()

    def record(self) -> dict:
        return {"tokens_by_source": dict(zip(self.names, self.totals()))}
