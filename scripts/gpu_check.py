#!/usr/bin/env python
"""GPU acceptance in one command: kernels vs float64, attention and decode speed, MFU of
the bench models, bf16 vs float32 convergence, on one H100/H200 in under 8 minutes.

    PYTHONPATH=. python scripts/gpu_check.py --out gpu_report            # on the GPU
    PYTHONPATH=. python scripts/gpu_check.py --out /tmp/dry --dry-run    # CPU, tiny, ~1 min

Writes OUT/report.json and OUT/report.md after every stage (a run stopped midway keeps
what it measured).  Exit status 0 when every stage ran to completion and passed its
check, 1 otherwise, 2 for bad arguments.  See docs/benchmarks.md, "GPU acceptance".
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import mlalm  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=. or an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlalm.bench.gpu import STAGES  # noqa: E402
from mlalm.bench.gpu.report import format_value  # noqa: E402
from mlalm.bench.gpu.runner import run_check  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages (budget in seconds): " + ", ".join(f"{n} ({b})" for n, (_, b) in STAGES.items()),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where report.json/.md go")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="every stage on the CPU with tiny shapes and the Pallas interpreter",
    )
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        metavar="A,B,...",
        help="stages to run, comma-separated (default: all, in the order above)",
    )
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="change a stage's time budget (repeatable)",
    )
    p.add_argument("--fail-stage", default=None, help=argparse.SUPPRESS)  # tests: inject a failure
    a = p.parse_args(argv)
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    for s in a.stages + ([a.fail_stage] if a.fail_stage else []):
        if s not in STAGES:
            p.error(f"unknown stage {s!r}; valid: {', '.join(STAGES)}")
    budgets = {}
    for item in a.budget:
        name, _, sec = item.partition("=")
        try:
            budgets[name] = float(sec)
        except ValueError:
            p.error(f"--budget {item!r}: want STAGE=SECONDS")
        if name not in STAGES or budgets[name] <= 0:
            p.error(f"--budget {item!r}: STAGE one of {', '.join(STAGES)}, SECONDS > 0")
    a.budgets = budgets
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    report = run_check(
        a.out, dry_run=a.dry_run, stages=a.stages, budgets=a.budgets, fail_stage=a.fail_stage, argv=sys.argv
    )
    print(f"\n{os.path.join(a.out, 'report.md')}:")
    for name, g in report["goals"].items():
        met = {True: "met", False: "NOT MET", None: "no figure"}[g["met"]]
        print(f"  {met:9s}  {g['goal']}: {format_value(name, g)}")
    for name, s in report["stages"].items():
        print(f"  stage {name}: {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
