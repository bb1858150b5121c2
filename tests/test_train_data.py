"""The trainer on prepared data: a prepared directory trains exactly like the raw text it
came from, a pretrained tokenizer.json goes end to end (train, eval, generate, export),
and mixtures are logged per source and resume bit for bit."""

import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import tiny
from mlalm.data.prepare import prepare
from mlalm.train import train

pytestmark = pytest.mark.slow


def _docs(tmp_path, n=40, seed=0, name="docs"):
    """A directory of small text files in a 10-word language."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away"]
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(12)))
    return d


def _cfg(tmp_path, name, **data):
    return tiny(
        model={"vocab_size": None},
        data={"cache_dir": str(tmp_path / "cache"), **data},
        train={
            "steps": 12,
            "run_dir": str(tmp_path / "runs"),
            "name": name,
            "log_every": 1,
            "eval_every": 6,
            "eval_batches": 2,
            "progress": False,
        },
        optim={"lr": 1e-2},
    )


def _rows(tmp_path, name):
    with open(tmp_path / "runs" / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _losses(rows):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_a_prepared_directory_trains_exactly_like_its_raw_text(tmp_path):
    docs = _docs(tmp_path)
    prepare([docs], tmp_path / "prepared", val_fraction=0.1)
    raw = train(_cfg(tmp_path, "raw", path=str(docs)), log=lambda *_: None).summary
    prepared = train(_cfg(tmp_path, "prepared", path=str(tmp_path / "prepared")), log=lambda *_: None).summary
    assert _losses(_rows(tmp_path, "raw")) == _losses(_rows(tmp_path, "prepared"))
    assert (
        raw["val_loss"] == prepared["val_loss"] and raw["val_bits_per_byte"] == prepared["val_bits_per_byte"]
    )


def _pretrained_tokenizer(path, texts):
    """A BPE tokenizer.json with '</s>' as its end-of-text token (no '<|endoftext|>')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return os.path.join(path, "tokenizer.json"), tok.token_to_id("</s>"), tok.get_vocab_size()


def test_a_pretrained_tokenizer_end_to_end(tmp_path):
    """Train with data.tokenizer=PATH/tokenizer.json (eos found by name: '</s>'), then
    eval.py, generation and the HF export all use that tokenizer from the run directory."""
    import contextlib
    import io

    from mlalm.cli import eval_main
    from mlalm.generate import generate_text
    from mlalm.inference import load_for_inference

    docs = _docs(tmp_path)
    texts = [p.read_text() for p in sorted(docs.iterdir())]
    path, eos_id, vocab = _pretrained_tokenizer(str(tmp_path / "tok"), texts)
    result = train(_cfg(tmp_path, "pre", path=str(docs), tokenizer=path), log=lambda *_: None)
    assert result.cfg.model.vocab_size == vocab  # the tokenizer's vocabulary sets the model's
    run = str(tmp_path / "runs" / "pre")
    os.remove(path)  # the run directory keeps its own copy
    model, cfg, tok = load_for_inference(run)
    assert tok.eos_id == eos_id and tok.vocab_size == vocab
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert eval_main([run, "--json", "--no-decode"]) == 0
    report = json.loads(out.getvalue())
    assert report["loss"] == pytest.approx(result.summary["val_loss"], rel=1e-6)
    (text,) = generate_text(model, tok, ["the cat"], 5)
    assert isinstance(text, str)
    from mlalm.hf import save_pretrained

    hf = str(tmp_path / "hf")
    save_pretrained(model, cfg, hf, eos_token_id=tok.eos_id)
    tok.save(hf)
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == eos_id
    with open(os.path.join(hf, "tokenizer_config.json")) as f:
        assert json.load(f)["eos_token"] == "</s>"


def test_a_mixture_logs_tokens_per_source_and_resumes_bit_for_bit(tmp_path):
    a, b = _docs(tmp_path, seed=1, name="a"), _docs(tmp_path, seed=2, name="b")
    prepare([a], tmp_path / "pa", val_fraction=0.1)
    prepare([b], tmp_path / "pb", val_fraction=0.1)
    mix = [{"path": str(tmp_path / "pa"), "weight": 3}, {"path": str(tmp_path / "pb"), "weight": 1}]
    full = _cfg(tmp_path, "full", mix=mix)
    full = dataclasses.replace(full, checkpoint=dataclasses.replace(full.checkpoint, every=6))
    train(full, log=lambda *_: None)
    rows = _rows(tmp_path, "full")
    last = [r for r in rows if "tokens_by_source" in r][-1]
    counts = last["tokens_by_source"]
    tokens = full.train.steps * full.train.batch_size * full.train.seq_len
    assert sum(counts.values()) == tokens
    assert counts[str(tmp_path / "pa")] == pytest.approx(0.75 * tokens, rel=0.15)
    # back to checkpoint 6 of the same run: steps 7-12 again, equal bit for bit, and the
    # per-source counts carried on from the checkpoint
    again = dataclasses.replace(
        full,
        train=dataclasses.replace(full.train, resume=str(tmp_path / "runs" / "full" / "checkpoints" / "6")),
    )
    train(again, log=lambda *_: None)
    resumed = _rows(tmp_path, "full")
    assert [(r["step"], r.get("loss")) for r in resumed if "loss" in r] == [
        (r["step"], r.get("loss")) for r in rows if "loss" in r
    ]
    assert [r for r in resumed if "tokens_by_source" in r][-1]["tokens_by_source"] == counts
