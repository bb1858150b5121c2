"""Where a run's figures go: the console (a progress bar on a terminal), metrics.jsonl and
TensorBoard (tensorboardX, optional: without it only the TensorBoard files are missing).

Console lines are printed through the progress bar so that the two never collide; the
bar starts once the first step has run, so its rate and ETA exclude compilation.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from mlalm.train.run_dir import METRICS


def _tensorboard(run_dir: str, purge_step):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional on machines that only train
        return None
    return SummaryWriter(run_dir, purge_step=purge_step)  # a resumed run replaces later events


class MetricsLogger:
    """Console, metrics.jsonl and TensorBoard for process 0 (other processes: silent).

    Args:
        run_dir: where metrics.jsonl and the TensorBoard events go (None: console only).
        total_steps, start_step: for the progress bar.
        progress: draw a progress bar when stderr is a terminal.
        log: the console printer for lines (``print`` by default).
    """

    def __init__(
        self, run_dir: str | None, *, total_steps: int, start_step: int = 0, progress: bool = True, log=print
    ):
        self.run_dir, self.total, self.start_step = run_dir, total_steps, start_step
        self._log = log
        self._use_bar = progress and sys.stderr.isatty()
        self.bar = None
        self.jsonl = open(os.path.join(run_dir, METRICS), "a") if run_dir else None
        self.tb = _tensorboard(run_dir, start_step + 1 if start_step else None) if run_dir else None

    # -- console -------------------------------------------------------------------
    def console(self, text: str) -> None:
        """A line that stays on screen (printed above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self._log(text)

    def advance(self, step: int, postfix: str | None = None) -> None:
        """Step ``step`` is done; the first call starts the bar (compilation is over)."""
        if not self._use_bar:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total, initial=step - 1, unit="step", dynamic_ncols=True, file=sys.stderr
            )
        if postfix is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    @property
    def has_bar(self) -> bool:
        return self._use_bar

    # -- files ---------------------------------------------------------------------
    def write(self, step: int, record: dict, scalars: dict, loads=None) -> None:
        """One metrics.jsonl row and TensorBoard scalars (MoE load histograms) at ``step``."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()
        if self.tb is None:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        if loads is not None:
            for i, load in enumerate(np.asarray(loads)):
                frac = load / max(load.sum(), 1)
                self.tb.add_scalar(f"moe/load_cv/layer{i}", float(frac.std() / max(frac.mean(), 1e-9)), step)
                self.tb.add_histogram(f"moe/load/layer{i}", frac, step)
        self.tb.flush()

    def close(self) -> None:
        """Close everything; a failure here (e.g. a full disk) never hides the run's own error."""
        for close in (
            getattr(self.bar, "close", None),
            getattr(self.jsonl, "close", None),
            getattr(self.tb, "close", None),
        ):
            if close is None:
                continue
            try:
                close()
            except Exception:  # noqa: BLE001 - the run's outcome is reported elsewhere
                pass
        self.bar = self.jsonl = self.tb = None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700))
