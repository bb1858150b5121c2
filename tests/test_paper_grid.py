"""scripts/paper_grid.py: the arithmetic of the paper's claims against hand computations, and
the whole pipeline (compare.py, the test-split evaluation, results.csv, claims.md) on a tiny
corpus with --quick."""

import csv
import importlib.util
import math
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "paper_grid.py")
spec = importlib.util.spec_from_file_location("paper_grid", SCRIPT)
assert spec is not None and spec.loader is not None
pg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pg)


def run(seed, tokens=1000, curve=(), **figures):
    return {"seed": seed, "status": "ok", "tokens": tokens, "curve": list(curve), **figures}


def cell(name, attention, ffn, optimizer, runs, *, kv, param_bytes):
    return {
        "cell": name,
        "attention": attention,
        "ffn": ffn,
        "optimizer": optimizer,
        "muon_variant": "quintic" if optimizer == "muon" else None,
        "kv_bytes_per_token": kv,
        "param_bytes": param_bytes,
        "runs": runs,
    }


def made_up_cells():
    """Three cells with round figures: the baseline, MLA + MoE with AdamW and with Muon."""
    base = cell(
        "mha_dense_adamw",
        "mha",
        "dense",
        "adamw",
        [
            run(0, val_ppl=120.0, test_ppl=100.0, decode_tokens_per_s=50.0, final_val_loss=5.0),
            run(1, val_ppl=130.0, test_ppl=110.0, decode_tokens_per_s=40.0, final_val_loss=5.2),
        ],
        kv=3072,
        param_bytes=5_000_000,
    )
    adamw = cell(
        "mla_moe_adamw",
        "mla",
        "moe",
        "adamw",
        [run(0, final_val_loss=4.0), run(1, final_val_loss=4.2), {"seed": 2, "status": "diverged"}],
        kv=960,
        param_bytes=7_000_000,
    )
    muon = cell(
        "mla_moe_muon",
        "mla",
        "moe",
        "muon",
        [
            # (tokens, seconds, validation loss)
            run(
                0,
                curve=[(250, 1, 4.5), (500, 2, 4.0), (750, 3, 3.9), (1000, 4, 3.8)],
                val_ppl=108.0,
                test_ppl=90.0,
                decode_tokens_per_s=100.0,
            ),
            run(
                1,
                curve=[(250, 1, 4.3), (500, 2, 4.2), (750, 3, 4.0), (1000, 4, 3.9)],
                val_ppl=130.0,
                test_ppl=104.5,
                decode_tokens_per_s=60.0,
            ),
            run(5, test_ppl=1.0, decode_tokens_per_s=1e9),  # no baseline run of seed 5: unpaired
        ],
        kv=960,
        param_bytes=7_000_000,
    )
    return {c["cell"]: c for c in (base, adamw, muon)}


def test_claims_against_hand_computation():
    claims = pg.summarise(made_up_cells(), context=4096, batch=8)

    # Muon's compute ratio.  Target: AdamW's mean final loss (4.0 + 4.2) / 2 = 4.1 (the
    # diverged seed left out).  Seed 0 crosses 4.1 between (250, 4.5) and (500, 4.0):
    # 250 + 250 * 0.4 / 0.5 = 450 tokens; seed 1 between (500, 4.2) and (750, 4.0):
    # 500 + 250 * 0.1 / 0.2 = 625; seed 5 has no curve: it never reaches the target.
    (comp,) = claims["compute"]
    assert (comp["muon"], comp["adamw"]) == ("mla_moe_muon", "mla_moe_adamw")
    assert comp["target"] == pytest.approx(4.1)
    assert comp["ratios"] == pytest.approx([0.45, 0.625])
    assert (comp["reached"], comp["seeds"]) == (2, 3)
    assert comp["mean"] is None  # not every seed reached it: no mean

    # Memory: KV 100 (1 - 960 / 3072) = 68.75%.  Parameters + KV cache at context 4096:
    # batch 1: base 5e6 + 3072 * 4096 = 17,582,912 B, new 7e6 + 960 * 4096 = 10,932,160 B,
    # 100 (1 - 10,932,160 / 17,582,912) = 37.8251%; batch 8: 5e6 + 3072 * 4096 * 8 =
    # 105,663,296 B and 7e6 + 960 * 4096 * 8 = 38,457,280 B, 63.6039%.
    m = claims["memory"]
    assert (m["kv_base"], m["kv_new"]) == (3072, 960)
    assert m["kv_reduction"] == pytest.approx(68.75)
    assert m["total"][1] == pytest.approx(37.8251, abs=1e-4)
    assert m["total"][8] == pytest.approx(63.6039, abs=1e-4)

    # Decode speed-up, paired by seed: 100 / 50 = 2.0 and 60 / 40 = 1.5; mean 1.75, sample
    # std |2.0 - 1.5| / sqrt(2) = 0.35355.
    assert claims["speed"]["values"] == pytest.approx([2.0, 1.5])
    assert claims["speed"]["mean"] == pytest.approx(1.75)
    assert claims["speed"]["std"] == pytest.approx(0.5 / math.sqrt(2))

    # Perplexity, 100 (1 - new / base) per seed: test 100 (1 - 90 / 100) = 10%,
    # 100 (1 - 104.5 / 110) = 5%: mean 7.5, std 5 / sqrt(2); validation 10% and 0%.
    test = claims["perplexity"]["test"]
    assert test["values"] == pytest.approx([10.0, 5.0])
    assert test["mean"] == pytest.approx(7.5) and test["std"] == pytest.approx(5 / math.sqrt(2))
    assert claims["perplexity"]["val"]["values"] == pytest.approx([10.0, 0.0], abs=1e-12)

    # every other cell against the baseline; the combined cell's entry is the claims' figures
    assert set(claims["versus_baseline"]) == {"mla_moe_adamw", "mla_moe_muon"}
    assert claims["versus_baseline"]["mla_moe_adamw"]["perplexity"] is None  # no perplexity measured


