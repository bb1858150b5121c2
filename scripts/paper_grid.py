#!/usr/bin/env python
"""The claims of "Muon: Training and Trade-offs with Latent Attention and MoE" (arXiv 2509.24406)
against a small grid, in one command:

    python scripts/paper_grid.py [--data DIR] [--out DIR] [--cells a,b,...] [--skip-eval] [--quick]

The cells are the configs of ``configs/experiments/paper_2509_24406/``: attention {MHA, MLA} x
feed-forward {dense, MoE} x optimizer {AdamW, Muon} at matched active parameters, plus MLA + MoE
with Muon's polar_express and normuon variants.  ``--data DIR`` holds WikiText-2's
``train.txt``, ``valid.txt`` and ``test.txt`` (default ``../shared/data/wikitext-2`` beside the
repository).  For each cell:

1. ``scripts/compare.py`` with the fair protocol: the cell's learning rate swept with seed 0
   (``optim.lr`` for AdamW, ``optim.muon_lr`` for Muon: ``--lr-key auto``), the other seeds at
   the cell's best rate.  AdamW cells run first; each Muon cell gets ``--target-loss`` = the mean
   final validation loss of the AdamW cell of the same architecture.
2. ``eval.py RUN --data DIR/test.txt --split test`` (its function,
   :func:`mlalm.evaluate.evaluate_checkpoint`, in this process) on every best-rate run: the
   WHOLE test split, the KV cache allocated and measured, decoding timed at ``--decode-batch``
   rows with ``--context`` tokens cached; it writes ``eval_test.json`` into the run directory,
   which compare.py reads as columns.  Training is not given ``data.test_path``: the trainer
   would evaluate the test split at the end of every run, the swept rates' too.

Validation during and at the end of training is the configs' fixed prefix of the validation
split (``train.eval_batches`` = ``train.final_eval_batches``): one measurement for the
learning-rate choice, the curves and the targets.  Then it writes into ``--out``:

  results.csv          one row per cell: parameters (total, active), validation (that prefix)
                       and test perplexity and bits per byte (mean and std over seeds), tokens to
                       reach the AdamW target, training throughput and peak memory (max RSS),
                       KV-cache bytes per token, inference memory (parameters + KV cache at
                       --context tokens, at batch 1 and --decode-batch), decode tokens/s
  claims.md            the paper's four claims beside the same comparison measured here
  loss_vs_tokens.png, loss_vs_time.png, perplexity_vs_kv.png   (with matplotlib)
  cells/<cell>/        compare.py's output for each cell (runs/, logs/, results.csv, results.md)

A cell already done (its run directories finished, its eval_test.json written) is reused; run the
same command again after an interruption.  ``--quick``: tiny models, a few steps, two cells, one
seed, one learning rate and a short evaluation, for a test of the whole pipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time

from mlalm.utils import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "experiments", "paper_2509_24406")
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2")

# AdamW cells first: each Muon cell's target loss is its architecture's AdamW result.
CELLS = [
    "mha_dense_adamw",
    "mha_moe_adamw",
    "mla_dense_adamw",
    "mla_moe_adamw",
    "mha_dense_muon",
    "mha_moe_muon",
    "mla_dense_muon",
    "mla_moe_muon",
    "mla_moe_muon_polar_express",
    "mla_moe_muon_normuon",
]
BASELINE, COMBINED = "mha_dense_adamw", "mla_moe_muon"
# Swept peak learning rates, factor 2 apart around each one's known best for models of this
# size: AdamW's optim.lr near 3e-3; Muon's own optim.muon_lr near 1e-2 (docs/results.md, AdamW
# vs Muon).  Muon's Adam side (embeddings, head, norms, router) keeps the config's optim.lr.
# The fourth point of each: with three, every cell's best on WikiText-2 was at an edge (AdamW
# at 6e-3, Muon at 5e-3; docs/paper_2509_24406.md).
LR_SWEEP = {"adamw": ["1.5e-3", "3e-3", "6e-3", "1.2e-2"], "muon": ["2.5e-3", "5e-3", "1e-2", "2e-2"]}
SEEDS = "0,1,2"

QUICK_CELLS = [BASELINE, COMBINED]
QUICK_OVERRIDES = [
    "data.bpe_vocab_size=300",
    "model.d_model=32",
    "model.n_layers=2",  # the first dense, the second MoE in the MoE cells
    "model.ffn_dim=48",
    "attention.n_heads=2",
    "attention.head_dim=16",
    "attention.kv_lora_rank=16",
    "attention.qk_nope_head_dim=8",
    "attention.qk_rope_head_dim=4",
    "attention.v_head_dim=8",
    "moe.expert_ffn_dim=16",
    "train.steps=5",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.final_eval_batches=2",
    "optim.warmup_steps=0",
]
QUICK_EVAL = {"max_batches": 2, "context": 64, "decode_batch": 2}

PAPER = {
    "compute": "48–52%",
    "memory": "68%",
    "speed": "3.2×",
    "perplexity": "8–12% better",
}
CLAIM_TITLES = {
    "compute": "Muon reaches AdamW's target loss with 48–52% of AdamW's training compute",
    "memory": "MLA + MoE + Muon: 68% memory reduction",
    "speed": "MLA + MoE + Muon: 3.2× inference speed-up",
    "perplexity": "MLA + MoE + Muon: perplexity 8–12% better",
}


# scripts/compare.py as a module (its protocol, run reader and tokens-to-target)
compare = load_script(os.path.join(ROOT, "scripts", "compare.py"), "compare")


# ---------------------------------------------------------------------------------------
# The arithmetic of the claims (pure functions of the gathered cells)
# ---------------------------------------------------------------------------------------


def mean_std(values) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the finite values; std None below two values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def ok_runs(cell: dict) -> list[dict]:
    return [r for r in cell["runs"] if r.get("status") == "ok"]


def paired(base: dict, new: dict, fn) -> list[float]:
    """``fn(base_run, new_run)`` for each seed both cells finished (the same seed: the same
    order of training batches); values that are None are left out."""
    by_seed = {r["seed"]: r for r in ok_runs(base)}
    out = [fn(by_seed[r["seed"]], r) for r in ok_runs(new) if r["seed"] in by_seed]
    return [v for v in out if v is not None]


def reduction_pct(base: float, new: float) -> float:
    """How much smaller ``new`` is than ``base``, in percent: 100 (1 - new / base)."""
    return 100.0 * (1.0 - new / base)


def inference_bytes(param_bytes: int, kv_bytes_per_token: float, context: int, batch: int) -> float:
    """Parameters (all of them: every expert must be resident) + the KV cache of ``batch``
    sequences of ``context`` tokens; activations left out."""
    return param_bytes + kv_bytes_per_token * context * batch


def compute_ratio(adamw: dict, muon: dict) -> dict | None:
    """Muon's tokens to reach AdamW's target over AdamW's, per Muon seed.

    The target is the mean final validation loss of AdamW's seeds at its best rate; AdamW
    reaches it with its whole budget (compare.py's convention for the reference cell); each
    Muon seed's tokens come from linear interpolation of its validation curve
    (``compare.tokens_to_reach``).  Same architecture, so the same model FLOPs per token: the
    token ratio is the compute ratio.  ``time_mean``: the same in training time, the token
    ratio times AdamW's training throughput over Muon's (medians of the logged intervals;
    Muon's orthogonalisation is not in the model FLOPs).  None when either cell has no
    finished run.
    """
    a, m = ok_runs(adamw), ok_runs(muon)
    if not a or not m:
        return None
    target = statistics.mean(r["final_val_loss"] for r in a)
    budget = a[0]["tokens"]
    reach = [compare.tokens_to_reach(r["curve"], target) for r in m]
    ratios = [t / budget for t in reach if t is not None]
    mean, std = mean_std(ratios) if len(ratios) == len(m) else (None, None)
    tps_a, _ = mean_std(r.get("train_tokens_per_s") for r in a)
    tps_m, _ = mean_std(r.get("train_tokens_per_s") for r in m)
    return {
        "time_mean": mean * tps_a / tps_m if mean is not None and tps_a and tps_m else None,
        "target": target,
        "budget": budget,
        "ratios": ratios,
        "reached": len(ratios),
        "seeds": len(m),
        "mean": mean,
        "std": std,
    }


def versus(base: dict, new: dict, *, context: int, batch: int) -> dict:
    """``new`` against ``base``: {'memory': {'kv_base', 'kv_new', 'kv_reduction' (%),
    'total': {batch: % reduction of parameters + KV cache at ``context``}}, 'speed':
    {'mean', 'std', 'values'} (decode tokens/s ratio, new over base) or None, 'perplexity':
    {'test'/'val': {'mean', 'std', 'values'}: 100 (1 - new / base), positive = better}.
    Seed-dependent figures are paired by seed."""
    kv_b, kv_n = base["kv_bytes_per_token"], new["kv_bytes_per_token"]
    memory = {"kv_base": kv_b, "kv_new": kv_n, "kv_reduction": reduction_pct(kv_b, kv_n), "total": {}}
    if base.get("param_bytes") is not None and new.get("param_bytes") is not None:
        memory["total"] = {
            b: reduction_pct(
                inference_bytes(base["param_bytes"], kv_b, context, b),
                inference_bytes(new["param_bytes"], kv_n, context, b),
            )
            for b in sorted({1, batch})
        }

    def stats(values):
        mean, std = mean_std(values)
        return {"mean": mean, "std": std, "values": values} if values else None

    def ratio(b, n):
        tb, tn = b.get("decode_tokens_per_s"), n.get("decode_tokens_per_s")
        return tn / tb if tb and tn else None

    perplexity = {}
    for split in ("test", "val"):
        key = f"{split}_ppl"
        change = stats(
            paired(
                base, new, lambda b, n: reduction_pct(b[key], n[key]) if b.get(key) and n.get(key) else None
            )
        )
        if change:
            perplexity[split] = change
    return {"memory": memory, "speed": stats(paired(base, new, ratio)), "perplexity": perplexity or None}


def summarise(cells: dict, *, context: int, batch: int) -> dict:
    """The four claims, measured.

    Returns:
        {'compute': [compute_ratio of each Muon cell against the AdamW cell of its
        architecture, with 'muon' and 'adamw' naming them], 'memory', 'speed', 'perplexity':
        :func:`versus` of the combined cell (MLA + MoE + Muon) against the baseline
        (MHA + dense + AdamW), None when either did not run; 'versus_baseline': {cell:
        versus(baseline, cell)} for every other cell, which separates the parts of the
        combination}.
    """
    out: dict = {"compute": [], "memory": None, "speed": None, "perplexity": None, "versus_baseline": {}}
    for name, cell in cells.items():
        if cell["optimizer"] != "muon":
            continue
        arch = (cell["attention"], cell["ffn"])
        adamw = next(
            (c for c in cells.values() if c["optimizer"] == "adamw" and (c["attention"], c["ffn"]) == arch),
            None,
        )
        r = compute_ratio(adamw, cell) if adamw is not None else None
        if adamw is not None and r is not None:
            out["compute"].append({"muon": name, "adamw": adamw["cell"], **r})
    base = cells.get(BASELINE)
    if base is None or base.get("kv_bytes_per_token") is None:
        return out
    for name, cell in cells.items():
        if name != BASELINE and cell.get("kv_bytes_per_token") is not None:
            out["versus_baseline"][name] = versus(base, cell, context=context, batch=batch)
    if COMBINED in out["versus_baseline"]:
        out.update(out["versus_baseline"][COMBINED])
    return out


# ---------------------------------------------------------------------------------------
# Gathering the runs
# ---------------------------------------------------------------------------------------


def model_sizes(config_path: str) -> dict:
    """Total and active (top-k of the routed experts) parameters and parameter bytes of a
    run's model, from shapes only (``nnx.eval_shape``: nothing is allocated)."""
    import jax
    from flax import nnx

    from mlalm.config import load_config
    from mlalm.model import Transformer, count_params

    cfg = load_config(config_path)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {
        "params_total": count_params(model),
        "params_active": count_params(model, active=True),
        "param_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
    }


def read_cell_run(path: str) -> dict:
    """One run's figures: compare.py's (curve, final loss, tokens, peak memory, KV bytes,
    eval_test.json columns) plus the summary's validation bits per byte, the median training
    throughput over the logged intervals, and eval.py's decode speed."""
    r = compare.read_run(path)
    summary = os.path.join(path, "summary.json")
    if os.path.isfile(summary):
        s = json.load(open(summary))
        r["val_ppl"], r["val_bpb"] = s["val_perplexity"], s["val_bits_per_byte"]
        r["val_tokens"], r["val_whole_split"] = s["val_tokens"], s["val_whole_split"]
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics):
        tps = [json.loads(line).get("tokens_per_s") for line in open(metrics)]
        tps = [t for t in tps if t]
        r["train_tokens_per_s"] = statistics.median(tps) if tps else None
    ev = os.path.join(path, "eval_test.json")
    if os.path.isfile(ev):
        e = json.load(open(ev))
        r["test_ppl"], r["test_bpb"] = e["perplexity"], e["bits_per_byte"]
        r["test_whole_split"] = e["whole_split"]
        r["decode_tokens_per_s"] = (e.get("decode") or {}).get("tokens_per_s")
        r["decode_batch"] = (e.get("decode") or {}).get("batch")
        r["decode_context"] = (e.get("decode") or {}).get("context")
    return r


def best_runs(cell_out: str) -> list[dict]:
    """compare.py's rows of the best learning rate (every seed), from its results.csv."""
    path = os.path.join(cell_out, "results.csv")
    if not os.path.isfile(path):
        return []
    return [r for r in csv.DictReader(open(path)) if r["best_lr"] == "True"]


def gather_cell(name: str, cell_out: str, lr_grid: list[str]) -> dict | None:
    """The cell's description and its best-rate runs (None when it has not run)."""
    from mlalm.config import load_config

    rows = best_runs(cell_out)
    if not rows:
        return None
    runs = []
    for row in rows:
        path = os.path.join(cell_out, "runs", row["run"])
        started = os.path.isfile(os.path.join(path, "config.yaml"))
        r = read_cell_run(path) if started else {"status": "failed"}
        runs.append({**r, "seed": int(row["seed"]), "run_dir": path})
    done = [r for r in runs if os.path.isfile(os.path.join(r["run_dir"], "config.yaml"))]
    # what ran (the cell's file and the overrides) when a run directory has its config
    config = (
        os.path.join(done[0]["run_dir"], "config.yaml") if done else os.path.join(CONFIG_DIR, name + ".yaml")
    )
    cfg = load_config(config)
    sizes = model_sizes(config) if done else {}
    best = rows[0]["lr"] or None
    return {
        "cell": name,
        "attention": cfg.attention.kind,
        "ffn": "moe" if cfg.moe.n_routed_experts else "dense",
        "optimizer": cfg.optim.name,
        "muon_variant": cfg.optim.muon_variant if cfg.optim.name == "muon" else None,
        "lr_key": "optim.muon_lr" if cfg.optim.name == "muon" else "optim.lr",
        "lr_grid": lr_grid,
        "best_lr": best,
        "lr_at_edge": best is not None and len(lr_grid) > 1 and best in (lr_grid[0], lr_grid[-1]),
        "kv_bytes_per_token": done[0]["kv_cache_bytes_per_token"] if done else None,
        **sizes,
        "runs": runs,
    }


def evaluate_run(run_dir: str, test_path: str, *, max_batches: int, decode_batch: int, context: int) -> None:
    """eval.py on the test split (``--data test.txt --split test``): eval_test.json."""
    from mlalm.eval_report import write_run_outputs
    from mlalm.evaluate import evaluate_checkpoint

    def log(text, transient=False):
        if not transient:
            print(f"[paper_grid]   {text}", flush=True)

    t0 = time.time()
    report = evaluate_checkpoint(
        run_dir,
        data=test_path,
        split="test",
        max_batches=max_batches,
        decode_batch=decode_batch,
        decode_context=context,
        log=log,
    )
    write_run_outputs(run_dir, report)
    kv = report["kv_cache"]
    if not kv["agrees"]:
        print(
            f"[paper_grid] warning: {run_dir}: the allocated KV cache "
            f"({kv['measured_bytes_per_token']:g} B/token) differs from the formula "
            f"({kv['bytes_per_token']} B/token)",
            flush=True,
        )
    print(
        f"[paper_grid] {os.path.basename(run_dir)}: test perplexity {report['perplexity']:.2f}, "
        f"decode {report['decode']['tokens_per_s']:,.1f} tokens/s ({time.time() - t0:.0f}s)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def cell_rows(cells: dict, compute: list[dict], *, context: int, batch: int) -> list[dict]:
    """One results.csv row per cell."""
    ratio = {c["muon"]: c for c in compute}
    rows = []
    for name, c in cells.items():
        ok = ok_runs(c)
        row = {
            k: c.get(k)
            for k in (
                "cell",
                "attention",
                "ffn",
                "optimizer",
                "muon_variant",
                "lr_key",
                "best_lr",
                "lr_at_edge",
                "params_total",
                "params_active",
            )
        }
        row["lr_grid"] = " ".join(c["lr_grid"]) or "config"
        row["seeds"] = len(ok)
        row["not_ok"] = len(c["runs"]) - len(ok)
        row["tokens"] = ok[0]["tokens"] if ok else None
        for key in ("final_val_loss", "val_ppl", "val_bpb", "test_ppl", "test_bpb"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(r.get(key) for r in ok)
        row["val_tokens"] = ok[0].get("val_tokens") if ok else None
        row["test_whole_split"] = ok[0].get("test_whole_split") if ok else None
        cr = ratio.get(name)
        row["target_loss"] = cr["target"] if cr else None
        row["compute_ratio_mean"], row["compute_ratio_std"] = (cr["mean"], cr["std"]) if cr else (None, None)
        row["time_ratio_mean"] = cr["time_mean"] if cr else None
        row["train_tokens_per_s_mean"], _ = mean_std(r.get("train_tokens_per_s") for r in ok)
        row["peak_train_memory_bytes_mean"], _ = mean_std(r.get("peak_memory_bytes") for r in ok)
        row["kv_bytes_per_token"] = c["kv_bytes_per_token"]
        row["kv_measured_bytes_per_token"], _ = mean_std(
            r.get("kv_cache_measured_bytes_per_token") for r in ok
        )
        row["param_bytes"] = c.get("param_bytes")
        row["decode_batch"], row["decode_context"] = batch, context
        for key, b in (("inference_bytes_batch1", 1), ("inference_bytes_decode_batch", batch)):
            row[key] = (
                inference_bytes(c["param_bytes"], c["kv_bytes_per_token"], context, b)
                if c.get("param_bytes") is not None and c["kv_bytes_per_token"] is not None
                else None
            )
        row["decode_tokens_per_s_mean"], row["decode_tokens_per_s_std"] = mean_std(
            r.get("decode_tokens_per_s") for r in ok
        )
        rows.append(row)
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(rows[0]) if rows else ["cell"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def fmt(mean, std=None, *, digits=2, unit="") -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}{unit}" + (f" ± {std:.{digits}f}{unit}" if std is not None else "")


def label(c: dict) -> str:
    opt = "AdamW" if c["optimizer"] == "adamw" else f"Muon ({c['muon_variant']})"
    return f"{c['attention'].upper()} + {'MoE' if c['ffn'] == 'moe' else 'dense'} + {opt}"


def smaller(pct: float) -> str:
    return f"{pct:.1f}% smaller" if pct >= 0 else f"{-pct:.1f}% larger"


def memory_text(m: dict) -> str:
    return f"KV cache {smaller(m['kv_reduction'])} ({m['kv_base']:,} → {m['kv_new']:,} B/token)" + "".join(
        f"; parameters + KV cache, batch {b}: {smaller(v)}" for b, v in m["total"].items()
    )


def perplexity_text(p: dict | None, val_label: str) -> str:
    if not p:
        return "—"
    names = {"test": "test", "val": val_label}
    return "; ".join(f"{names[k]}: {fmt(v['mean'], v['std'], digits=1, unit='%')}" for k, v in p.items())


def claims_md(claims: dict, cells: dict, rows: list[dict], meta: dict) -> str:
    """claims.md: each claim of the paper beside the same comparison measured here."""
    context, batch = meta["context"], meta["decode_batch"]
    base, new = cells.get(BASELINE), cells.get(COMBINED)
    val_tokens = next((r["val_tokens"] for r in rows if r.get("val_tokens")), None)
    whole_test = all(r.get("test_whole_split") for r in rows if r.get("test_ppl_mean") is not None)
    val_label = f"validation (first {val_tokens:,} tokens)" if val_tokens else "validation"
    sweep = (
        "; ".join(f"{k} {' '.join(v)}" for k, v in meta["lr_sweep"].items()) or "none (the configs' rates)"
    )
    lines = [
        "# The claims of arXiv 2509.24406, measured",
        "",
        f"{meta['date']}, {meta['machine']}. Command: `{meta['command']}`",
        "",
        f"Data: {meta['data']}. Learning rates swept with seed {meta['seeds'].split(',')[0]} (AdamW: "
        f"optim.lr, Muon: optim.muon_lr): {sweep}; seeds {meta['seeds']} at each cell's best. Figures "
        "are mean ± standard deviation over seeds; a comparison of two cells pairs the runs of the "
        "same seed (the same order of training batches). Baseline: "
        f"{label(base) if base else BASELINE}; combined: {label(new) if new else COMBINED}. "
        f"Test figures: {'the whole test split' if whole_test else 'part of the test split'}; "
        f"{val_label}: the measurement that chose the learning rate and gave the target loss.",
        "",
        "| claim | paper | compared here | measured |",
        "|---|---|---|---|",
    ]
    comp = claims["compute"]
    text = (
        "; ".join(
            f"{label(cells[c['muon']])}: "
            + (
                fmt(100 * c["mean"], 100 * c["std"] if c["std"] is not None else None, digits=0, unit="%")
                if c["mean"] is not None
                else f"target not reached ({c['reached']} of {c['seeds']} seeds)"
            )
            for c in comp
        )
        if comp
        else "not measured (no AdamW and Muon cells of the same architecture ran)"
    )
    lines.append(
        f"| {CLAIM_TITLES['compute']} | {PAPER['compute']} | tokens (= model FLOPs: same architecture) "
        "Muon needs to reach the mean final validation loss of AdamW of the same architecture, each "
        f"at its best learning rate, over AdamW's budget | {text} |"
    )
    lines.append(
        f"| {CLAIM_TITLES['memory']} | {PAPER['memory']} (of the KV cache, in 2508.01261) | KV-cache "
        f"bytes per token (MLA: the absorbed latent cache); parameters + KV cache at context {context:,} | "
        + (memory_text(claims["memory"]) if claims["memory"] else "not measured (needs both cells)")
        + " |"
    )
    sp = claims["speed"]
    lines.append(
        f"| {CLAIM_TITLES['speed']} | {PAPER['speed']} | decode tokens/s at batch {batch} with {context:,} "
        "tokens cached, combined over baseline | "
        + (fmt(sp["mean"], sp["std"], unit="×") if sp else "not measured (needs both cells evaluated)")
        + " |"
    )
    lines.append(
        f"| {CLAIM_TITLES['perplexity']} | {PAPER['perplexity']} | token perplexity, 100 (1 − combined / "
        "baseline): positive = better | "
        + (perplexity_text(claims["perplexity"], val_label) if claims["perplexity"] else "not measured")
        + " |"
    )
    if claims["versus_baseline"]:
        lines += [
            "",
            f"Every cell against the baseline ({label(base) if base else BASELINE}), which separates the "
            "parts of the combination:",
            "",
            f"| cell | perplexity change | KV cache and inference memory | decode speed-up (batch {batch}) |",
            "|---|---|---|---|",
        ]
        for name, v in claims["versus_baseline"].items():
            sp = v["speed"]
            lines.append(
                f"| {label(cells[name])} | {perplexity_text(v['perplexity'], val_label)} | "
                f"{memory_text(v['memory'])} | {fmt(sp['mean'], sp['std'], unit='×') if sp else '—'} |"
            )
    if comp:
        lines += [
            "",
            "Muon against AdamW, per architecture (tokens to reach AdamW's mean final validation loss, "
            "over AdamW's budget; the time ratio also counts each optimizer's training throughput here):",
            "",
            "| Muon cell | AdamW target loss | per seed | mean | in training time |",
            "|---|---|---|---|---|",
        ]
        for c in comp:
            missing = c["seeds"] - c["reached"]
            lines.append(
                f"| {label(cells[c['muon']])} | {c['target']:.4f} | "
                + ", ".join(f"{100 * x:.0f}%" for x in c["ratios"])
                + (f" ({missing} seed(s) did not reach it)" if missing else "")
                + f" | {fmt(100 * c['mean'] if c['mean'] is not None else None, digits=0, unit='%')} | "
                f"{fmt(100 * c['time_mean'] if c['time_mean'] is not None else None, digits=0, unit='%')} |"
            )
    lines += [
        "",
        "## Cells",
        "",
        f"Best learning rate of each cell; inference memory = parameters + KV cache at context {context:,}.",
        "",
        f"| cell | params (active) | best lr | {val_label} perplexity | test perplexity | test bits/byte | "
        f"KV B/token | inference MiB (batch 1 / {batch}) | decode tokens/s | training tokens/s | "
        "peak training RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for row in rows:
        c = cells[row["cell"]]
        total = [row["inference_bytes_batch1"], row["inference_bytes_decode_batch"]]
        edge = " (grid edge)" if row["lr_at_edge"] else ""
        peak = row["peak_train_memory_bytes_mean"]
        unfinished = f" ({row['not_ok']} run(s) at the best rate did not finish)" if row["not_ok"] else ""
        kv = row["kv_bytes_per_token"]
        count = lambda n: f"{n:,}" if n is not None else "—"
        lines.append(
            f"| {label(c)}{unfinished} | {count(row['params_total'])} ({count(row['params_active'])}) | "
            f"{row['best_lr'] or 'config'}{edge} | {fmt(row['val_ppl_mean'], row['val_ppl_std'])} | "
            f"{fmt(row['test_ppl_mean'], row['test_ppl_std'])} | "
            f"{fmt(row['test_bpb_mean'], row['test_bpb_std'], digits=3)} | "
            f"{count(kv)} | "
            + " / ".join(f"{t / mib:.1f}" if t is not None else "—" for t in total)
            + f" | {fmt(row['decode_tokens_per_s_mean'], row['decode_tokens_per_s_std'], digits=0)} | "
            f"{fmt(row['train_tokens_per_s_mean'], digits=0)} | "
            f"{fmt(peak / mib if peak else None, digits=0)} |"
        )
    lines += [
        "",
        "What the paper's figures measure: the abstract of 2509.24406 does not say; the same 68% and "
        "3.2× appear in its authors' earlier 2508.01261 as the KV-cache memory reduction and the "
        "inference speed-up of MLA (latent of half the model width) + MoE over a vanilla transformer. "
        "Here memory is the KV cache per token (and parameters + KV cache), speed the decoding "
        "throughput with a long context cached, perplexity per token. The optimizer changes neither "
        "memory nor speed at inference: those two compare architectures.",
        "",
    ]
    return "\n".join(lines)


def plot_perplexity_vs_kv(cells: dict, rows: list[dict], out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        y = row["test_ppl_mean"] if row["test_ppl_mean"] is not None else row["val_ppl_mean"]
        if y is None:
            continue
        err = row["test_ppl_std"] if row["test_ppl_mean"] is not None else row["val_ppl_std"]
        c = cells[row["cell"]]
        ax.errorbar(
            row["kv_bytes_per_token"],
            y,
            yerr=err or 0,
            fmt="o" if c["optimizer"] == "adamw" else "s",
            color=f"C{i % 10}",
            capsize=3,
            label=label(c),
        )
    ax.set_xlabel("KV-cache bytes per token (all layers)")
    ax.set_ylabel("test perplexity (per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perplexity_vs_kv.png"), dpi=110)
    plt.close(fig)


def write_outputs(cells: dict, out: str, meta: dict) -> dict:
    claims = summarise(cells, context=meta["context"], batch=meta["decode_batch"])
    rows = cell_rows(cells, claims["compute"], context=meta["context"], batch=meta["decode_batch"])
    write_csv(os.path.join(out, "results.csv"), rows)
    with open(os.path.join(out, "claims.md"), "w") as f:
        f.write(claims_md(claims, cells, rows, meta))
    curves = [
        {"cell": name, "seed": r["seed"], "curve": r.get("curve", []), "best_lr": True}
        for name, c in cells.items()
        for r in c["runs"]
    ]
    compare.plot(curves, ["cell"], out)
    plot_perplexity_vs_kv(cells, rows, out)
    return claims


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def adamw_target(cells_out: str, name: str) -> float | None:
    """Mean final validation loss of the AdamW cell of ``name``'s architecture, if it ran."""
    twin = "_".join(name.split("_")[:2]) + "_adamw"
    losses = [
        float(r["final_val_loss"])
        for r in best_runs(os.path.join(cells_out, twin))
        if r["status"] == "ok" and r["final_val_loss"]
    ]
    return statistics.mean(losses) if losses else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="The claims of arXiv 2509.24406 against a small grid, in one command."
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="directory of train.txt, valid.txt, test.txt")
    p.add_argument("--out", default=os.path.join("compare", "paper_2509_24406"), help="output directory")
    p.add_argument("--cells", default=None, help=f"comma-separated subset of: {', '.join(CELLS)}")
    p.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {SEEDS}; --quick: 0)")
    p.add_argument("--skip-eval", action="store_true", help="train only: no test split, no decode timing")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="cached tokens of the decode timing and the inference memory (default 4096; --quick: 64)",
    )
    p.add_argument("--decode-batch", type=int, default=None, help="rows of the decode timing (default 8)")
    p.add_argument("--rerun", action="store_true", help="train and evaluate again what is already done")
    p.add_argument("--quick", action="store_true", help="tiny models, 5 steps, two cells, one seed and rate")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run (after the cell's)")
    args = p.parse_args(argv)

    def body():
        from mlalm.config import load_config
        from mlalm.errors import CheckpointError, ConfigError, DataError

        names = args.cells.split(",") if args.cells else (QUICK_CELLS if args.quick else CELLS)
        unknown = [n for n in names if n not in CELLS]
        if unknown:
            raise ConfigError(f"--cells: unknown cell(s) {', '.join(unknown)}; valid: {', '.join(CELLS)}")
        names = [n for n in CELLS if n in names]  # AdamW first: the Muon cells' targets
        split_paths = {s: os.path.join(args.data, f"{s}.txt") for s in ("train", "valid", "test")}
        for split, path in split_paths.items():
            if not os.path.isfile(path):
                raise DataError(f"--data {args.data}: no {split}.txt (WikiText-2's train/valid/test.txt)")
        seeds = args.seeds or ("0" if args.quick else SEEDS)
        quick_eval = QUICK_EVAL if args.quick else {}
        context = args.context or quick_eval.get("context", 4096)
        batch = args.decode_batch or quick_eval.get("decode_batch", 8)
        overrides = (
            [f"data.path={split_paths['train']}", f"data.val_path={split_paths['valid']}"]
            + (QUICK_OVERRIDES if args.quick else [])
            + list(args.overrides)
        )
        configs = {name: os.path.join(CONFIG_DIR, name + ".yaml") for name in names}
        optimizer = {name: load_config(configs[name], overrides).optim.name for name in names}
        grids = {name: [] if args.quick else LR_SWEEP[optimizer[name]] for name in names}
        cells_out = os.path.join(args.out, "cells")
        os.makedirs(cells_out, exist_ok=True)
        t0, failed = time.time(), []
        for i, name in enumerate(names, 1):
            print(
                f"[paper_grid] cell {i} of {len(names)}: {name} ({time.time() - t0:.0f}s so far)", flush=True
            )
            cell_out = os.path.join(cells_out, name)
            cmd = ["--config", configs[name], "--seeds", seeds, "--out", cell_out]
            if grids[name]:
                cmd += ["--lr-sweep", ",".join(grids[name])]
            target = adamw_target(cells_out, name) if optimizer[name] == "muon" else None
            if target is not None:
                cmd += ["--target-loss", f"{target:.6f}"]
            if args.rerun:
                cmd.append("--rerun")
            compare.main(cmd + overrides)
            if args.skip_eval:
                continue
            for row in best_runs(cell_out):
                run_dir = os.path.join(cell_out, "runs", row["run"])
                if row["status"] != "ok":
                    continue
                if os.path.isfile(os.path.join(run_dir, "eval_test.json")) and not args.rerun:
                    print(f"[paper_grid] {row['run']}: evaluated before, reusing", flush=True)
                    continue
                try:
                    evaluate_run(
                        run_dir,
                        split_paths["test"],
                        max_batches=quick_eval.get("max_batches", 0),
                        decode_batch=batch,
                        context=context,
                    )
                except (ConfigError, DataError, CheckpointError) as e:
                    # one bad checkpoint does not stop hours of grid: reported, left out, exit 1
                    print(f"[paper_grid] error: {run_dir}: the evaluation failed: {e}", flush=True)
                    failed.append(run_dir)
        cells = {}
        for name in names:
            cell = gather_cell(name, os.path.join(cells_out, name), grids[name])
            if cell is not None:
                cells[name] = cell
        import jax

        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, JAX {jax.__version__} on {jax.default_backend()}",
            "command": " ".join(
                ["python scripts/paper_grid.py"] + (argv if argv is not None else sys.argv[1:])
            ),
            "data": args.data,
            "seeds": seeds,
            "lr_sweep": {} if args.quick else {"AdamW": LR_SWEEP["adamw"], "Muon": LR_SWEEP["muon"]},
            "context": context,
            "decode_batch": batch,
        }
        write_outputs(cells, args.out, meta)
        print(open(os.path.join(args.out, "claims.md")).read())
        print(f"[paper_grid] done in {time.time() - t0:.0f}s: {args.out}/results.csv, claims.md", flush=True)
        if failed:
            print(f"[paper_grid] {len(failed)} evaluation(s) failed: {', '.join(failed)}", flush=True)
        return 1 if failed else 0

    from mlalm.cli import run_command

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
