"""The benchmark's summary figures and its table.

MFU = flops_per_token (``mlalm.flops``: 6 x active matmul parameters + attention products
over the full T x T, PaLM's convention) x tokens/s / peak FLOP/s.  Each figure comes from
its least disturbed measurement: the highest of the peak runs, and for each training
workload the round with the lowest median step time (all rounds are kept in
'<workload>_rounds').
"""

from __future__ import annotations

from mlalm.bench.common import ratio


def mfu(workload: dict, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of a training workload's result (None when it failed)."""
    if "tokens_per_s" not in workload or not peak_flops:
        return None
    return workload["flops_per_token"] * workload["tokens_per_s"] / peak_flops


def combine(out: dict, peaks: list, runs: dict) -> dict:
    """Add to ``out`` the peak and the training figures from the peak runs and the rounds
    of each training workload (``runs``: 'mlalm', and 'dense', 'reference' when run)."""
    ok_peaks = [p for p in peaks if p.get("peak_flops")]
    out["peak"] = max(ok_peaks, key=lambda p: p["peak_flops"]) if ok_peaks else peaks[0]
    out["peak_runs"] = [
        {
            "peak_flops": p.get("peak_flops"),
            "error": p.get("error"),
            "loadavg_1min_before_after": p.get("loadavg_1min_before_after"),
        }
        for p in peaks
    ]
    out["peak_flops"] = peak = out["peak"].get("peak_flops")
    for key, results in runs.items():
        good = [x for x in results if "step_s" in x]
        out[key] = min(good, key=lambda x: x["step_s"]) if good else results[0]
        if len(results) > 1:
            out[key + "_rounds"] = [
                {
                    "step_s": x.get("step_s"),
                    "error": x.get("error"),
                    "cpu_per_wall": x.get("cpu_per_wall"),
                    "loadavg_1min_before_after": x.get("loadavg_1min_before_after"),
                }
                for x in results
            ]
    train = out["mlalm"]
    out["tokens_per_s"] = train.get("tokens_per_s")
    out["step_s"] = train.get("step_s")
    out["flops_per_token"] = train.get("flops_per_token")
    out["mfu"] = mfu(train, peak)
    out["peak_memory_bytes"] = train.get("peak_memory_bytes")
    if "dense" in runs:
        dense = out["dense"]
        out["dense_tokens_per_s"] = dense.get("tokens_per_s")
        out["dense_mfu"] = mfu(dense, peak)
        out["dense_peak_memory_bytes"] = dense.get("peak_memory_bytes")
        # same active FFN width, so the step-time ratio is what MoE routing/dispatch costs
        out["moe_overhead"] = ratio(train.get("step_s"), dense.get("step_s"))
    if "reference" in runs:
        ref = out["reference"]
        out["reference_tokens_per_s"] = ref.get("tokens_per_s")
        out["reference_peak_memory_bytes"] = ref.get("peak_memory_bytes")
        out["speedup_vs_reference"] = ratio(out["tokens_per_s"], ref.get("tokens_per_s"))
        out["memory_ratio_vs_reference"] = ratio(out["peak_memory_bytes"], ref.get("peak_memory_bytes"))
    return out


def _f(x, fmt="{:,.0f}", none="-"):
    return none if x is None else fmt.format(x)


def _mib(x):
    return _f(None if x is None else x / 2**20, "{:,.0f} MiB")


def _training(r: dict, lines: list) -> None:
    pk = r.get("peak", {})
    runs = ", ".join(
        _f(x.get("peak_flops") and x["peak_flops"] / 1e9, "{:,.1f}") for x in r.get("peak_runs", [])
    )
    lines.append(
        f"peak: {_f(r.get('peak_flops') and r['peak_flops'] / 1e9, '{:,.1f}')} GFLOP/s "
        f"({pk.get('peak_source', pk.get('error'))}; the higher of the runs at start and end: {runs})"
    )
    for key in ("mlalm", "dense", "reference"):
        if key + "_rounds" in r:
            lines.append(
                f"{key} rounds: step ms "
                + ", ".join(_f(x.get("step_s") and x["step_s"] * 1e3) for x in r[key + "_rounds"])
                + " (fastest kept)"
            )
    fpt = r.get("flops_per_token")
    if fpt:
        mc = r["mlalm"].get("macs_per_token", {})
        lines.append(
            f"model FLOPs/token: {fpt / 1e6:.2f} M  (6 x MACs: attn proj "
            f"{mc.get('attn_proj', 0) / 1e3:.0f}k, attn products {mc.get('attn_products', 0) / 1e3:.0f}k, "
            f"FFN {mc.get('ffn', 0) / 1e3:.0f}k, router {mc.get('router', 0) / 1e3:.0f}k, "
            f"head {mc.get('head', 0) / 1e3:.0f}k)"
        )
    lines.append("")
    hdr = (
        f"{'training step':<44}{'tokens/s':>10}{'step ms':>10}{'min..max ms':>16}{'MFU':>8}"
        f"{'peak mem':>12}{'cpu/wall':>9}"
    )
    lines += [hdr, "-" * len(hdr)]

    def row(name, w, m):
        if not w or "step_s" not in w:
            lines.append(f"{name:<44}{(w or {}).get('error') or (w or {}).get('skipped') or 'skipped'}")
            return
        lines.append(
            f"{name:<44}{_f(w['tokens_per_s']):>10}{w['step_s'] * 1e3:>10.0f}"
            f"{w['step_s_min'] * 1e3:>8.0f}..{w['step_s_max'] * 1e3:<6.0f}"
            f"{_f(m and 100 * m, '{:.1f}%'):>8}{_mib(w.get('peak_memory_bytes')):>12}"
            f"{_f(w.get('cpu_per_wall'), '{:.2f}'):>9}"
        )

    t = r.get("mlalm", {})
    row(f"mlalm MoE ({t.get('moe_dispatch')})", t, r.get("mfu"))
    if "dense" in r:
        row("mlalm dense (same active FFN)", r["dense"], r.get("dense_mfu"))
    ref = r.get("reference", {})
    if "reference" in r:
        ref_mfu = (
            ratio(fpt * ref["tokens_per_s"], r.get("peak_flops")) if fpt and "tokens_per_s" in ref else None
        )
        name = (
            (
                f"transformers ({ref.get('attn_implementation')}/{ref.get('experts_implementation')}/"
                f"{ref.get('adamw_impl')}, {ref.get('threads')}t)"
            )
            if "tokens_per_s" in ref
            else "transformers"
        )
        row(name, ref, ref_mfu)
    lines.append("")
    if r.get("speedup_vs_reference") is not None:
        lines.append(
            f"mlalm / transformers: {r['speedup_vs_reference']:.2f}x tokens/s, "
            f"{_f(r.get('memory_ratio_vs_reference'), '{:.2f}')}x peak memory"
        )
    if r.get("moe_overhead") is not None:
        lines.append(f"MoE overhead (MoE step / dense step, equal active FFN): {r['moe_overhead']:.2f}x")
    if t.get("xla_flops") and t.get("model_flops_per_step"):
        lines.append(
            f"XLA cost analysis: {t['xla_flops'] / 1e9:.1f} GFLOP/step vs model "
            f"{t['model_flops_per_step'] / 1e9:.1f} GFLOP/step "
            f"({t['xla_flops'] / t['model_flops_per_step']:.2f}x); compile {t.get('compile_s', 0):.1f}s"
        )
    if ref.get("torch_matmul_flops") and r.get("peak_flops"):
        lines.append(
            f"float32 {ref['torch_matmul_n']}^3 matmul: XLA {r['peak_flops'] / 1e9:.1f} GFLOP/s, "
            f"torch {ref['torch_matmul_flops'] / 1e9:.1f} GFLOP/s ({ref.get('threads')} threads)"
        )
    if t.get("params"):
        lines.append(
            f"parameters: {t['params'] / 1e6:.2f} M total, {t['active_params'] / 1e6:.2f} M active "
            f"per token; RSS after imports: mlalm {_mib(t.get('rss_after_import_bytes'))}, "
            f"transformers {_mib(ref.get('rss_after_import_bytes'))}"
        )
    if "reference_sweep" in r:
        lines.append(
            "reference implementations, attention/experts/AdamW (median of 2 steps each): "
            + ", ".join(
                f"{x['attn']}/{x['experts']}/{x['adamw']} {x['step_s'] * 1e3:.0f} ms"
                if "step_s" in x
                else f"{x['attn']}/{x['experts']}/{x['adamw']} failed"
                for x in r["reference_sweep"].get("rows", [])
            )
        )


def _decode(dec: dict, lines: list) -> None:
    lines.append("")
    if "runs" not in dec:
        lines.append(f"decode: skipped ({dec.get('skipped') or dec.get('error')})")
        return
    hdr = (
        f"{'decode (batch ' + str(dec['batch']) + ')':<22}{'context':>8}{'tokens/s':>10}"
        f"{'ms/step':>9}{'cache':>11}{'B/token':>9}"
    )
    lines += [hdr, "-" * len(hdr)]
    for x in dec["runs"]:
        lines.append(
            f"{x['mode']:<22}{x['context']:>8}{x['tokens_per_s']:>10,.0f}{x['ms_per_step']:>9.1f}"
            f"{_mib(x['cache_bytes']):>11}{x['bytes_per_token']:>9,.0f}"
        )


def _profile(p: dict, lines: list) -> None:
    if "parts" in p:
        lines += [
            "",
            f"profile of the mlalm step (median of {p['rounds']} round-robin calls each; "
            f"layer parts are forward + backward of one layer)",
        ]
        full = p["parts"].get("train_step", {}).get("step_s")
        core = next((x.get("step_s") for k, x in p["layer_parts"].items() if "attention core" in k), None)
        for group in ("parts", "layer_parts", "what_if", "variants"):
            for name, x in p[group].items():
                if "step_s" not in x:
                    lines.append(f"  {name:<58}{x.get('error')}")
                    continue
                share = (
                    f"{100 * x['step_s'] / full:6.1f}% of step"
                    if full and group != "variants"
                    else (f"{x['step_s'] / full:6.2f}x step" if full else "")
                )
                if group == "what_if" and core:
                    share = f"{x['step_s'] / core:6.2f}x core  "
                xf = f"  XLA {x['xla_flops'] / 1e9:6.1f} GFLOP" if x.get("xla_flops") else ""
                lines.append(
                    f"  {name:<58}{x['step_s'] * 1e3:9.1f} ms  {share}{xf}"
                    f"  cpu/wall {x.get('cpu_per_wall', 0):.2f}"
                )
    elif "error" in p:
        lines += ["", f"profile: {p['error']}"]
    ops = p.get("ops")
    if ops and "error" not in ops:
        tot = ops["ops_s_per_call"]
        lines += [
            "",
            f"per-op trace of the step (jax.profiler, {ops['calls']} steps): "
            f"{ops['n_ops']} ops, {tot * 1e3:.0f} ms of op time per step "
            f"(wall {ops['wall_s_per_call'] * 1e3:.0f} ms incl. profiler overhead)",
        ]
        for key, title in (
            ("by_phase", "phase"),
            ("by_kind", "kind"),
            ("by_part", "model part"),
            ("by_phase_kind", "phase / kind"),
        ):
            lines.append(
                f"  by {title}: "
                + "; ".join(
                    f"{k} {v * 1e3:.0f} ms ({100 * v / tot:.0f}%)"
                    for k, v in ops[key].items()
                    if v / tot >= 0.01
                )
            )
        lines.append("  top ops:")
        for x in ops["top_ops"][:15]:
            lines.append(
                f"    {x['s'] * 1e3:7.1f} ms  {x['kind']:<19} {x['phase'][:8]:<9} {x['part'][:30]:<31}"
                f"{x['shape'][:28]:<29} {x['op_name'][-50:]}"
            )
    elif ops:
        lines.append(f"per-op trace: {ops['error']}")


def format_table(r: dict) -> str:
    """The benchmark result (``scripts/bench.py --json``'s object) as a text table."""
    m = r["machine"]
    lines = [
        f"mlalm benchmark  {m['date']}  ({r['command']})",
        f"machine: {m['cpu_model']} x{m['cores']} cores, backend {m.get('backend')} "
        f"({m.get('device_kind')}), jax {m['jax_version']}, torch {m['torch_version']}, "
        f"transformers {m['transformers_version']}",
        f"load average (1/5/15 min): start {r.get('loadavg_start')}, end {r.get('loadavg_end')}",
        f"config {r['config']}: batch {r['batch_size']} x seq {r['seq_len']} = "
        f"{r['tokens_per_step']} tokens/step; {r['steps']} timed steps after {r['warmup']} warm-up",
        "",
    ]
    _training(r, lines)
    if "decode_details" in r:
        _decode(r["decode_details"], lines)
    if "profile" in r:
        _profile(r["profile"], lines)
    lines.append("")
    if "bench_wall_s" in r:
        lines.append(f"bench wall time {r['bench_wall_s']:.0f}s")
    return "\n".join(lines)