def test_compute_ratio_when_every_seed_reaches_the_target():
    cells = made_up_cells()
    cells["mla_moe_muon"]["runs"] = cells["mla_moe_muon"]["runs"][:2]
    (comp,) = pg.summarise(cells, context=4096, batch=8)["compute"]
    # mean (0.45 + 0.625) / 2 = 0.5375, std 0.175 / sqrt(2)
    assert comp["mean"] == pytest.approx(0.5375)
    assert comp["std"] == pytest.approx(0.175 / math.sqrt(2))


def test_claims_without_the_cells_they_need():
    cells = made_up_cells()
    only = {"mla_moe_muon": cells["mla_moe_muon"]}
    claims = pg.summarise(only, context=4096, batch=8)
    assert claims["compute"] == [] and claims["memory"] is None and claims["speed"] is None
    assert claims["perplexity"] is None


def test_unknown_cell_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--cells", "mha_dense_adamw,mla_sparse", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: --cells: unknown cell(s) mla_sparse; valid: mha_dense_adamw" in proc.stderr


def corpus(path, n_lines, rng):
    words = "the a king queen of france spain ruled over many lands and seas in old days when".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + " ." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        corpus(data / f"{split}.txt", n, rng)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--quick",
            "--data",
            str(data),
            "--out",
            str(out),
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["cell"] for r in rows] == ["mha_dense_adamw", "mla_moe_muon"]
    expected = {
        "cell",
        "attention",
        "ffn",
        "optimizer",
        "params_total",
        "params_active",
        "best_lr",
        "val_ppl_mean",
        "val_ppl_std",
        "val_bpb_mean",
        "test_ppl_mean",
        "test_ppl_std",
        "test_bpb_mean",
        "compute_ratio_mean",
        "peak_train_memory_bytes_mean",
        "kv_bytes_per_token",
        "inference_bytes_batch1",
        "inference_bytes_decode_batch",
        "decode_tokens_per_s_mean",
    }
    assert expected <= set(rows[0])
    base, new = rows
    assert (base["attention"], base["ffn"], base["optimizer"]) == ("mha", "dense", "adamw")
    assert (new["attention"], new["ffn"], new["optimizer"]) == ("mla", "moe", "muon")
    # --quick's MHA: 2 heads x 16, 2 layers, float32: 2 * 2 * 16 * 2 * 4 bytes per token;
    # MLA: (kv_lora_rank 16 + rope 4) * 2 layers * 4 bytes
    assert int(base["kv_bytes_per_token"]) == 512 and int(new["kv_bytes_per_token"]) == 160
    # MoE: the routed experts not chosen (8 - top 2) are not active
    assert int(new["params_active"]) < int(new["params_total"])
    assert int(base["params_active"]) == int(base["params_total"])
    for r in rows:
        assert 1 < float(r["test_ppl_mean"]) < 300  # the BPE has 300 entries; it learned a little
        assert float(r["decode_tokens_per_s_mean"]) > 0 and int(float(r["peak_train_memory_bytes_mean"])) > 0
        # parameters + KV cache of 64 tokens: batch 1 and the decode batch (2)
        kv = int(r["kv_bytes_per_token"])
        assert float(r["inference_bytes_decode_batch"]) - float(r["inference_bytes_batch1"]) == kv * 64
    claims = open(out / "claims.md").read()
    for title in (
        "Muon reaches AdamW's target loss with 48–52% of AdamW's training compute",
        "68% memory reduction",
        "3.2× inference speed-up",
        "perplexity 8–12% better",
    ):
        assert title in claims
    assert "KV cache 68.8% smaller (512 → 160 B/token)" in claims  # 100 (1 - 160 / 512) = 68.75
    for name in ("mha_dense_adamw", "mla_moe_muon"):
        run_dir = out / "cells" / name / "runs" / "seed=0"
        assert (run_dir / "eval_test.json").is_file()
    for png in ("loss_vs_tokens.png", "loss_vs_time.png", "perplexity_vs_kv.png"):
        assert (out / png).stat().st_size > 1000
