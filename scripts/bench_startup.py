#!/usr/bin/env python
"""Start-up time of ``python train.py``: process start to the first step's log line.

    python scripts/bench_startup.py [--repeats 2] [--json out.json] [override ...]

On the default config (the built-in corpus; ``override``s such as ``--config`` are not taken:
give ``section.key=value`` pairs), in a temporary directory, ``--repeats`` times each:

  no cache     ``train.compile_cache=false``: every program compiled (the worst case)
  cold cache   the persistent compilation cache on (the default), its directory empty: the
               first start of a model on a machine (compiles and writes the cache)
  warm cache   the same directory again: a later start of the same model

and the time to import the training modules alone (``import mlalm.train.loop``).  For each
start it prints the seconds to the first step, the peak RSS of the process tree, and when
each log line before the first step appeared (``--phases``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mlalm.utils import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mlalm.train.loop, mlalm.data"], check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="starts per mode (default 2)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--phases", action="store_true", help="print each start's log lines with their times")
    p.add_argument("overrides", nargs="*", help="section.key=value for train.py")
    args = p.parse_args(argv)
    # scripts/bench_data.py's train_start: train.py to its first step, timed and measured
    bd = load_script(os.path.join(ROOT, "scripts", "bench_data.py"), "bench_data")
    out: dict = {"overrides": args.overrides, "import_s": [], "modes": {}}
    with tempfile.TemporaryDirectory(prefix="mlalm-startup-") as work:
        for _ in range(args.repeats):
            out["import_s"].append(import_seconds())
        # the built-in corpus's token cache is made once, before any timed start
        data_cache = os.path.join(work, "data-cache")
        bd.train_start(None, work, data_cache, "warmup", extra=args.overrides)
        modes = {"no cache": [], "cold cache": [], "warm cache": []}
        for i in range(args.repeats):
            modes["no cache"].append(bd.train_start(None, work, data_cache, f"off{i}", extra=args.overrides))
            # a fresh data.cache_dir per pair (the compilation cache lives in its jax/
            # folder), holding the corpus's tokens already like the first one
            cache = os.path.join(work, f"cache{i}")
            shutil.copytree(data_cache, cache)
            for mode in ("cold cache", "warm cache"):
                name = f"{mode.split()[0]}{i}"
                run = bd.train_start(None, work, cache, name, compile_cache=True, extra=args.overrides)
                modes[mode].append(run)
        out["modes"] = modes
    print(f"import mlalm.train.loop, mlalm.data: {', '.join(f'{s:.2f}s' for s in out['import_s'])}")
    print(f"{'mode':<11} {'to the first step (each start)':<34} {'median':>7} {'peak RSS':>9}")
    for mode, runs in out["modes"].items():
        secs = [r["first_step_s"] for r in runs]
        rss = max(r["peak_rss_bytes"] for r in runs) / 2**20
        each = ", ".join(f"{s:.2f}s" for s in secs)
        print(f"{mode:<11} {each:<34} {statistics.median(secs):>6.2f}s {rss:>6.0f} MiB")
        if args.phases:
            for r in runs:
                for t, line in r["phases"]:
                    print(f"    {t:7.2f}s  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
