"""The train loop, optimizer pieces and the train.py command line."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, tiny
from mlalm.model import Transformer
from mlalm.optim import build_optimizer, make_schedule, param_labels
from mlalm.train import NonFiniteError, init_state, make_train_step, split_model, train


def _state(cfg, steps=10, seed=0):
    tx, schedule = build_optimizer(cfg, steps)
    graphdef, state = init_state(cfg, tx, seed=seed)
    return graphdef, tx, schedule, state


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(
        rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1)), jnp.int32
    )


def _named(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out[".".join(k for k in keys if k != "value")] = leaf
    return out


def test_param_labels():
    cfg = tiny()
    _, params, _ = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    labels = _named(param_labels(params))
    expected = {
        "embed_VD": "embedding",
        "head_DV": "head",
        "final_norm.scale": "norm",
        "blocks.0.attn.wq_a_DQ": "hidden",
        "blocks.0.attn.q_norm.scale": "norm",
        "blocks.0.attn.wq_b_QNH": "hidden",
        "blocks.0.attn.wkv_a_DJ": "hidden",
        "blocks.0.attn.kv_norm.scale": "norm",
        "blocks.0.attn.wkv_b_RNU": "hidden",
        "blocks.0.attn.wo_NGD": "hidden",
        "blocks.0.attn_norm.scale": "norm",
        "blocks.0.ffn_norm.scale": "norm",
        "blocks.0.ffn.w_gate_DF": "hidden",
        "blocks.0.ffn.w_up_DF": "hidden",
        "blocks.0.ffn.w_down_FD": "hidden",
        "blocks.1.ffn.w_router_DE": "router",
        "blocks.1.ffn.w_gate_EDF": "hidden",
        "blocks.1.ffn.w_up_EDF": "hidden",
        "blocks.1.ffn.w_down_EFD": "hidden",
        "blocks.1.ffn.shared.w_gate_DF": "hidden",
    }
    for name, label in expected.items():
        assert labels[name] == label, name
    assert not any("bias_E" in k for k in labels)  # the balancing bias is not a parameter


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules_follow_their_formula(kind):
    o = tiny(
        optim={"schedule": kind, "lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, "decay_fraction": 0.2}
    ).optim
    f = make_schedule(o, 100)
    assert float(f(0)) == pytest.approx(0.0) and float(f(5)) == pytest.approx(0.5)
    assert float(f(10)) == pytest.approx(1.0)
    if kind == "cosine":  # 0.1 + 0.9 * (1 + cos(pi * 45 / 90)) / 2 at step 55
        assert float(f(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
        assert float(f(100)) == pytest.approx(0.1, rel=1e-5)
    elif kind == "wsd":  # stable until 80, then linear to 0.1 at 100
        assert float(f(79)) == pytest.approx(1.0)
        assert float(f(90)) == pytest.approx(1.0 - 0.9 * 0.5, rel=1e-5)
        assert float(f(100)) == pytest.approx(0.1, rel=1e-5)
    else:
        assert float(f(99)) == pytest.approx(1.0)


@pytest.mark.slow
def test_weight_decay_mask():
    """With zero gradients AdamW only decays: hidden matrices shrink by lr*wd, the rest stay."""
    cfg = tiny(
        optim={"schedule": "constant", "warmup_steps": 0, "lr": 0.5, "weight_decay": 0.1, "clip_norm": 0.0}
    )
    _, params, _ = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx, _ = build_optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    labels = _named(param_labels(params))
    up, pv = _named(updates), _named(params)
    for name, label in labels.items():
        want = -0.5 * 0.1 * np.asarray(pv[name]) if label == "hidden" else 0.0
        np.testing.assert_allclose(np.asarray(up[name]), want, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_step_compiles_once_and_learns():
    cfg = tiny(optim={"lr": 1e-2})
    graphdef, tx, schedule, state = _state(cfg, steps=20)
    step = make_train_step(graphdef, tx, schedule, cfg)
    batch = _batch(cfg)
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert step._cache_size() == 1  # no recompilation after the first step
    assert losses[-1] < losses[0] - 0.5  # memorising one batch
    assert int(state.step) == 8


@pytest.mark.slow
def test_balancing_bias_moves_by_the_rule():
    cfg = tiny(moe={"bias_update_rate": 0.01})
    graphdef, tx, schedule, state = _state(cfg)
    before = np.asarray(_named(state.rest)["blocks.1.ffn.bias_E"])
    step = make_train_step(graphdef, tx, schedule, cfg)
    state, m = step(state, _batch(cfg))
    load = np.asarray(m["expert_load"])[0]
    assert load.sum() == cfg.train.batch_size * cfg.train.seq_len * cfg.moe.top_k
    after = np.asarray(_named(state.rest)["blocks.1.ffn.bias_E"])
    np.testing.assert_allclose(after, before + 0.01 * np.sign(load.mean() - load), atol=1e-7)


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch():
    cfg1 = tiny(moe={"bias_update_rate": 0.0})
    cfg2 = tiny(moe={"bias_update_rate": 0.0}, train={"grad_accum": 2})
    batch = _batch(cfg1)
    out = []
    for cfg in (cfg1, cfg2):
        graphdef, tx, schedule, state = _state(cfg)
        state, m = make_train_step(graphdef, tx, schedule, cfg)(state, batch)
        out.append((float(m["loss"]), float(m["grad_norm"]), _named(state.params)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-4)
    for k in out[0][2]:
        np.testing.assert_allclose(np.asarray(out[0][2][k]), np.asarray(out[1][2][k]), atol=1e-6)


@pytest.mark.slow
def test_nonfinite_update_is_not_applied():
    cfg = tiny()
    graphdef, tx, schedule, state = _state(cfg)
    emb = state.params["embed_VD"]
    emb.set_value(emb[...].at[3].set(jnp.nan))
    before = _named(jax.tree.map(np.asarray, state.params))
    batch = _batch(cfg).at[0, 0].set(3)
    state, m = make_train_step(graphdef, tx, schedule, cfg)(state, batch)
    assert not bool(m["finite"])
    after = _named(state.params)
    for k in before:
        np.testing.assert_array_equal(np.asarray(after[k]), before[k])


@pytest.mark.slow
def test_train_end_to_end(tmp_path, corpus_file):
    cfg = tiny(
        model={"vocab_size": None},
        data={"path": corpus_file, "cache_dir": str(tmp_path / "cache")},
        train={
            "steps": 40,
            "run_dir": str(tmp_path / "runs"),
            "name": "t",
            "log_every": 10,
            "eval_every": 20,
            "eval_batches": 4,
            "progress": False,
        },
        optim={"lr": 1e-2},
    )
    summary = train(cfg, log=lambda *_: None).summary
    run = tmp_path / "runs" / "t"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 10, 20, 30, 40]
    for r in rows:
        if "loss" in r:
            assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
            assert len(r["attn_max_logit"]) == cfg.model.n_layers
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[-1] == pytest.approx(summary["val_loss"])
    # the byte model starts near ln(257) and must learn this 10-word language
    first = rows[0]["loss"]
    assert abs(first - math.log(257)) < 0.5
    assert summary["val_loss"] < first - 2.0
    assert (run / "config.yaml").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))


@pytest.mark.slow
def test_nonfinite_stops_the_run_naming_the_step(tmp_path, corpus_file):
    cfg = tiny(
        model={"vocab_size": None},
        data={"path": corpus_file, "cache_dir": str(tmp_path / "cache")},
        train={"steps": 10, "run_dir": str(tmp_path / "runs"), "progress": False},
        optim={"lr": 1e30, "warmup_steps": 0, "clip_norm": 0.0, "schedule": "constant"},
    )
    with pytest.raises(NonFiniteError, match=r"at step \d+"):
        train(cfg, log=lambda *_: None)


def _cli(*args, cwd=None, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: ["data.path=" + str(d / "missing.txt")], "no such file or directory"),
        (lambda d: ["data.path=" + str(d / "empty.txt")], "contains no text"),
        (lambda d: ["data.path=" + str(d / "short.txt")], "fewer than one window"),
        (lambda d: ["data.path=" + str(d / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
        (lambda d: ["train.seq_len=4096"], "above model.max_seq_len"),
        (lambda d: ["data.tokenizer=wordpiece"], "data.tokenizer"),
        (lambda d: ["model.n_layer=3"], "did you mean 'n_layers'"),
        (lambda d: ["model.vocab_size=4000000000"], "model.vocab_size=4000000000 x model.d_model=256"),
        (lambda d: ["optim.lr=nan"], "optim.lr: expected a finite number"),
        (lambda d: ["optim.eps=0"], "optim.eps must be positive"),
        (lambda d: ["train.eval_batches=-1"], "train.eval_batches must be >= 0"),
        (lambda d: ["--config", str(d / "five.yaml")], "section 'train' must be a mapping"),
        (lambda d: ["--config", str(d / "typo.yaml")], "typo.yaml: unknown config key 'train.stepz'"),
        (lambda d: ["--config", str(d / "broken.yaml")], "line 3, column 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, make_args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "five.yaml").write_text("train: 5\n")  # before: ignored when an override named train
    (tmp_path / "typo.yaml").write_text("train:\n  stepz: 3\n")
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [1\n")
    runs = tmp_path / "runs"
    r = _cli(
        *make_args(tmp_path), f"train.run_dir={runs}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=5"
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not runs.exists() or not any(runs.iterdir())  # nothing half-written


def test_cli_help_lists_every_key():
    r = _cli("--help")
    assert r.returncode == 0
    from dataclasses import fields

    from mlalm.config import Config

    for section in fields(Config):
        for f in fields(getattr(Config(), section.name)):
            assert f"{section.name}.{f.name}" in r.stdout


@pytest.mark.slow
def test_cli_trains_on_non_utf8_bytes(tmp_path):
    data = bytes(range(256)) * 8 + "héllo wörld\n".encode("latin-1") * 20
    (tmp_path / "bin.txt").write_bytes(data)
    r = _cli(
        "data.path=" + str(tmp_path / "bin.txt"),
        "train.steps=2",
        "train.batch_size=2",
        "train.seq_len=32",
        "model.n_layers=1",
        "model.d_model=32",
        "moe.n_routed_experts=0",
        "attention.n_heads=2",
        f"train.run_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.name=bin",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "bin" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_one_train_step_under_x64_equals_x64_off():
    """A user's session with jax_enable_x64 on: the step runs, keeps every state leaf and
    metric in its x64-off dtype, and gives the same numbers (before: the Pallas kernels
    crashed on int32/int64 mixing, and Muon's state grew a float64 leaf)."""
    # Muon (its state once grew a float64 leaf) with its Adam side, QK-clip, accumulation
    cfg = tiny(optim={"name": "muon", "qk_clip_tau": 50.0}, train={"grad_accum": 2})
    batch = np.asarray(_batch(cfg))
    out = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            graphdef, tx, schedule, state = _state(cfg)
            state, m = make_train_step(graphdef, tx, schedule, cfg)(state, jnp.asarray(batch, jnp.int32))
            out.append(
                (
                    [(a.dtype, np.asarray(a)) for a in jax.tree.leaves(state)],
                    {k: (v.dtype, np.asarray(v)) for k, v in m.items()},
                )
            )
    (leaves32, m32), (leaves64, m64) = out
    assert len(leaves32) == len(leaves64)
    for (d32, a32), (d64, a64) in zip(leaves32, leaves64):
        assert d32 == d64
        np.testing.assert_allclose(a64, a32, rtol=1e-5, atol=1e-6)
    for k in m32:
        assert m32[k][0] == m64[k][0], k
        np.testing.assert_allclose(m64[k][1], m32[k][1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_an_update_that_would_write_nan_is_not_applied():
    """Loss and gradients finite, the update not (AdamW with eps=0 on a zero gradient did
    this to the embedding): the old state is kept and the step reports it (before: NaN
    parameters were checkpointed and every rerun loaded them again)."""
    import optax

    cfg = tiny()
    nan_update = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u: u * jnp.nan, updates), state),
    )
    graphdef, state = init_state(cfg, nan_update, seed=0)
    before = _named(jax.tree.map(np.asarray, state.params))
    _, schedule = build_optimizer(cfg, 10)
    state, m = make_train_step(graphdef, nan_update, schedule, cfg)(state, _batch(cfg))
    assert bool(m["finite"]) and not bool(m["applied"])
    after = _named(state.params)
    for k in before:
        np.testing.assert_array_equal(np.asarray(after[k]), before[k])
    assert int(state.step) == 1


@pytest.mark.slow
def test_skipping_stops_after_the_configured_consecutive_skips(tmp_path, corpus_file):
    """on_nonfinite=skip must not 'finish' with a NaN validation loss: after
    train.max_consecutive_skips skips in a row the run stops with an error, and writes
    no summary."""
    cfg = tiny(
        model={"vocab_size": None},
        data={"path": corpus_file, "cache_dir": str(tmp_path / "cache")},
        train={
            "steps": 20,
            "run_dir": str(tmp_path / "runs"),
            "name": "s",
            "progress": False,
            "on_nonfinite": "skip",
            "max_consecutive_skips": 3,
        },
        optim={"lr": 1e30, "warmup_steps": 0, "clip_norm": 0.0, "schedule": "constant"},
    )
    with pytest.raises(NonFiniteError, match="3 consecutive steps skipped"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "runs" / "s" / "summary.json").exists()
