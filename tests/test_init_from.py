"""train.init_from: start from another model's weights (an mlalm run, a params export, a
transformers directory), fresh optimizer at step 0, the source's model and tokenizer."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny
from mlalm.errors import ConfigError
from mlalm.inference import load_for_inference
from mlalm.train import init_from, train

pytestmark = pytest.mark.slow


def _cfg(tmp_path, name, corpus, **sections):
    base = {
        "model": {"vocab_size": None},
        "data": {"path": corpus, "cache_dir": str(tmp_path / "cache")},
        "train": {
            "steps": 6,
            "run_dir": str(tmp_path / "runs"),
            "name": name,
            "log_every": 1,
            "eval_every": 100,
            "progress": False,
        },
        "optim": {"lr": 1e-2},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return tiny(**base)


def _params(path):
    model, _, _ = load_for_inference(path)
    from mlalm.train.state import split_model

    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(split_model(model)[1])[0]
    }


def test_init_from_a_run_starts_at_its_weights_with_a_fresh_optimizer(tmp_path, corpus_file):
    src = train(_cfg(tmp_path, "src", corpus_file), log=lambda *_: None)
    # a second run from it: the model sections come from the source (here a different
    # d_model in the base config is replaced), step 0, and its first loss is the source's
    # loss on that batch, far below a fresh model's
    other = _cfg(tmp_path, "ft", corpus_file, model={"d_model": 48}, train={"init_from": src.run_dir})
    resolved = init_from.resolve(other)
    assert resolved.model.d_model == src.cfg.model.d_model
    result = train(other, log=lambda *_: None)
    rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    src_rows = [json.loads(line) for line in open(os.path.join(src.run_dir, "metrics.jsonl"))]
    assert rows[0]["step"] == 1 and rows[0]["loss"] < src_rows[0]["loss"] - 0.5
    # the optimizer is fresh: the learning rate starts from the warmup again
    assert rows[0]["lr"] == src_rows[0]["lr"]


def test_a_conflicting_model_override_is_one_line(tmp_path, corpus_file):
    src = train(_cfg(tmp_path, "src", corpus_file), log=lambda *_: None)
    other = _cfg(tmp_path, "ft", corpus_file, model={"d_model": 48}, train={"init_from": src.run_dir})
    with pytest.raises(ConfigError, match=r"model\.d_model=48 conflicts with train\.init_from") as e:
        init_from.resolve(other, {("model", "d_model")})
    assert "\n" not in str(e.value)
    init_from.resolve(other, {("model", "dtype")})  # a key that leaves the parameters alone is fine


def test_init_from_a_params_export_and_resume_after_a_stop_is_exact(tmp_path, corpus_file):
    src = train(_cfg(tmp_path, "src", corpus_file), log=lambda *_: None)
    out = tmp_path / "export"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "export.py"),
            src.run_dir,
            str(out),
            "--format",
            "params",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    cfg = _cfg(
        tmp_path, "ft", corpus_file, train={"init_from": str(out), "steps": 8}, checkpoint={"every": 4}
    )
    full = train(cfg, log=lambda *_: None)
    # back to checkpoint 4 of the same run: the resumed steps equal the first run's
    import dataclasses

    again = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, resume=os.path.join(full.run_dir, "checkpoints", "4"))
    )
    rows = [json.loads(line) for line in open(os.path.join(full.run_dir, "metrics.jsonl"))]
    train(again, log=lambda *_: None)
    again_rows = [json.loads(line) for line in open(os.path.join(full.run_dir, "metrics.jsonl"))]
    assert [(r["step"], r.get("loss")) for r in again_rows] == [(r["step"], r.get("loss")) for r in rows]


def test_init_from_a_llama_directory(tmp_path, corpus_file):
    """A transformers Llama checkpoint (GQA, no tokenizer.json: the byte tokenizer must fit
    its vocabulary) as the start: the run's model is the Llama model, and with a learning
    rate of 1e-12 its weights come out as they went in (to float32 rounding)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    src = tmp_path / "llama"
    transformers.LlamaForCausalLM(hf).save_pretrained(src, safe_serialization=True)
    cfg = _cfg(
        tmp_path,
        "ft",
        corpus_file,
        train={"init_from": str(src), "steps": 1},
        optim={"lr": 1e-12, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
    )
    result = train(cfg, log=lambda *_: None)
    assert result.cfg.attention.kind == "gqa" and result.cfg.model.vocab_size == 300
    from mlalm.llama import from_pretrained
    from mlalm.train.state import split_model

    want = split_model(from_pretrained(str(src))[0])[1]
    got = result.state.params
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_flatten_with_path(got)[0]
    ):
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )
