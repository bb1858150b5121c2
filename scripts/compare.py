#!/usr/bin/env python
"""Compare configurations at an equal token budget: a grid of config keys x seeds.

    python scripts/compare.py --config configs/shakespeare_char.yaml \\
        --grid optim.name=adamw,muon --lr-sweep 1e-3,3e-3,1e-2 --seeds 0,1,2 \\
        --out compare/optimizers data.path=.../input.txt train.steps=300

Every run is a ``train.py`` subprocess (so peak memory is its own) writing to
``OUT/runs/<run>/``.  With ``--lr-sweep`` the fair protocol is used: each grid cell
sweeps the learning rates with the first seed, keeps its own best, and runs the other
seeds at that rate only (the rate of the cell's main optimizer: ``optim.muon_lr`` for Muon
cells, ``optim.lr`` otherwise; ``--lr-key`` to choose).  Writes:

  OUT/results.csv   one row per run: varied keys, seed, lr, status (ok/diverged/failed),
                    final validation loss and perplexity, tokens and FLOPs to reach the
                    target loss, tokens/s, peak memory (max RSS), KV-cache bytes per token,
                    and eval.py's figures when the run directory has eval_<split>.json
                    (perplexity, bits/byte, word perplexity, measured KV bytes/token)
  OUT/results.md    mean ± std over seeds per cell (best learning rate only), and the
                    tokens each cell needs to reach the reference cell's final loss
  OUT/loss_vs_tokens.png, OUT/loss_vs_time.png
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Progress:
    """'run k of N' and an ETA from the mean time of the runs executed so far."""

    def __init__(self, total: int):
        self.total, self.done, self.ran, self.seconds = total, 0, 0, 0.0

    def start(self, name: str, reused: bool = False) -> str:
        self.done += 1
        head = f"[compare] run {self.done} of {self.total}: {name}"
        if reused:
            return head + ": done before, reusing"
        left = self.total - self.done + 1
        eta = f" (ETA {left * self.seconds / self.ran / 60:.0f} min)" if self.ran else ""
        return head + " ..." + eta

    def finished(self, seconds: float) -> None:
        self.ran, self.seconds = self.ran + 1, self.seconds + seconds


def parse_grid(items):
    """{'section.key': [value, ...]}; a value may carry extra overrides after '+', e.g.
    ``attention.kind=mha,gqa+attention.n_kv_heads=2`` (gqa also sets n_kv_heads=2)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not values or "." not in key:
            raise SystemExit(f"error: --grid {item!r} is not section.key=v1,v2,...")
        grid[key] = values.split(",")
    return grid


def _split_value(value: str):
    head, *extras = value.split("+")
    return head, extras


def run_one(args, cell: dict, seed: int, lr: str | None, out: str) -> dict:
    """Train one configuration in a subprocess; returns its row (status and figures)."""
    parts = [f"{k.split('.')[-1]}={_split_value(v)[0]}" for k, v in cell.items()] + [f"seed={seed}"]
    if lr is not None:
        parts.append(f"lr={lr}")
    name = "_".join(parts).replace("/", "-")
    run_dir = os.path.join(out, "runs")
    overrides = list(args.overrides)
    for k, v in cell.items():
        head, extras = _split_value(v)
        overrides += [f"{k}={head}"] + extras
    overrides += [
        f"train.seed={seed}",
        f"train.run_dir={run_dir}",
        f"train.name={name}",
        "train.progress=false",
    ]
    if lr is not None:
        overrides.append(f"{lr_key(args, overrides)}={lr}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if args.config:
        cmd += ["--config", args.config]
    cmd += overrides
    path = os.path.join(run_dir, name)
    row = {**{k: _split_value(v)[0] for k, v in cell.items()}, "seed": seed, "lr": lr, "run": name}
    progress = getattr(args, "progress", None) or Progress(1)
    if os.path.isfile(os.path.join(path, "summary.json")) and not args.rerun:
        print(progress.start(name, reused=True), flush=True)
    else:
        print(progress.start(name), flush=True)
        t0 = time.time()
        with open(os.path.join(out, "logs", name + ".log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with open(os.path.join(path, "peak_memory.json") if os.path.isdir(path) else os.devnull, "w") as f:
            json.dump({"max_rss_bytes": usage.ru_maxrss * 1024}, f)
        progress.finished(time.time() - t0)
        print(f"[compare] {name}: exit {code} in {time.time() - t0:.0f}s", flush=True)
        if code != 0 and not os.path.isdir(path):
            return {**row, "status": "failed"}
    return {**row, **read_run(path)}


def lr_key(args, overrides) -> str:
    """The key ``--lr-sweep`` sets: ``--lr-key``, or with ``auto`` the learning rate of the
    cell's main optimizer -- ``optim.muon_lr`` for Muon cells (their matrices), else
    ``optim.lr``."""
    if args.lr_key != "auto":
        return args.lr_key
    from mlalm.config import load_config

    return "optim.muon_lr" if load_config(args.config, overrides).optim.name == "muon" else "optim.lr"


def read_run(path: str) -> dict:
    """Figures of a finished (or diverged) run directory."""
    from mlalm.config import load_config
    from mlalm.flops import flops_per_token
    from mlalm.model import kv_cache_bytes_per_token_per_layer

    cfg = load_config(os.path.join(path, "config.yaml"))
    rows = (
        [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
        if os.path.isfile(os.path.join(path, "metrics.jsonl"))
        else []
    )
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    curve = [
        (r["step"] * tokens_per_step, r.get("elapsed_s", 0.0), r["val_loss"])
        for r in _same_measurement([r for r in rows if "val_loss" in r])
    ]
    summary_path = os.path.join(path, "summary.json")
    out = {
        "curve": curve,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token(cfg, cfg.train.seq_len),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token_per_layer(cfg) * cfg.model.n_layers,
    }
    mem = os.path.join(path, "peak_memory.json")
    if os.path.isfile(mem):
        out["peak_memory_bytes"] = json.load(open(mem))["max_rss_bytes"]
    if not os.path.isfile(summary_path):
        out["status"] = "diverged"
        return out
    out.update(read_eval(path))
    s = json.load(open(summary_path))
    out.update(
        status="ok",
        final_val_loss=s["val_loss"],
        final_val_ppl=s["val_perplexity"],
        tokens_per_s=s["tokens_per_s"],
        tokens=cfg.train.steps * tokens_per_step,
    )
    return out


EVAL_SPLITS = ("valid", "test")
EVAL_FIGURES = (
    ("perplexity", "perplexity (eval)"),
    ("bits_per_byte", "bits/byte"),
    ("word_perplexity", "word perplexity"),
)


def read_eval(path: str) -> dict:
    """Figures of ``eval.py``'s ``eval_<split>.json`` files in a run directory, if any:
    ``eval_<split>_<figure>`` and the measured KV-cache bytes per token (all layers)."""
    out = {}
    for split in EVAL_SPLITS:
        p = os.path.join(path, f"eval_{split}.json")
        if os.path.isfile(p):
            e = json.load(open(p))
            out.update({f"eval_{split}_{k}": e.get(k) for k, _ in EVAL_FIGURES})
            out["kv_cache_measured_bytes_per_token"] = e["kv_cache"]["measured_bytes_per_token"]
    return out


def _same_measurement(rows):
    """The validation rows of one kind: the periodic ones (scored on the first
    ``train.eval_batches`` batches) and the final row only when it scored the same tokens.
    A final whole-split loss is a different measurement from a prefix's (on WikiText-2 the
    two differ by ~0.1 nats), so mixing them would bias tokens-to-target."""
    periodic = [r for r in rows if not r.get("final")]
    final = [r for r in rows if r.get("final")]
    if final and (not periodic or final[-1].get("val_tokens") == periodic[-1].get("val_tokens")):
        return periodic + final[-1:]
    return periodic


def tokens_to_reach(curve, target: float):
    """First token count at which the validation curve reaches ``target`` (linear interp.)."""
    prev = None
    for tokens, _, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def cell_key(row, keys):
    return tuple(row[k] for k in keys)


def write_outputs(rows, keys, out, target):
    best = [r for r in rows if r.get("best_lr", True)]
    cells = {}
    for r in best:
        cells.setdefault(cell_key(r, keys), []).append(r)
    ref_key = next(iter(cells)) if cells else None
    # the reference cell's loss at the end of its curve: the same measurement the curves
    # hold (not the final whole-split figure when the curves score a prefix)
    ref_ok = [r["curve"][-1][2] for r in cells.get(ref_key, []) if r.get("status") == "ok" and r.get("curve")]
    ref_target = statistics.mean(ref_ok) if ref_ok else None
    for r in rows:
        t = target if target is not None else ref_target
        reach = tokens_to_reach(r.get("curve", []), t) if t is not None else None
        r["target_loss"] = t
        r["tokens_to_target"] = reach
        r["flops_to_target"] = reach * r["flops_per_token"] if reach is not None else None
    fields = keys + [
        "seed",
        "lr",
        "best_lr",
        "status",
        "final_val_loss",
        "final_val_ppl",
        "target_loss",
        "tokens_to_target",
        "flops_to_target",
        "tokens_per_s",
        "peak_memory_bytes",
        "kv_cache_bytes_per_token",
    ]
    fields += [f"eval_{sp}_{k}" for sp in EVAL_SPLITS for k, _ in EVAL_FIGURES]
    fields += ["kv_cache_measured_bytes_per_token", "run"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    # eval.py's figures, for the splits some run has an eval_<split>.json for
    extra = [
        (f"eval_{sp}_{k}", f"{sp} {label}")
        for sp in EVAL_SPLITS
        if any(f"eval_{sp}_perplexity" in r for r in rows)
        for k, label in EVAL_FIGURES
    ]
    if extra:
        extra.append(("kv_cache_measured_bytes_per_token", "KV bytes/token measured"))
    lines = [
        "| " + " | ".join(keys) + " | lr | seeds | final val loss | perplexity | "
        f"tokens to reach {'target' if target else 'reference'} loss | tokens/s | KV bytes/token | "
        + "".join(f"{label} | " for _, label in extra)
        + "diverged |",
        # no grid keys: the rows still start with an empty key column
        "|" + "---|" * (max(len(keys), 1) + 8 + len(extra)),
    ]
    # The reference cell reaches its own mean curve-end loss where its curves end (by
    # definition); every other cell: mean over its seeds of the interpolated tokens, when
    # all reach it.
    ref_ok = [r for r in cells.get(ref_key, []) if r.get("status") == "ok" and r.get("curve")]
    ref_tokens = statistics.mean(r["curve"][-1][0] for r in ref_ok) if ref_ok and target is None else None
    for key, rs in cells.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        reach = [r["tokens_to_target"] for r in ok if r["tokens_to_target"] is not None]
        mean_reach = statistics.mean(reach) if len(reach) == len(ok) and reach else None
        if key == ref_key and ref_tokens is not None:
            mean_reach = ref_tokens
        ratio = f" ({mean_reach / ref_tokens:.2f}×)" if mean_reach and ref_tokens else ""
        reached = f"{mean_reach:,.0f}{ratio}" if mean_reach else f"not reached ({len(reach)}/{len(ok)} seeds)"
        tps = [r["tokens_per_s"] for r in ok if r.get("tokens_per_s")]
        lines.append(
            "| " + " | ".join(map(str, key)) + f" | {rs[0]['lr'] or 'config'} | {len(rs)} | "
            f"{ms([r.get('final_val_loss') for r in ok])} | {ms([r.get('final_val_ppl') for r in ok])} | "
            f"{reached} | {f'{statistics.mean(tps):,.0f}' if tps else '—'} | "
            f"{rs[0].get('kv_cache_bytes_per_token', '—')} | "
            + "".join(f"{ms([r.get(k) for r in ok])} | " for k, _ in extra)
            + f"{len(rs) - len(ok)} |"
        )
    t = target if target is not None else ref_target
    header = [
        f"# Comparison ({time.strftime('%Y-%m-%d')})",
        "",
        f"Target loss: {t:.4f} "
        f"({'given' if target else 'the mean validation loss of the first cell at the end of its curve'})."
        if t is not None
        else "No target loss (the reference cell did not finish).",
        "",
    ]
    sweep = [r for r in rows if not r.get("best_lr", True) or r.get("swept")]
    if sweep:
        header += [
            "Learning-rate sweep (first seed):",
            "",
            "| " + " | ".join(keys) + " | lr | final val loss | status |",
            "|" + "---|" * (max(len(keys), 1) + 3),
        ]
        for r in rows:
            if r.get("swept"):
                loss = r.get("final_val_loss")
                header.append(
                    "| "
                    + " | ".join(str(r[k]) for k in keys)
                    + f" | {r['lr']} | {f'{loss:.4f}' if loss is not None else '—'} | {r['status']} |"
                )
        header.append("")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(
            "\n".join(header + ["Best learning rate per cell, mean ± std over seeds:", ""] + lines) + "\n"
        )
    plot(rows, keys, out)


def plot(rows, keys, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('[compare] matplotlib is not installed: no plots (pip install -e ".[plot]")')
        return
    colors = {}
    for xi, (xlabel, fname) in enumerate([("tokens", "loss_vs_tokens.png"), ("seconds", "loss_vs_time.png")]):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if not r.get("curve") or not r.get("best_lr", True):
                continue
            key = cell_key(r, keys)
            color = colors.setdefault(key, f"C{len(colors) % 10}")
            xs = [c[xi] for c in r["curve"]]
            ys = [c[2] for c in r["curve"]]
            first = r["seed"] == min(x["seed"] for x in rows if cell_key(x, keys) == key)
            label = (", ".join(map(str, key)) or "run") if first else None
            ax.plot(xs, ys, color=color, alpha=0.8, label=label, marker="." if len(xs) < 30 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="base YAML config")
    p.add_argument("--grid", action="append", default=[], help="section.key=v1,v2,... (repeatable)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--lr-sweep", default=None, help="comma-separated learning rates swept per cell")
    p.add_argument(
        "--lr-key",
        default="auto",
        help="the key the sweep sets (default auto: optim.muon_lr for Muon cells, optim.lr otherwise)",
    )
    p.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="loss for tokens-to-target (default: the first cell's mean loss at the end of its validation "
        "curve, the curves' own measurement)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rerun", action="store_true", help="rerun runs that already have results")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = p.parse_args(argv)
    grid = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = args.lr_sweep.split(",") if args.lr_sweep else [None]
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    keys = list(grid)
    cells = [dict(zip(keys, values)) for values in itertools.product(*grid.values())] or [{}]
    rows = []
    args.progress = Progress(len(cells) * (len(lrs) + len(seeds) - 1))
    for cell in cells:
        sweep = [run_one(args, cell, seeds[0], lr, args.out) for lr in lrs]
        ok = [r for r in sweep if r.get("status") == "ok" and math.isfinite(r["final_val_loss"])]
        best = min(ok, key=lambda r: r["final_val_loss"])["lr"] if ok else lrs[0]
        for r in sweep:
            r["best_lr"] = r["lr"] == best
            r["swept"] = len(lrs) > 1
        rows += sweep
        rows += [{**run_one(args, cell, s, best, args.out), "best_lr": True} for s in seeds[1:]]
    write_outputs(rows, keys, args.out, args.target_loss)
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
