"""scripts/compare.py: interpolation, the fair learning-rate protocol, divergence reporting."""

import csv
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "scripts", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_tokens_to_reach_interpolates():
    curve = [(100, 1.0, 3.0), (200, 2.0, 2.0), (300, 3.0, 1.5)]
    assert compare.tokens_to_reach(curve, 2.5) == pytest.approx(150.0)
    assert compare.tokens_to_reach(curve, 1.75) == pytest.approx(250.0)
    assert compare.tokens_to_reach(curve, 3.5) == pytest.approx(100.0)
    assert compare.tokens_to_reach(curve, 1.0) is None


def test_curves_keep_one_kind_of_validation_measurement(monkeypatch):
    """A final whole-split loss is not a point of a curve scored on a prefix (before: the
    curves ended with it and the target was the reference's whole-split loss, biasing
    tokens-to-target)."""
    periodic = [{"step": s, "val_loss": 3.0 - s / 100, "val_tokens": 512} for s in (50, 100)]
    whole = {"step": 150, "final": True, "val_loss": 2.2, "val_tokens": 9000}
    prefix = {"step": 150, "final": True, "val_loss": 1.4, "val_tokens": 512}
    assert compare._same_measurement(periodic + [whole]) == periodic
    assert compare._same_measurement(periodic + [prefix]) == periodic + [prefix]
    # the default target is the reference cell's curve end, the curves' own measurement
    rows = [
        {
            "cell": "a",
            "seed": s,
            "status": "ok",
            "lr": None,
            "final_val_loss": 9.0,
            "final_val_ppl": 1.0,
            "tokens": 300,
            "tokens_per_s": 1.0,
            "flops_per_token": 1.0,
            "curve": [(100, 1.0, 3.0), (200, 2.0, 2.0 + s / 10)],
        }
        for s in (0, 1)
    ]
    monkeypatch.setattr(compare, "plot", lambda *a: None)  # no matplotlib figures here
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        compare.write_outputs(rows, ["cell"], out, None)
    assert rows[0]["target_loss"] == pytest.approx(2.05)


def test_grid_values_with_extra_overrides():
    grid = compare.parse_grid(["attention.kind=mha,gqa+attention.n_kv_heads=2"])
    assert grid == {"attention.kind": ["mha", "gqa+attention.n_kv_heads=2"]}
    assert compare._split_value("gqa+attention.n_kv_heads=2") == ("gqa", ["attention.n_kv_heads=2"])


@pytest.mark.slow
def test_sweep_keeps_best_lr_and_reports_divergence(tmp_path):
    text = "".join(f"line {i % 7}: to be or not to be, that is the question\n" for i in range(400))
    (tmp_path / "c.txt").write_text(text)
    out = tmp_path / "out"
    code = compare.main(
        [
            "--lr-sweep",
            "1e-2,1e30",
            "--seeds",
            "0,1",
            "--out",
            str(out),
            f"data.path={tmp_path / 'c.txt'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.d_model=32",
            "model.n_layers=1",
            "model.ffn_dim=64",
            "attention.n_heads=2",
            "attention.kv_lora_rank=16",
            "attention.qk_nope_head_dim=8",
            "attention.qk_rope_head_dim=4",
            "attention.v_head_dim=8",
            "train.steps=12",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.eval_every=4",
            "train.eval_batches=2",
            "train.final_eval_batches=4",
            "optim.warmup_steps=0",
            "optim.clip_norm=0",
            "optim.schedule=constant",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    by = {(r["seed"], r["lr"]): r for r in rows}
    assert set(by) == {("0", "1e-2"), ("0", "1e30"), ("1", "1e-2")}  # seed 1 only at the best lr
    assert by[("0", "1e30")]["status"] == "diverged"  # reported, not dropped
    assert by[("0", "1e-2")]["status"] == "ok" and by[("0", "1e-2")]["best_lr"] == "True"
    assert float(by[("1", "1e-2")]["final_val_loss"]) < 3.0  # it learned (ln 257 = 5.55)
    assert int(by[("0", "1e-2")]["peak_memory_bytes"]) > 10_000_000
    md = open(out / "results.md").read()
    assert "| 1e30 | — | diverged |" in md
    assert_tables_well_formed(md)
    assert (out / "loss_vs_tokens.png").stat().st_size > 1000


def test_eval_json_figures_become_columns(tmp_path):
    """A run directory with eval.py's eval_valid.json: its figures reach results.csv/md."""
    import json
    from dataclasses import replace

    from mlalm.config import Config, to_yaml

    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    (run / "config.yaml").write_text(to_yaml(replace(cfg, model=replace(cfg.model, vocab_size=257))))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 300, "val_loss": 1.5}) + "\n")
    (run / "summary.json").write_text(
        json.dumps({"val_loss": 1.5, "val_perplexity": 4.48, "tokens_per_s": 1000.0})
    )
    (run / "eval_valid.json").write_text(
        json.dumps(
            {
                "perplexity": 4.25,
                "bits_per_byte": 2.0625,
                "word_perplexity": 123.5,
                "kv_cache": {"measured_bytes_per_token": 1536.0},
            }
        )
    )
    row = {"seed": 0, "lr": None, "run": "run", **compare.read_run(str(run))}
    assert row["eval_valid_perplexity"] == 4.25 and row["eval_valid_bits_per_byte"] == 2.0625
    assert row["eval_valid_word_perplexity"] == 123.5 and row["kv_cache_measured_bytes_per_token"] == 1536.0
    assert "eval_test_perplexity" not in row
    out = tmp_path / "out"
    out.mkdir()
    compare.write_outputs([row], [], str(out), None)
    csv_row = next(csv.DictReader(open(out / "results.csv")))
    assert csv_row["eval_valid_perplexity"] == "4.25" and csv_row["eval_test_perplexity"] == ""
    assert csv_row["kv_cache_measured_bytes_per_token"] == "1536.0"
    md = open(out / "results.md").read()
    assert (
        "valid perplexity (eval) | valid bits/byte | valid word perplexity | KV bytes/token measured |" in md
    )
    assert "| 4.2500 | 2.0625 | 123.5000 | 1536.0000 | 0 |" in md
    assert_tables_well_formed(md)


def assert_tables_well_formed(md: str) -> None:
    """Each markdown table's header, separator and rows have the same number of columns
    (a separator one short renders the table as text)."""
    blocks, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    assert blocks
    for b in blocks:
        widths = {line.rstrip().count("|") for line in b}
        assert len(widths) == 1, b
