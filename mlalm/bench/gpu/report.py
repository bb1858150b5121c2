"""The goals (met / not met, with the measured figure) and the readable report.md."""

from __future__ import annotations

# name -> (text, stage, threshold): value >= threshold meets the goal
GOALS = {
    "dense_mfu": ("dense model MFU >= 45% (better of attention.impl xla / pallas)", "train_dense", 0.45),
    "moe_mfu": ("MoE model MFU >= 30% (better of attention.impl xla / pallas)", "train_moe", 0.30),
    "flash_speedup": (
        "Pallas flash attention fwd+bwd >= 1.5x XLA at seq 4096, d_qk 192 / d_v 128",
        "attention",
        1.5,
    ),
    "decode_hbm": ("MLA decode kernel >= 60% of HBM bandwidth (batch 64, context 32k)", "decode", 0.60),
}
# name -> (text, stage, figure): a boolean figure the stage computes
CHECKS = {
    "kernels_match_float64": ("Pallas kernels (fwd and grads) match float64 references", "kernels", "all_ok"),
    "bf16_tracks_float32": (
        "bf16 loss curve tracks float32 (finite, learns, within tol)",
        "bf16_convergence",
        "agree",
    ),
}


def _value(name: str, figures: dict):
    """(measured value, where it comes from) of goal ``name``, or (None, None)."""
    if name in ("dense_mfu", "moe_mfu"):
        runs = [
            (figures[i]["mfu"], i)
            for i in ("xla", "pallas")
            if isinstance(figures.get(i), dict) and figures[i].get("mfu") is not None
        ]
        if not runs:
            return None, None
        best = max(runs)
        return best[0], f"attention.impl={best[1]}"
    if name == "flash_speedup":
        return figures.get("goal_speedup_fwd_bwd"), f"config {figures.get('goal_config')}"
    return figures.get("goal_frac_hbm"), f"batch, context {figures.get('goal_config')}"


def summarise(report: dict) -> dict:
    """{name: {'goal', 'value', 'threshold', 'met', 'source'}} for the goals and checks;
    'met' is None when the stage did not produce the figure."""
    out = {}
    for name, (text, stage, threshold) in GOALS.items():
        value, source = _value(name, report["stages"].get(stage, {}).get("figures") or {})
        out[name] = {
            "goal": text,
            "value": value,
            "threshold": threshold,
            "met": None if value is None else bool(value >= threshold),
            "source": source,
        }
    for name, (text, stage, key) in CHECKS.items():
        value = (report["stages"].get(stage, {}).get("figures") or {}).get(key)
        out[name] = {
            "goal": text,
            "value": value,
            "threshold": True,
            "met": None if value is None else bool(value),
            "source": stage,
        }
    return out


def _f(x, fmt="{:.3g}"):
    if x is None:
        return "—"
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _pct(x):
    return _f(None if x is None else 100 * x, "{:.1f}%")


def format_value(name: str, g: dict) -> str:
    """A goal's measured figure as the report shows it (percent, ratio or boolean)."""
    if g["value"] is None or isinstance(g["value"], bool):
        return _f(g["value"])
    return _pct(g["value"]) if name in ("dense_mfu", "moe_mfu", "decode_hbm") else f"{g['value']:.2f}x"


