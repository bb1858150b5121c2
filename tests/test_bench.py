"""scripts/bench.py and its workloads (mlalm.bench): the training-step workload on a tiny
model, the summary figures against hand computations, and the command end to end."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, subprocess_env, tiny
from mlalm.bench import report, train_step
from mlalm.bench.common import machine_info

# What the table and the JSON summary read from a training workload's result.
TRAIN_KEYS = {
    "tokens_per_s",
    "step_s",
    "step_s_min",
    "step_s_max",
    "step_times_s",
    "cpu_per_wall",
    "tokens_per_step",
    "compile_s",
    "flops_per_token",
    "macs_per_token",
    "model_flops_per_step",
    "params",
    "active_params",
    "moe_dispatch",
    "final_loss",
    "peak_memory_bytes",
    "peak_memory_source",
    "rss_after_import_bytes",
}


def tiny_flops_per_token(T):
    """6 x forward MACs per token of conftest.TINY, term by term (docs: mlalm/flops.py)."""
    D, N, Q, R, dn, dr, dv, V = 32, 2, 12, 16, 8, 4, 8, 40
    attn_proj = D * Q + Q * N * (dn + dr) + D * (R + dr) + R * N * (dn + dv) + N * dv * D
    attn_products = N * ((dn + dr) + dv) * T  # QK^T and PV against all T keys
    dense_ffn = 3 * D * 64  # layer 0 (first_k_dense_replace = 1)
    moe_ffn = D * 4 + (2 + 1) * 3 * D * 16  # router over 4 experts + top-2 + 1 shared
    head = D * V
    return 6 * (2 * (attn_proj + attn_products) + dense_ffn + moe_ffn + head)


@pytest.mark.slow  # compiling the train step takes 7-20 s on 2 cores
def test_train_step_workload_and_its_mfu():
    cfg = tiny()
    B, T = cfg.train.batch_size, cfg.train.seq_len
    r = train_step.measure(cfg, steps=2, warmup=1)
    assert TRAIN_KEYS <= set(r)
    assert len(r["step_times_s"]) == 2 and r["tokens_per_s"] > 0
    assert r["step_s"] == pytest.approx(statistics.median(r["step_times_s"]), abs=1e-5)
    assert r["tokens_per_step"] == B * T
    assert r["tokens_per_s"] == pytest.approx(B * T / r["step_s"], rel=1e-12)
    assert r["flops_per_token"] == tiny_flops_per_token(T)
    assert r["model_flops_per_step"] == tiny_flops_per_token(T) * B * T
    assert r["moe_dispatch"] == "dropless"  # TINY's explicit choice
    # a few AdamW steps from a random init: the loss is still about ln V
    assert math.isfinite(r["final_loss"]) and abs(r["final_loss"] - math.log(40)) < 0.5

    # the summary and the table, with a peak of 1 GFLOP/s
    peak = 1e9
    out = {
        "machine": machine_info(),
        "config": "tiny",
        "command": "bench",
        "steps": 2,
        "warmup": 1,
        "batch_size": B,
        "seq_len": T,
        "tokens_per_step": B * T,
    }
    report.combine(out, [{"peak_flops": peak}], {"mlalm": [r]})
    mfu = tiny_flops_per_token(T) * (B * T / r["step_s"]) / peak
    assert out["mfu"] == pytest.approx(mfu, rel=1e-9)
    assert out["tokens_per_s"] == r["tokens_per_s"] and out["flops_per_token"] == r["flops_per_token"]
    row = next(x for x in report.format_table(out).splitlines() if x.startswith("mlalm MoE (dropless)"))
    assert f"{r['tokens_per_s']:,.0f}" in row and f"{100 * mfu:.1f}%" in row


def test_combine_keeps_the_least_disturbed_measurements():
    peaks = [{"peak_flops": 5e9}, {"error": "worker 'peak' exited with 1"}, {"peak_flops": 8e9}]
    mk = lambda s, mem: {
        "step_s": s,
        "tokens_per_s": 100 / s,
        "flops_per_token": 1e6,  # noqa: E731
        "peak_memory_bytes": mem,
    }
    runs = {
        "mlalm": [mk(0.5, 10), mk(0.4, 12)],
        "dense": [mk(0.25, 8), {"error": "killed"}],
        "reference": [mk(0.8, 20)],
    }
    out = report.combine({}, peaks, runs)
    assert out["peak_flops"] == 8e9
    assert out["step_s"] == 0.4 and out["tokens_per_s"] == 250 and out["peak_memory_bytes"] == 12
    assert out["mfu"] == pytest.approx(1e6 * 250 / 8e9)
    assert out["dense_mfu"] == pytest.approx(1e6 * 400 / 8e9)
    assert out["moe_overhead"] == pytest.approx(0.4 / 0.25)
    assert out["speedup_vs_reference"] == pytest.approx(250 / 125)
    assert out["memory_ratio_vs_reference"] == pytest.approx(12 / 20)
    assert [x["step_s"] for x in out["mlalm_rounds"]] == [0.5, 0.4]
    assert [x["error"] for x in out["dense_rounds"]] == [None, "killed"]
    assert "reference_rounds" not in out  # one round only


@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path):
    """The command line as documented, on the tiny model: the peak, the training step and
    its figures in the JSON, and the table printed from that JSON."""
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))  # YAML reads JSON
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "bench.py"),
        "--json",
        "--config",
        str(config),
        "--skip-reference",
        "--skip-decode",
        "--skip-dense",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak-n",
        "64",
        "--peak-repeats",
        "2",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    for key in (
        "machine",
        "config",
        "peak",
        "peak_runs",
        "peak_flops",
        "mlalm",
        "tokens_per_s",
        "step_s",
        "flops_per_token",
        "mfu",
        "peak_memory_bytes",
        "loadavg_start",
        "loadavg_end",
        "bench_wall_s",
    ):
        assert key in r, key
    assert TRAIN_KEYS <= set(r["mlalm"])
    T, B = TINY["train"]["seq_len"], TINY["train"]["batch_size"]
    assert r["flops_per_token"] == tiny_flops_per_token(T)
    assert r["peak_flops"] == max(p["peak_flops"] for p in r["peak_runs"]) > 0
    assert r["mfu"] == pytest.approx(
        tiny_flops_per_token(T) * B * T / r["step_s"] / r["peak_flops"], rel=1e-9
    )
    assert "mlalm MoE (dropless)" in report.format_table(r)


def test_bench_rejects_a_bad_config(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "bench.py"),
            "--config",
            str(tmp_path / "missing.yaml"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"
