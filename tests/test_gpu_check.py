"""scripts/gpu_check.py: the dry run (every stage on CPU, tiny shapes, Pallas interpreter)
with Grain and tensorboardX unimportable, a failing and a timed-out stage recorded while
the next stage still runs, the float64 references of the kernels stage against the loop
references of tests/test_kernels.py, and the goals and checks the report derives."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, TEST_XLA_FLAGS

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
STAGES = ["kernels", "attention", "decode", "train_dense", "train_moe", "bf16_convergence"]

# Installed as sitecustomize (first on PYTHONPATH), so the script and every stage process
# it starts run with Grain and tensorboardX unimportable; each process notes its pid.
BLOCKER = """
import importlib.abc, os, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("grain", "tensorboardX"):
            raise ImportError(f"{name} is blocked (a bare GPU machine has no {name})")
        return None

sys.meta_path.insert(0, _Block())
with open(os.environ["BLOCKER_LOG"], "a") as f:
    f.write(f"{os.getpid()}\\n")
"""


def blocked_env(tmp_path):
    d = tmp_path / "block"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(BLOCKER)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        BLOCKER_LOG=str(tmp_path / "blocked.log"),
        PYTHONPATH=os.pathsep.join([str(d), ROOT]),
        XLA_FLAGS=TEST_XLA_FLAGS,
    )
    return env


def run_script(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        env=env or blocked_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )


@pytest.mark.slow
def test_dry_run_runs_every_stage_without_grain_or_tensorboardx(tmp_path):
    env = blocked_env(tmp_path)
    # the blocker is active: Grain cannot be imported under this environment
    probe = subprocess.run([sys.executable, "-c", "import grain"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "grain is blocked" in probe.stderr
    out = tmp_path / "dry"
    r = run_script(tmp_path, "--dry-run", "--out", str(out), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == STAGES
    for name, s in report["stages"].items():
        assert s["status"] == "ok", (name, s.get("error"))
        assert s["seconds"] > 0 and s["error"] is None
    # the runner and all nine stage processes ran with the blocker
    assert len((tmp_path / "blocked.log").read_text().split()) >= 1 + 9
    assert report["dry_run"] is True and report["ok"] is True
    assert report["device"]["backend"] == "cpu" and report["device"]["device_kind"]
    assert {"jax", "jaxlib", "flax", "python"} <= set(report["versions"])
    assert report["started"] and report["finished"]
    f = {name: s["figures"] for name, s in report["stages"].items()}
    # kernels: every case compared, interpret mode on CPU
    assert f["kernels"]["interpret"] is True and f["kernels"]["all_ok"] is True
    for row in f["kernels"]["flash"]:
        assert set(row["errors"]) == {"o", "max_logit", "dq", "dk", "dv", "reference_o"}
        assert max(row["errors"].values()) <= row["tol"]
    assert f["kernels"]["decode"] and f["kernels"]["decode"][0]["zero_length_gives_zeros"]
    # attention: ms and TFLOP/s per implementation; cuDNN refuses d_qk != d_v
    row = f["attention"]["rows"][0]
    for impl in ("pallas", "xla"):
        assert {"fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops"} <= set(row["impls"][impl])
    assert "d_v == d_qk" in row["impls"]["cudnn"]["unsupported"]
    assert f["attention"]["goal_speedup_fwd_bwd"] > 0
    # decode: GB/s of both paths; no data-sheet bandwidth for a CPU
    row = f["decode"]["rows"][0]
    assert row["impls"]["pallas"]["gbps"] > 0 and row["impls"]["xla"]["gbps"] > 0
    assert f["decode"]["hbm_gbps_datasheet"] is None and row["impls"]["pallas"]["frac_hbm"] is None
    # training: both attention implementations, MFU against the measured peak
    for stage in ("train_dense", "train_moe"):
        for impl in ("xla", "pallas"):
            x = f[stage][impl]
            for key in (
                "tokens_per_s",
                "mfu",
                "mfu_causal",
                "mfu_vs_matmul",
                "peak_flops",
                "peak_memory_bytes",
                "flops_per_token",
                "final_loss",
            ):
                assert x[key] is not None and x[key] > 0, (stage, impl, key)
            assert x["mfu_causal"] < x["mfu"]
            assert math.isclose(x["mfu"], x["flops_per_token"] * x["tokens_per_s"] / x["peak_flops"])
    assert f["train_moe"]["xla"]["active_params"] < f["train_moe"]["xla"]["params"]
    conv = f["bf16_convergence"]
    assert conv["agree"] is True and conv["mean_abs_diff_tail"] <= conv["tol_nats"]
    for dt in ("float32", "bfloat16"):
        assert conv[dt]["all_finite"] and conv[dt]["param_dtypes"] == ["float32"]
        assert conv[dt]["tail_mean_loss"] < conv[dt]["first_loss"] - 1.0
    # goals: a figure and a boolean each (the decode goal has no bandwidth to compare on CPU)
    g = report["goals"]
    assert set(g) == {
        "dense_mfu",
        "moe_mfu",
        "flash_speedup",
        "decode_hbm",
        "kernels_match_float64",
        "bf16_tracks_float32",
    }
    for name in ("dense_mfu", "moe_mfu", "flash_speedup"):
        assert isinstance(g[name]["met"], bool) and g[name]["value"] > 0
    assert g["decode_hbm"]["met"] is None
    assert g["kernels_match_float64"]["met"] is True and g["bf16_tracks_float32"]["met"] is True
    md = (out / "report.md").read_text()
    assert "Dry run" in md and "## Goals" in md
    for name in STAGES:
        assert f"### {name}: ok" in md


@pytest.mark.slow
def test_failing_and_timed_out_stages_are_recorded_and_the_next_stage_runs(tmp_path):
    out = tmp_path / "fail"
    r = run_script(
        tmp_path,
        "--dry-run",
        "--out",
        str(out),
        "--stages",
        "kernels,decode,bf16_convergence",
        "--fail-stage",
        "kernels",
        "--budget",
        "bf16_convergence=1",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    s = report["stages"]
    assert s["kernels"]["status"] == "failed"
    assert "injected failure (--fail-stage kernels)" in s["kernels"]["error"]
    assert s["decode"]["status"] == "ok" and s["decode"]["figures"]["rows"]
    assert s["bf16_convergence"]["status"] == "timeout"
    assert "time budget of 1 s" in s["bf16_convergence"]["error"]
    assert s["bf16_convergence"]["seconds"] < 30
    for name in ("attention", "train_dense", "train_moe"):
        assert s[name]["status"] == "skipped"
    assert report["ok"] is False
    assert report["goals"]["kernels_match_float64"]["met"] is None  # no figure, not a pass
    md = (out / "report.md").read_text()
    assert "### kernels: failed" in md and "injected failure" in md
    assert "### bf16_convergence: timeout" in md


def test_bad_arguments_exit_2(tmp_path):
    for args in (["--stages", "kernels,nope"], ["--budget", "decode=x"], ["--budget", "nope=3"]):
        r = run_script(tmp_path, "--out", str(tmp_path / "o"), *args)
        assert r.returncode == 2 and "error:" in r.stderr, args


@pytest.mark.slow
def test_stage_code_imports_neither_grain_nor_tensorboardx_and_runner_no_jax(tmp_path):
    """In one process with the blocker: the runner and the script import no JAX (the
    device stays free for the stage processes); every stage module and what its parts
    import load without Grain and tensorboardX; the decode stage's part runs in-process."""
    code = textwrap.dedent(f"""
        import importlib, json, runpy, sys
        sys.argv = ["gpu_check.py", "--help"]
        try:
            runpy.run_path({SCRIPT!r}, run_name="__main__")
        except SystemExit:
            pass
        from mlalm.bench.gpu import STAGES, runner
        assert "jax" not in sys.modules, "the runner imported jax"
        for name, (module, _) in STAGES.items():
            importlib.import_module(module).spec(True, name)
        assert "jax" not in sys.modules, "a stage's spec imported jax"
        import mlalm.bench.train_step, mlalm.bench.peak, mlalm.train, mlalm.optim
        import mlalm.kernels, mlalm.model.attention, mlalm.flops, mlalm.config
        from mlalm.bench.gpu import decode, worker
        rc = worker.main(["decode", "main", json.dumps(decode.spec(True, "decode")),
                          {str(tmp_path / "decode.json")!r}])
        assert rc == 0
        bad = [m for m in sys.modules if m.split(".")[0] in ("grain", "tensorboardX")]
        assert not bad, bad
        print("OK")
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], env=blocked_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    figures = json.loads((tmp_path / "decode.json").read_text())
    assert figures["rows"][0]["impls"]["pallas"]["gbps"] > 0


# ------------------------------------------------------------- the stages' own maths


def test_float64_references_equal_the_loop_references_of_test_kernels():
    """kernels.attention_f64 / decode_f64 (vectorised) against tests/test_kernels.py's
    per-head loops, written independently from the formulas: values and error floors."""
    from test_kernels import np_attention, np_mla_absorbed

    from mlalm.bench.gpu.kernels import attention_f64, decode_f64

    rng = np.random.default_rng(0)
    for B, T, S, N, K, H, G, causal in [
        (2, 7, 7, 4, 2, 6, 5, True),
        (1, 9, 4, 4, 1, 3, 3, True),
        (1, 5, 11, 6, 3, 4, 2, False),
        (1, 4, 9, 2, 2, 5, 3, True),
    ]:
        q, k, v = (rng.standard_normal(s) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, G)))
        do = rng.standard_normal((B, T, N, G))
        o, mx, grads, fl = attention_f64(q, k, v, do, causal=causal, scale=0.4)
        o_r, grads_r, mx_r, fl_r = np_attention(q, k, v, do, causal=causal, scale=0.4)
        np.testing.assert_allclose(o, o_r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(mx, mx_r, rtol=1e-12)
        for g, g_r in zip(grads, grads_r, strict=True):
            np.testing.assert_allclose(g, g_r, rtol=1e-10, atol=1e-12)
        for name in fl_r:
            assert fl[name] == pytest.approx(fl_r[name], rel=1e-12), name
    q_abs, q_pe = rng.standard_normal((3, 2, 8)), rng.standard_normal((3, 2, 4))
    c_kv, k_pe = rng.standard_normal((3, 10, 8)), rng.standard_normal((3, 10, 4))
    lengths = [0, 4, 10]
    o, floor = decode_f64(q_abs, q_pe, c_kv, k_pe, lengths, scale=0.3)
    o_r, o_abs = np_mla_absorbed(q_abs, q_pe, c_kv, k_pe, lengths, scale=0.3)
    np.testing.assert_allclose(o, o_r, rtol=1e-12, atol=1e-14)
    assert floor == pytest.approx(o_abs.max(), rel=1e-12) and np.all(o[0] == 0)


def test_error_metric_is_sound_where_the_reference_vanishes():
    from mlalm.bench.gpu.common import err

    assert err([1.0, 2.0], [1.0, 2.2]) == pytest.approx(0.2 / 2.2)
    assert err([1e-7, 0.0], [0.0, 0.0], floor=2.0) == pytest.approx(5e-8)  # floor, not 1/0
    assert err([0.0], [0.0]) == 0.0
    assert err([1e-30], [0.0]) == math.inf  # exact comparison without a floor
    assert err([math.nan], [1.0]) == math.inf


def test_flash_check_rejects_a_wrong_kernel(monkeypatch):
    """The kernels stage's comparison can fail: a kernel that ignores the causal mask
    (the plain-jnp reference with causal=False) exceeds the float32 tolerance."""
    import mlalm.kernels
    from mlalm.bench.gpu import kernels

    def wrong(q, k, v, *, causal, block_sizes=None, return_max_logit=False, **kw):
        return mlalm.kernels.attention_reference(q, k, v, causal=False, return_max_logit=return_max_logit)

    monkeypatch.setattr(mlalm.kernels, "flash_attention", wrong)
    r = kernels.flash_case((1, 17, 17, 2, 1, 8, 8, True, "float32"), 16)
    assert r["ok"] is False and r["errors"]["o"] > 1e-2


def test_attention_flop_formula():
    """H = G: fwd+bwd = 3.5 x fwd (FlashAttention-2's count); the causal mask halves both;
    fwd = 2·B·N·T·S·(H + G) counted from the two products' shapes."""
    from mlalm.bench.gpu.attention import flops

    B, N, T, H, G = 2, 3, 5, 8, 8
    fwd, both = flops(B, N, T, T, H, G, causal=False)
    assert fwd == 2 * (B * N * T * T * H) + 2 * (B * N * T * T * G)  # q kᵀ, then p v
    assert both == pytest.approx(3.5 * fwd)
    fwd_c, both_c = flops(B, N, T, T, H, G, causal=True)
    assert (fwd_c, both_c) == (fwd / 2, both / 2)
    _, both_mla = flops(1, 1, 4, 4, 192, 128, causal=False)
    assert both_mla == 2 * 16 * (4 * 192 + 3 * 128)  # q kᵀ twice, p v, dO vᵀ, pᵀ dO, dS k, dSᵀ q


def test_convergence_check_rejects_curves_that_part(monkeypatch, tmp_path):
    """The bf16_convergence stage fails when the curves differ by more than its tolerance
    over the last steps, even when both learn."""
    from mlalm.bench.gpu import convergence
    from mlalm.bench.gpu.common import Figures

    sp = convergence.spec(True, "bf16_convergence")
    base = np.linspace(math.log(64), 1.5, sp["steps"])

    def fake(raw, dtype, batches, seed):
        shift = 0.1 if dtype == "bfloat16" else 0.0  # 2x the 0.05-nat tolerance
        return {
            "losses": list(base + shift),
            "all_applied": True,
            "param_dtypes": ["float32"],
            "opt_state_dtypes": ["float32"],
        }

    monkeypatch.setattr(convergence, "train_curve", fake)
    out = Figures(str(tmp_path / "c.json"))
    with pytest.raises(RuntimeError, match=r"mean \|Δloss\|"):
        convergence.run("main", sp, out)
    assert out["agree"] is False and out["mean_abs_diff_tail"] == pytest.approx(0.1)


def test_markov_stream_has_the_stated_entropy_rate():
    """The synthetic data: each token has 4 successors with the stated probabilities, so
    the empirical conditional entropy approaches -Σ p ln p = 1.2799 nats."""
    from mlalm.bench.gpu.convergence import entropy_rate, markov_batches

    x = markov_batches(16, 20, 8, 64, seed=3).reshape(-1, 65)
    assert entropy_rate() == pytest.approx(1.27985, abs=1e-5)
    pairs = np.zeros((16, 16))
    np.add.at(pairs, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    assert np.all((pairs > 0).sum(1) == 4)
    p_next = pairs / pairs.sum(1, keepdims=True)  # empirical p(b | a)
    p_prev = pairs.sum(1) / pairs.sum()  # empirical p(a)
    terms = np.where(pairs > 0, -p_next * np.log(np.where(pairs > 0, p_next, 1.0)), 0.0)
    h = float(np.sum(p_prev * terms.sum(1)))  # H(next | previous)
    assert h == pytest.approx(entropy_rate(), abs=0.02)


def test_goals_are_booleans_with_their_figures():
    from mlalm.bench.gpu.report import summarise, write_markdown

    stages = {
        "train_dense": {"status": "ok", "figures": {"xla": {"mfu": 0.41}, "pallas": {"mfu": 0.47}}},
        "train_moe": {"status": "ok", "figures": {"xla": {"mfu": 0.29}, "pallas": {"mfu": None}}},
        "attention": {"status": "ok", "figures": {"goal_speedup_fwd_bwd": 1.49}},
        "decode": {"status": "timeout", "figures": {}},
        "kernels": {"status": "failed", "figures": {"all_ok": False}},
        "bf16_convergence": {"status": "pending"},
    }
    g = summarise({"stages": stages})
    assert (g["dense_mfu"]["value"], g["dense_mfu"]["met"]) == (0.47, True)
    assert "pallas" in g["dense_mfu"]["source"]
    assert (g["moe_mfu"]["value"], g["moe_mfu"]["met"]) == (0.29, False)
    assert g["flash_speedup"]["met"] is False and g["decode_hbm"]["met"] is None
    assert g["kernels_match_float64"]["met"] is False and g["bf16_tracks_float32"]["met"] is None
    md = write_markdown({"stages": stages, "goals": g, "budgets_s": {}, "dry_run": False})
    assert "47.0%" in md and "**not met**" in md and "no figure" in md