def write_markdown(report: dict) -> str:
    dev = report.get("device") or {}
    v = report.get("versions") or {}
    lines = ["# mlalm GPU acceptance report", ""]
    if report.get("dry_run"):
        lines += [
            "**Dry run** (CPU, tiny shapes, Pallas interpreter): the figures show that "
            "the check runs, not how fast anything is.",
            "",
        ]
    lines += [
        f"- device: {dev.get('device_kind', '?')} ({dev.get('backend', '?')}, "
        f"{dev.get('device_count', '?')} device(s))",
        f"- jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, optax "
        f"{v.get('optax')}, orbax {v.get('orbax-checkpoint')}, Python {v.get('python')}",
        f"- started {report.get('started')}, finished {report.get('finished') or '(running)'}"
        f", commit {report.get('git_commit')}",
        f"- command: `{' '.join(report.get('command') or [])}`",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for name, g in report["goals"].items():
        met = {True: "**met**", False: "**not met**", None: "no figure"}[g["met"]]
        lines.append(f"| {g['goal']} | {format_value(name, g)} ({g['source']}) | {met} |")
    lines += ["", "## Stages", "", "| stage | status | seconds | budget (s) |", "|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(
            f"| {name} | {s['status']} | {_f(s.get('seconds'), '{:.1f}')} | "
            f"{_f(report['budgets_s'].get(name), '{:.0f}')} |"
        )
    for name, s in report["stages"].items():
        if s["status"] in ("pending", "running", "skipped"):
            continue
        lines += ["", f"### {name}: {s['status']}", ""]
        if s.get("error"):
            lines += ["```", s["error"][:3000], "```", ""]
        lines += SECTIONS[name](s.get("figures") or {})
    return "\n".join(lines)


def _kernels(f):
    rows = ["| kernel | shape | dtype | max error | tol | ok |", "|---|---|---|---|---|---|"]
    for kind in ("flash", "decode"):
        for r in f.get(kind, []):
            shape = ", ".join(
                f"{k}={r[k]}" for k in ("B", "T", "S", "N", "K", "H", "G", "R", "P", "causal") if k in r
            )
            worst = max(r["errors"].values()) if "errors" in r else r.get("error")
            rows.append(
                f"| {kind} | {shape} | {r['dtype']} | {_f(worst, '{:.2e}')} | {r.get('tol', '')} "
                f"| {r['ok']} |"
            )
    return [f"Interpret mode: {f.get('interpret')}.", ""] + rows


def _attention(f):
    rows = [
        f"FLOPs: {f.get('flop_formula')}. Interpret mode: {f.get('interpret')}.",
        "",
        "| shape | d_qk/d_v | B x T | impl | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in f.get("rows", []):
        for impl, x in r["impls"].items():
            note = x.get("error") or x.get("unsupported") or ""
            if impl == "pallas" and r.get("pallas_speedup_fwd_bwd"):
                note = f"{r['pallas_speedup_fwd_bwd']:.2f}x XLA fwd+bwd"
            rows.append(
                f"| {r['shape']} | {r['d_qk']}/{r['d_v']} | {r['B']} x {r['T']} | {impl} | "
                f"{_f(x.get('fwd_ms'))} | {_f(x.get('fwd_bwd_ms'))} | "
                f"{_f(x.get('fwd_bwd_tflops'))} | {note.replace('|', '/')[:160]} |"
            )
    return rows


def _decode(f):
    rows = [
        f"Bytes: {f.get('bytes_counted')}; HBM {_f(f.get('hbm_gbps_datasheet'))} GB/s (data sheet).",
        "",
        "| B | context | Pallas ms | GB/s | of HBM | XLA ms | XLA GB/s | Pallas / XLA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in f.get("rows", []):
        p, x = r["impls"].get("pallas", {}), r["impls"].get("xla", {})
        rows.append(
            f"| {r['B']} | {r['S']} | {_f(p.get('ms', p.get('error')))} | {_f(p.get('gbps'))} | "
            f"{_pct(p.get('frac_hbm'))} | {_f(x.get('ms', x.get('error')))} | "
            f"{_f(x.get('gbps'))} | {_f(r.get('pallas_speedup'), '{:.2f}x')} |"
        )
    return rows


def _train(f):
    rows = [
        "| impl | tok/s | step ms | MFU | MFU causal | of measured matmul | peak memory | "
        "compile s | final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peak = None
    for impl in ("xla", "pallas"):
        r = f.get(impl)
        if not isinstance(r, dict):
            continue
        if r.get("peak_flops") is not None:
            peak = peak or (r.get("peak_source"), r["peak_flops"], r.get("matmul_flops"))
        mem = r.get("peak_memory_bytes")
        rows.append(
            f"| {impl} | {_f(r.get('tokens_per_s'), '{:,.0f}')} | "
            f"{_f(None if r.get('step_s') is None else 1e3 * r['step_s'], '{:.1f}')} | "
            f"{_pct(r.get('mfu'))} | {_pct(r.get('mfu_causal'))} | "
            f"{_pct(r.get('mfu_vs_matmul'))} | "
            f"{_f(None if mem is None else mem / 2**30, '{:.2f} GiB')} | "
            f"{_f(r.get('compile_s'), '{:.1f}')} | {_f(r.get('final_loss'), '{:.3f}')} |"
        )
    if peak:
        rows = [f"Peak: {_f(peak[1])} FLOP/s ({peak[0]}); measured matmul {_f(peak[2])} FLOP/s.", ""] + rows
    return rows


def _convergence(f):
    rows = [
        f"{f.get('steps')} steps of {f.get('tokens_per_step')} tokens; loss floor "
        f"{_f(f.get('loss_floor'), '{:.4f}')} (entropy rate), uniform "
        f"{_f(f.get('uniform_loss'), '{:.3f}')}.",
        "",
        "| compute | first loss | mean of last steps | finite | params / AdamW state |",
        "|---|---|---|---|---|",
    ]
    for dt in ("float32", "bfloat16"):
        r = f.get(dt)
        if isinstance(r, dict):
            rows.append(
                f"| {dt} | {r['first_loss']:.4f} | {r['tail_mean_loss']:.4f} | "
                f"{r['all_finite']} | {r['param_dtypes']} / {r['opt_state_dtypes']} |"
            )
    rows += [
        "",
        f"Mean |Δloss| over the last {f.get('tail')} steps: "
        f"{_f(f.get('mean_abs_diff_tail'), '{:.4f}')} nats (tolerance {f.get('tol_nats')}); "
        f"largest |Δloss| {_f(f.get('max_abs_diff'), '{:.4f}')}.",
    ]
    return rows


SECTIONS = {
    "kernels": _kernels,
    "attention": _attention,
    "decode": _decode,
    "train_dense": _train,
    "train_moe": _train,
    "bf16_convergence": _convergence,
}
