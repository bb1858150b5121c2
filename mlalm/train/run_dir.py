"""The run directory: which one a run uses, whether it resumes, the lock, metrics rows.

Layout::

    RUN_DIR/config.yaml         the resolved config
            .lock               held (flock) by the process training into RUN_DIR
            metrics.jsonl       one JSON row per logged step (+ a final row)
            summary.json        written once the run completed (final evaluation included)
            checkpoints/<step>/ see mlalm.checkpoint

The rule (``train.resume=auto``, the default): running the same command again continues
the newest run of that name (``NAME``, ``NAME-2``, ...):

* it has checkpoints and no summary: resume from its newest complete checkpoint;
* it has no checkpoint (stopped before its first save): reuse it from step 0;
* it finished (a summary.json): start ``NAME-<n+1>``, and say so.

``train.resume=never`` always starts a new directory; ``train.resume=PATH`` resumes the
run directory or checkpoint step directory ``PATH`` names (exactly that step), in
``PATH``'s run directory when that is the configured one.  Nothing here needs JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time

from mlalm.config import Config
from mlalm.errors import CheckpointError, ConfigError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
EXPORT_MARKER = "mlalm_params.json"  # a params export (mlalm.inference)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Where a run writes and what it resumes.

    Attributes:
        run_dir: the run directory.
        checkpoints: the checkpoints directory to resume from (None: start at step 0).
        step: resume exactly this step (None: the newest usable one in ``checkpoints``).
        note: why this directory was chosen, when it is not the obvious one (printed).
    """

    run_dir: str
    checkpoints: str | None = None
    step: int | None = None
    note: str | None = None


def checkpoint_steps(checkpoints_dir: str) -> list[int]:
    """Steps of the finalized checkpoints in a ``checkpoints/`` directory (sorted)."""
    if not os.path.isdir(checkpoints_dir):
        return []
    return sorted(
        int(d)
        for d in os.listdir(checkpoints_dir)
        if d.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, d))
    )


def is_finished(run_dir: str) -> bool:
    """A run is finished when its summary.json is complete (written atomically)."""
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def _series(parent: str, name: str) -> list[tuple[int, str]]:
    """Existing directories ``name`` (1), ``name-2``, ``name-3``, ... as (n, path), sorted."""
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(re.escape(name) + r"(?:-(\d+))?")
    out = []
    for d in os.listdir(parent):
        m = pattern.fullmatch(d)
        if m and os.path.isdir(os.path.join(parent, d)):
            out.append((int(m.group(1) or 1), os.path.join(parent, d)))
    return sorted(out)


def _next_free(parent: str, name: str) -> str:
    series = _series(parent, name)
    n = series[-1][0] + 1 if series else 1
    path = os.path.join(parent, name if n == 1 else f"{name}-{n}")
    while os.path.exists(path):  # a file in the way
        n += 1
        path = os.path.join(parent, f"{name}-{n}")
    return path


def _step_dir_of(path: str) -> tuple[str, int] | None:
    """(checkpoints dir, step) when ``path`` is one checkpoint step directory."""
    base = os.path.basename(os.path.normpath(path))
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(os.path.abspath(path)), int(base)
    return None


def plan_run(cfg: Config, default_name: str) -> RunPlan:
    """The run directory and resume point ``train.resume`` asks for (module docstring).

    Raises:
        CheckpointError: ``train.resume`` names a path that is not a resumable run.
    """
    t = cfg.train
    name = t.name or default_name
    configured = os.path.join(t.run_dir, name)
    if t.resume == "never":
        path = _next_free(t.run_dir, name)
        note = None if path == configured else f"{configured} exists and train.resume=never: starting {path}"
        return RunPlan(path, note=note)
    if t.resume == "auto":
        series = _series(t.run_dir, name)
        if not series:
            return RunPlan(configured)
        latest = series[-1][1]
        if is_finished(latest):
            path = _next_free(t.run_dir, name)
            return RunPlan(
                path,
                note=(
                    f"{latest} finished (it has {SUMMARY}): starting {path}. To train {latest} "
                    f"further, run with train.resume={latest} and a larger train.steps"
                ),
            )
        ckpts = os.path.join(latest, "checkpoints")
        if checkpoint_steps(ckpts):
            return RunPlan(latest, ckpts)
        note = (
            None
            if not os.path.exists(os.path.join(latest, METRICS))
            else f"{latest} has no checkpoint (its run stopped before the first save): "
            f"starting it again from step 0"
        )
        return RunPlan(latest, note=note)
    return _plan_from_path(cfg, t.resume, configured, name)


