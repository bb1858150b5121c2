"""Each workload in its own process, so that its peak memory (host max RSS, or the
device's peak_bytes_in_use) is its own and one workload's compilation caches and
allocations cannot speed up or slow down the next.

    python -m mlalm.bench.worker NAME 'SPEC-JSON'

prints the workload's result as one line ``BENCH_RESULT {json}`` on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

from mlalm.bench.common import log

RESULT_TAG = "BENCH_RESULT "

# name -> (module, function of the spec); imported only when run
WORKERS = {
    "peak": ("mlalm.bench.peak", "worker"),
    "train": ("mlalm.bench.train_step", "worker"),
    "reference": ("mlalm.bench.reference", "measure"),
    "reference_sweep": ("mlalm.bench.reference", "sweep"),
    "decode": ("mlalm.bench.decode", "worker"),
    "profile": ("mlalm.bench.step_profile", "worker"),
}


def run_here(name: str, spec: dict) -> dict:
    """Run workload ``name`` in this process."""
    module, fn = WORKERS[name]
    return getattr(importlib.import_module(module), fn)(spec)


def run_worker(name: str, spec: dict, label: str | None = None) -> dict:
    """Run one workload in a fresh Python process; its result (or an error) as a dict,
    with its wall time and the 1-minute load average before and after it."""
    label = label or name
    log(f"{label} ...")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlalm.bench.worker", name, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
    )
    wall = time.perf_counter() - t0
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or line is None:
        log(f"{label}: failed (exit {proc.returncode})")
        return {"error": f"worker '{name}' exited with {proc.returncode}", "wall_s": wall}
    res = json.loads(line[len(RESULT_TAG) :])
    res["wall_s"] = wall
    res["loadavg_1min_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    log(f"{label}: done in {wall:.0f}s")
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in WORKERS:
        print(f"usage: python -m mlalm.bench.worker {{{','.join(WORKERS)}}} SPEC-JSON", file=sys.stderr)
        return 2
    res = run_here(argv[0], json.loads(argv[1]))
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
