"""Run the stages, each part in its own process under the stage's time budget, and
rewrite ``OUT/report.json`` and ``OUT/report.md`` after every stage.

A part's process is stopped (its whole process group) when the stage's budget is spent;
the stage is then ``timeout`` and keeps what the part had saved.  A crash or an
exception makes the stage ``failed`` with the error text; either way the next stage runs.
This process imports no JAX: the device is left to the stage processes.
"""

from __future__ import annotations

import collections
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata

from mlalm.bench.gpu import STAGES
from mlalm.bench.gpu.report import summarise, write_markdown

# XLA:CPU compile options for the dry run only: its figures mean nothing, and without
# LLVM's expensive passes the tiny programs compile about twice as fast.
DRY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Installed versions of JAX (and its CUDA plugins), flax, optax, orbax, numpy."""
    names = {"flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes"}
    found = {}
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name in names or name.startswith("jax"):
            found[name] = d.version
    found["python"] = sys.version.split()[0]
    return dict(sorted(found.items()))


def git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def child_env(dry_run: bool) -> dict:
    """The stage processes' environment: this repository first on PYTHONPATH (mlalm need
    not be installed), unbuffered output; the dry run pinned to the CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DRY_XLA_FLAGS}".strip()
    return env


def _kill(proc) -> None:
    """SIGKILL the part's process group (the part and anything it started), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_part(stage: str, part: str, spec: dict, path: str, timeout: float, env: dict, log) -> dict:
    """Run one part; {'status', 'seconds', 'exit_code', 'figures', 'error'}."""
    if os.path.exists(path):  # an earlier run's figures must not pass for this one's
        os.remove(path)
    cmd = [sys.executable, "-m", "mlalm.bench.gpu.worker", stage, part, json.dumps(spec), path]
    tail = collections.deque(maxlen=30)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    label = stage if part == "main" else f"{stage}/{part}"

    def pump():  # echo the part's output live, keep its tail for the error text
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(f"[{label}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
    except BaseException:  # Ctrl-C, SIGTERM: the part runs in its own session; stop it too
        _kill(proc)
        raise
    reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    figures = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                figures = json.load(f)
        except (OSError, ValueError):
            figures = {}
    error = figures.pop("error", None)
    figures.pop("traceback", None)
    if timed_out:
        status = "timeout"
        error = f"stopped after its time budget of {timeout:.0f} s (figures so far are kept)"
    elif proc.returncode != 0:
        status = "failed"
        error = error or (f"exit code {proc.returncode}; last output:\n" + "\n".join(tail))
    else:
        status = "ok"
    return {
        "status": status,
        "seconds": seconds,
        "exit_code": proc.returncode,
        "figures": figures,
        "error": error,
    }


def run_stage(name: str, spec: dict, budget: float, work: str, env: dict, log) -> dict:
    module = importlib.import_module(STAGES[name][0])
    parts = list(module.PARTS)
    t0 = time.perf_counter()
    entry = {"status": "ok", "budget_s": budget, "spec": spec, "figures": {}, "error": None, "parts": {}}
    errors = []
    for i, part in enumerate(parts):
        # keep each later part its share of the budget
        reserve = budget * (len(parts) - i - 1) / len(parts)
        left = budget - (time.perf_counter() - t0) - reserve
        r = run_part(name, part, spec, os.path.join(work, f"{name}.{part}.json"), left, env, log)
        entry["device"] = entry.get("device") or r["figures"].pop("device", None)
        r["figures"].pop("device", None)
        entry["figures"].update(r["figures"])
        entry["parts"][part] = {k: r[k] for k in ("status", "seconds", "exit_code")}
        if r["status"] != "ok":
            errors.append(r["error"] if len(parts) == 1 else f"{part}: {r['error']}")
            if entry["status"] != "timeout":
                entry["status"] = r["status"]
    entry["seconds"] = time.perf_counter() - t0
    entry["error"] = "\n".join(errors) or None
    return entry


def run_check(
    out_dir: str,
    *,
    dry_run: bool,
    stages: list,
    budgets: dict | None = None,
    fail_stage: str | None = None,
    argv: list | None = None,
    log=None,
) -> dict:
    """Run ``stages`` (in the canonical order) and write the report after each.

    Returns the report (``report['ok']``: every selected stage ended ``ok``).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, "parts")
    os.makedirs(work, exist_ok=True)
    budgets = {name: float(b) for name, (_, b) in STAGES.items()} | (budgets or {})
    report = {
        "command": argv,
        "dry_run": dry_run,
        "started": now(),
        "finished": None,
        "git_commit": git_commit(),
        "versions": versions(),
        "device": None,
        "budgets_s": budgets,
        "stages": {},
        "goals": {},
    }
    for name in STAGES:
        report["stages"][name] = (
            {"status": "pending"}
            if name in stages
            else {"status": "skipped", "error": None, "reason": "not selected (--stages)"}
        )
    write(report, out_dir)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM as SystemExit, so the part in flight is stopped too (see run_part)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    env = child_env(dry_run)
    t_all = time.perf_counter()
    for name in STAGES:
        if name not in stages:
            continue
        log(f"== {name} (budget {budgets[name]:.0f} s) ==")
        spec = importlib.import_module(STAGES[name][0]).spec(dry_run, name)
        if fail_stage == name:
            spec = dict(spec, fail=True)
        report["stages"][name] = {"status": "running", "started": now()}
        write(report, out_dir)
        entry = run_stage(name, spec, budgets[name], work, env, log)
        report["device"] = report["device"] or entry.get("device")
        report["stages"][name] = entry
        log(
            f"== {name}: {entry['status']} in {entry['seconds']:.1f} s"
            + (f": {entry['error'].splitlines()[0]}" if entry["error"] else "")
        )
        write(report, out_dir)
    report["finished"] = now()
    report["total_seconds"] = time.perf_counter() - t_all
    report["ok"] = all(report["stages"][n]["status"] == "ok" for n in stages)
    write(report, out_dir)
    return report


def write(report: dict, out_dir: str) -> None:
    """report.json and report.md, each replaced atomically."""
    report["goals"] = summarise(report)
    for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", write_markdown(report))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out_dir, name))
