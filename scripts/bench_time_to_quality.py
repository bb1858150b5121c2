#!/usr/bin/env python
"""Time to quality: whole ``python train.py`` commands side by side, wall time against the
final whole-split validation loss.

    python scripts/bench_time_to_quality.py --data ../shared/data/tinyshakespeare/input.txt \\
        [--run "NAME:CONFIG [override ...]" ...] [--repeats 2] [--target 1.88] [--out DIR]

Default runs: ``ref`` = ``configs/shakespeare_char.yaml train.steps=400`` and ``fast`` =
``configs/shakespeare_fast.yaml``.  The runs alternate (ref, fast, ref, fast, ...) so that a
drift of the machine's speed reaches both alike.  Each is timed from process start to exit
(data, compilation, evaluations and the checkpoint included), in a temporary run directory
with a fresh compilation cache unless ``--warm-cache``.  It prints each run's wall time,
final validation loss (the whole split: ``train.final_eval_batches=0``) and whether it reached
``--target``, the medians, and the ratio of each run's median to the first's; with ``--out``
it writes ``time_to_quality.json`` and ``loss_vs_time.png`` (training loss against seconds
since process start, the final validation loss as a marker at the run's end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([0-9.]+)")
DEFAULT_RUNS = [
    "ref:configs/shakespeare_char.yaml train.steps=400",
    "fast:configs/shakespeare_fast.yaml",
]


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    name, _, rest = spec.partition(":")
    words = shlex.split(rest)
    if not name or not words:
        raise SystemExit(f"error: --run {spec!r}: expected 'NAME:CONFIG [section.key=value ...]'")
    return name, words[0], words[1:]


def one_run(config: str, overrides: list[str], data: str, work: str, name: str, cache: str | None) -> dict:
    run_dir = os.path.join(work, "runs")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, config) if not os.path.isabs(config) else config,
        f"data.path={data}",
        f"train.run_dir={run_dir}",
        f"train.name={name}",
        "train.resume=never",
        "train.progress=false",
        "train.final_eval_batches=0",
        *([f"data.cache_dir={cache}"] if cache else []),
        *overrides,
    ]
    t0 = time.perf_counter()
    # the curve: each "step N/M | loss X" log line, timed from process start as it appears
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert p.stdout is not None
    curve, lines = [], []
    for line in p.stdout:
        lines.append(line)
        m = STEP_LINE.match(line)
        if m:
            curve.append((time.perf_counter() - t0, float(m.group(2))))
    rc = p.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}:\n{''.join(lines[-30:])}")
    with open(os.path.join(run_dir, name, "summary.json")) as f:
        summary = json.load(f)
    return {
        "wall_s": wall,
        "val_loss": summary["val_loss"],
        "whole_split": summary.get("val_whole_split"),
        "steps": summary["steps"],
        "train_seconds": summary.get("train_seconds"),
        "curve": curve,
    }


def plot(results: dict, target: float, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, r in enumerate(runs):
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, color=color, alpha=0.8, lw=1, label=f"{name}: training loss" if j == 0 else None)
            ax.plot(
                [r["wall_s"]],
                [r["val_loss"]],
                "o",
                color=color,
                label=f"{name}: final validation" if j == 0 else None,
            )
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target}")
    ax.set_xlabel("seconds since process start")
    ax.set_ylabel("loss (nats per token)")
    ax.set_ylim(1.4, 3.0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the corpus (data.path of every run)")
    p.add_argument("--run", action="append", default=None, help="'NAME:CONFIG [override ...]' (repeatable)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each (default 2)")
    p.add_argument("--target", type=float, default=1.88, help="the validation loss to reach")
    p.add_argument("--warm-cache", action="store_true", help="keep one compilation cache across runs")
    p.add_argument("--out", default=None, help="directory for time_to_quality.json and loss_vs_time.png")
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"error: --data {args.data}: no such file")
    runs = [parse_run(s) for s in (args.run or DEFAULT_RUNS)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    with tempfile.TemporaryDirectory(prefix="mlalm-ttq-") as work:
        for i in range(args.repeats):
            for name, config, overrides in runs:
                # a fresh data.cache_dir per run: the compilation cache (its jax/ folder) starts
                # empty, as on a first run; --warm-cache shares one
                cache = os.path.join(work, "cache" if args.warm_cache else f"cache-{name}-{i}")
                r = one_run(config, overrides, args.data, work, f"{name}-{i}", cache)
                results[name].append(r)
                ok = "reached" if r["val_loss"] <= args.target else "missed"
                print(
                    f"[{name} {i + 1}/{args.repeats}] {r['wall_s']:.1f}s wall, {r['steps']} steps, "
                    f"validation {r['val_loss']:.4f} (whole split: {r['whole_split']}) {ok} {args.target}",
                    flush=True,
                )
    first = statistics.median(r["wall_s"] for r in results[runs[0][0]])
    print(f"\n{'run':<10} {'wall (each)':<22} {'median':>8} {'vs ' + runs[0][0]:>8}  validation (each)")
    for name, rs in results.items():
        med = statistics.median(r["wall_s"] for r in rs)
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
        vals = ", ".join(f"{r['val_loss']:.4f}" for r in rs)
        print(f"{name:<10} {walls:<22} {med:>7.1f}s {med / first:>7.2f}x  {vals}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "time_to_quality.json"), "w") as f:
            json.dump({"runs": {n: [c, o] for n, c, o in runs}, "target": args.target, "results": results}, f)
        if plot(results, args.target, os.path.join(args.out, "loss_vs_time.png")):
            print(f"plot: {os.path.join(args.out, 'loss_vs_time.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
