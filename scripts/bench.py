#!/usr/bin/env python
"""Benchmark mlalm's training step against transformers' DeepseekV3ForCausalLM, with MFU.

    python scripts/bench.py                          # table on stdout
    python scripts/bench.py --json > bench.json      # one JSON object on stdout
    python scripts/bench.py --profile --skip-reference --skip-decode   # where the step's time goes

Every figure comes from one invocation on one machine; each workload (a module of
mlalm/bench/) runs in its own subprocess, so that its peak memory (host RSS on CPU, the
device's peak_bytes_in_use on an accelerator) is its own:

  peak       the device peak: on CPU the median rate of a jitted 4096x4096 float32 matmul
             (--peak-n), on accelerators the data-sheet bf16 dense peak
  mlalm      the training step of --config (forward, backward, AdamW update; the very
             ``mlalm.train.init_state`` + ``make_train_step`` + ``mlalm.optim.build_optimizer``
             that train.py runs) on one fixed random batch: median step time after
             warm-up, each step blocked on; tokens/s = batch x seq_len / that
  dense      the same for --dense-config (same active FFN width), for MoE overhead
  reference  transformers' DeepseekV3ForCausalLM built from ``mlalm.hf.config_to_hf`` of
             --config, PyTorch on CPU with torch.set_num_threads = the cores XLA's CPU
             client uses, the same batch, loss in float32, clip_grad_norm_ and
             torch.optim.AdamW (same betas, eps, weight decay on the same matrices): median
             of forward + backward + optimizer step.  Defaults: attn_implementation='sdpa',
             experts 'eager', fused AdamW, the fastest combination in --reference-sweep on
             a 2-core EPYC (740 ms/step vs 814 for eager/eager/foreach); --reference-sweep
             re-picks on any machine
  decode     ``mlalm.decode_speed.measure_decode`` with the latent (absorbed) MLA cache and the
             expanded per-head cache, at each --decode-contexts
  profile    (--profile) where the mlalm step's time goes: its pieces, one layer's parts,
             whole-step variants, timed round-robin, and a per-HLO-op trace (jax.profiler)

MFU = flops_per_token (mlalm.flops: 6 x active matmul parameters + attention products
over the full T x T, PaLM's convention) x tokens/s / peak.

On a shared machine: the peak is measured at the start and at the end and the higher one
kept; --rounds N runs the mlalm / dense / reference workloads N times, alternating, and
keeps each one's fastest round.  Every workload also reports cpu_per_wall (process CPU
seconds per wall second; about the core count when it had the machine to itself) and the
1-minute load average before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mlalm.bench import decode, reference, report
from mlalm.bench.common import log, machine_info, n_cpus
from mlalm.bench.worker import RESULT_TAG, WORKERS, run_here, run_worker
from mlalm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "bench.yaml"))
    p.add_argument(
        "--dense-config",
        default=os.path.join(ROOT, "configs", "bench_dense.yaml"),
        help="the dense model of equal active parameters (MoE overhead, dense MFU)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per workload (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the mlalm / dense / reference workloads this many times, alternating, "
        "and keep each one's fastest round (for a shared, noisy machine)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (progress on stderr)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--profile", action="store_true", help="also break the mlalm step's time down")
    p.add_argument(
        "--reference-attn",
        default="sdpa",
        choices=["eager", "sdpa"],
        help="transformers attention implementation",
    )
    p.add_argument(
        "--reference-experts",
        default="eager",
        choices=["eager", "grouped_mm", "default"],
        help="transformers experts implementation ('default': what transformers picks)",
    )
    p.add_argument("--reference-adamw", default="fused", choices=["foreach", "fused"])
    p.add_argument(
        "--reference-sweep",
        action="store_true",
        help="time every attention x experts x AdamW implementation of the reference "
        "first (2 steps each) and use the fastest",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the reference (default: the CPUs XLA uses)",
    )
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--peak-n", type=int, default=4096, help="CPU peak: n of the n x n matmul")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to both configs")
    # one workload in this process (what ``python -m mlalm.bench.worker NAME SPEC`` does)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return a


def run_bench(args) -> dict:
    from mlalm.config import load_config

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = load_config(args.config, args.overrides)
    dense_cfg = None if args.skip_dense else load_config(args.dense_config, args.overrides)
    config, dense_config = os.path.abspath(args.config), os.path.abspath(args.dense_config)
    base = {"steps": args.steps, "warmup": args.warmup}
    out = {
        "machine": machine_info(),
        "config": os.path.relpath(config, ROOT),
        "dense_config": None if dense_cfg is None else os.path.relpath(dense_config, ROOT),
        "overrides": args.overrides,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
    }

    peak_spec = {"n": args.peak_n, "repeats": args.peak_repeats}
    peaks = [run_worker("peak", peak_spec, "peak (start)")]
    out["machine"].update(
        backend=peaks[0].get("backend"),
        device_kind=peaks[0].get("device_kind"),
        xla_cpu_threads=peaks[0].get("xla_cpu_threads"),
    )

    # the training workloads to compare, run in turn (--rounds times, alternating)
    jobs = [("mlalm", "train", {**base, "config": config, "overrides": args.overrides}, "mlalm train step")]
    if dense_cfg is not None:
        jobs.append(
            (
                "dense",
                "train",
                {**base, "config": dense_config, "overrides": args.overrides},
                "mlalm dense train step",
            )
        )
    if not args.skip_reference:
        try:
            rspec = reference.make_spec(
                cfg,
                threads=args.threads or n_cpus(),
                attn=args.reference_attn,
                experts=args.reference_experts,
                adamw=args.reference_adamw,
                matmul_n=args.peak_n,
                **base,
            )
        except ConfigError as e:  # a config the transformers format cannot express
            out["reference"] = {"skipped": str(e)}
            rspec = None
        if rspec is not None:
            if args.reference_sweep:
                sweep = run_worker(
                    "reference_sweep", {**rspec, "steps": 2, "warmup": 1}, "reference implementation sweep"
                )
                out["reference_sweep"] = sweep
                if sweep.get("best"):
                    best = sweep["best"]
                    rspec.update(attn=best["attn"], experts=best["experts"], adamw_impl=best["adamw"])
            jobs.append(("reference", "reference", rspec, "transformers reference train step"))
    runs = {key: [] for key, *_ in jobs}
    for rnd in range(args.rounds):
        for key, worker, spec, label in jobs:
            suffix = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            runs[key].append(run_worker(worker, spec, label + suffix))
    peaks.append(run_worker("peak", peak_spec, "peak (end)"))
    report.combine(out, peaks, runs)

    if not args.skip_decode:
        dec = run_worker(
            "decode",
            {
                "config": config,
                "overrides": args.overrides,
                "batch": args.decode_batch,
                "contexts": args.decode_contexts,
                "new_tokens": args.decode_tokens,
            },
            "decode",
        )
        out["decode_details"] = dec
        if "runs" in dec:
            out.update(decode.summary(dec))
        else:
            out["decode"] = None
            log(f"decode skipped: {dec.get('skipped') or dec.get('error')}")

    if args.profile:
        out["profile"] = run_worker(
            "profile",
            {"config": config, "overrides": args.overrides, "steps": args.steps, "warmup": 1},
            "profile of the mlalm step",
        )
    out["loadavg_start"] = [round(x, 2) for x in load_start]
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["bench_wall_s"] = time.perf_counter() - t_start
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        res = run_here(args.worker, json.loads(args.spec or "{}"))
        sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
        return 0
    try:
        result = run_bench(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(report.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