def _plan_from_path(cfg: Config, r: str, configured: str, name: str) -> RunPlan:
    key = f"train.resume={r}"
    if not os.path.exists(r):
        raise CheckpointError(f"{key}: no such checkpoint or run directory")
    if not os.path.isdir(r):
        raise CheckpointError(
            f"{key} is a file; expected a run directory, its checkpoints/ "
            f"directory or one checkpoint step directory"
        )
    if os.path.isfile(os.path.join(r, EXPORT_MARKER)) or os.path.isfile(os.path.join(r, "config.json")):
        raise CheckpointError(
            f"{key} is an exported model (weights only: no optimizer state or data "
            f"position), which cannot be resumed; to start a new run from its weights use "
            f"train.init_from={r}, or resume a run directory or checkpoint step directory"
        )
    one = _step_dir_of(r)
    if one is not None:
        ckpts, step = one
    else:
        ckpts = (
            r if os.path.basename(os.path.normpath(r)) == "checkpoints" else os.path.join(r, "checkpoints")
        )
        step = None
        if not checkpoint_steps(ckpts):
            raise CheckpointError(
                f"{key} holds no checkpoint (expected a run directory with "
                f"checkpoints/, its checkpoints/ directory or one step directory)"
            )
    source_run = os.path.dirname(os.path.abspath(ckpts))
    if source_run == os.path.abspath(configured):
        return RunPlan(configured, ckpts, step)
    path = _next_free(cfg.train.run_dir, name)
    return RunPlan(
        path,
        ckpts,
        step,
        note=(
            f"resuming {source_run} into {path} (the directory train.run_dir/train.name names); "
            f"set train.name={os.path.basename(source_run)} to continue in {source_run} itself"
        ),
    )


def set_aside_after(run_dir: str, step: int, log=print) -> None:
    """Before a run continues from ``step``: move newer checkpoints and a summary of an
    earlier completion out of the way (``RUN_DIR/superseded/``; nothing is deleted)."""
    ckpts = os.path.join(run_dir, "checkpoints")
    newer = [s for s in checkpoint_steps(ckpts) if s > step]
    summary = os.path.join(run_dir, SUMMARY)
    if not newer and not os.path.exists(summary):
        return
    aside = os.path.join(run_dir, "superseded", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for s in newer:
        shutil.move(os.path.join(ckpts, str(s)), os.path.join(aside, str(s)))
    if os.path.exists(summary):
        shutil.move(summary, os.path.join(aside, SUMMARY))
    what = ([f"checkpoints {newer}"] if newer else []) + (
        [SUMMARY] if os.path.exists(os.path.join(aside, SUMMARY)) else []
    )
    log(f"continuing from step {step}: moved {' and '.join(what)} to {aside}")


def truncate_metrics(run_dir: str, step: int) -> int:
    """Keep the metrics.jsonl rows up to ``step`` (the steps after it run again and are
    logged again); a torn or unreadable row (a kill mid-write) is dropped.  Written to a
    new file, then renamed.  Returns the number of rows dropped."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and int(row.get("step", 0)) <= step and not row.get("final")
            except (ValueError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            elif line.strip():
                dropped += 1
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return dropped


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLock:
    """An exclusive lock on a run directory (``fcntl.flock`` on ``RUN_DIR/.lock``).

    A second process training into the same directory gets a ConfigError naming the
    holder's pid.  The kernel releases the lock when its holder exits, however it exits,
    so a lock left by a killed run never blocks.
    """

    def __init__(self, run_dir: str):
        self.run_dir, self.fd = run_dir, None

    def __enter__(self):
        import fcntl

        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.run_dir} is in use by another training process (pid {holder}); "
                f"wait for it to end, or give this run another train.name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def check_compatible(cfg: Config, saved: dict, where: str) -> None:
    """The checkpoint must describe the same model (optimizer settings and the schedule
    may change; the optimizer's kind may not: its state has another structure).

    Raises:
        CheckpointError: naming the first key that differs.
    """
    now = cfg.to_dict()
    free = {
        ("attention", "impl"),
        ("moe", "dispatch"),
        ("moe", "capacity_factor"),
        ("model", "dtype"),
        ("moe", "bias_update_rate"),
        ("moe", "seq_aux_loss_coef"),
    }  # same parameters either way
    keys = [(sec, k) for sec in ("model", "attention", "moe") for k in now[sec] if (sec, k) not in free]
    keys.append(("optim", "name"))
    for section, key in keys:
        old, value = (saved.get(section) or {}).get(key), now[section][key]
        if isinstance(old, list):
            old = tuple(old)
        if isinstance(value, list):
            value = tuple(value)
        if old != value:
            raise CheckpointError(
                f"{where} was trained with {section}.{key}={old}, this config has {value}; "
                f"use the same model config, or train.resume=never to start a new run"
            )
