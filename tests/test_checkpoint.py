"""Checkpoints: exact resume after SIGKILL, SIGTERM, damaged checkpoints, a full disk,
and export (transformers and params-only)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, STEPS, subprocess_env
from conftest import losses as _losses
from conftest import start_and_interrupt as _start_and_interrupt
from conftest import train_cmd as _cmd
from mlalm.checkpoint import Checkpointer
from mlalm.inference import load_for_inference


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(reference_run, tmp_path):
    rc, out = _start_and_interrupt(tmp_path, signal.SIGKILL)
    run = os.path.join(tmp_path, "r")
    assert rc == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run, "summary.json")), "the run ended before the kill"
    saved = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    assert saved and saved[-1] < STEPS
    again = subprocess.run(
        _cmd(tmp_path, "checkpoint.every=10"), env=subprocess_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    want, want_final = _losses(reference_run)
    got, got_final = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # rows after the checkpoint were replaced
    assert got == want  # bitwise: float equality of every step's loss
    assert got_final == want_final


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(reference_run, tmp_path):
    rc, out = _start_and_interrupt(tmp_path, signal.SIGTERM)
    run = os.path.join(tmp_path, "r")
    assert rc == 0, out[-2000:]
    assert "stopped by SIGTERM" in out
    assert not os.path.exists(os.path.join(run, "summary.json"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    last = max(json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl")))
    assert steps[-1] == last < STEPS  # the step it stopped at was saved
    again = subprocess.run(
        _cmd(tmp_path, "checkpoint.every=10"), env=subprocess_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert _losses(run) == _losses(reference_run)


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupted_checkpoint(reference_run, tmp_path):
    rc, _ = _start_and_interrupt(tmp_path, signal.SIGKILL, after=20)
    run = os.path.join(tmp_path, "r")
    assert not os.path.exists(os.path.join(run, "summary.json")), "the run ended before the kill"
    steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    assert steps[-2:] == [10, 20]
    newest = os.path.join(run, "checkpoints", str(steps[-1]))
    victim = max(
        (os.path.join(r, f) for r, _, fs in os.walk(os.path.join(newest, "state")) for f in fs),
        key=os.path.getsize,
    )
    with open(victim, "r+b") as f:  # flip bytes in the middle, same size
        f.seek(os.path.getsize(victim) // 2)
        f.write(b"\xff\x00\xff\x00")
    again = subprocess.run(
        _cmd(tmp_path, "checkpoint.every=10"), env=subprocess_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "damaged" in again.stdout and "checksum" in again.stdout
    assert f"resuming from {os.path.join(run, 'checkpoints')}/{steps[-2]}" in again.stdout
    assert os.listdir(os.path.join(run, "damaged_checkpoints"))  # set aside, not deleted
    assert _losses(run) == _losses(reference_run)


# -- the Checkpointer on its own ----------------------------------------------------------


def _state(seed):
    r = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(r.normal(size=(64, 32)), jnp.float32)},
        "step": jnp.asarray(seed, jnp.int32),
    }


def _iterator():
    import grain

    return iter(grain.MapDataset.range(100).shuffle(seed=0).to_iter_dataset())


def _save_steps(directory, steps, **kw):
    ck = Checkpointer(directory, keep=5, **kw)
    it = _iterator()
    for s in steps:
        for _ in range(3):
            next(it)
        ck.save(s, _state(s), it, {"config": {}})
    ck.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_restore_falls_back_with_a_warning(tmp_path, damage):
    d = str(tmp_path / "checkpoints")
    _save_steps(d, [1, 2])
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "2", "state")) for f in fs]
    victim = max(files, key=os.path.getsize)
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif damage == "flip":
        with open(victim, "r+b") as f:
            f.seek(10)
            f.write(b"\x00\x01\x02\x03")
    else:
        os.remove(victim)
    warnings = []
    ck = Checkpointer(d, log=warnings.append)
    it = _iterator()
    state, meta = ck.restore(jax.eval_shape(lambda: _state(0)), it)
    assert meta["step"] == 1 and int(state["step"]) == 1
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1)["params"]["w"]))
    assert next(it) == next(_skip(_iterator(), 3))  # the data position came back too
    assert len(warnings) == 1 and "damaged" in warnings[0] and os.path.join(d, "2") in warnings[0]
    assert {"truncate": "truncated", "flip": "checksum", "delete": "missing"}[damage] in warnings[0]
    assert ck.steps() == [1]
    assert len(os.listdir(tmp_path / "damaged_checkpoints")) == 1


def _skip(it, n):
    for _ in range(n):
        next(it)
    return it


@pytest.mark.parametrize(
    "damage",
    [
        "no manifest",
        "manifest of the wrong shape",
        "manifest not json",
        "no metadata",
        "truncated metadata",
        "empty directory",
    ],
)
def test_restore_treats_damaged_records_as_damage(tmp_path, damage):
    """Damage to the newest checkpoint's bookkeeping falls back like damage to its arrays
    (a flipped byte in a checkpoint without a manifest was loaded into a NaN run before)."""
    d = str(tmp_path / "checkpoints")
    _save_steps(d, [1, 2])
    step2 = os.path.join(d, "2")
    manifest, meta_file = os.path.join(step2, "manifest.json"), os.path.join(step2, "meta", "metadata")
    if damage == "no manifest":
        os.remove(manifest)
    elif damage == "manifest of the wrong shape":
        with open(manifest, "w") as f:
            json.dump({"files": [1, 2, 3]}, f)
    elif damage == "manifest not json":
        with open(manifest, "w") as f:
            f.write('{"files": {')
    elif damage == "no metadata":
        os.remove(meta_file)
    elif damage == "truncated metadata":
        with open(meta_file, "r+b") as f:
            f.truncate(5)
    else:
        for entry in os.listdir(step2):
            p = os.path.join(step2, entry)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    warnings = []
    state, meta = Checkpointer(d, log=warnings.append).restore(jax.eval_shape(lambda: _state(0)), _iterator())
    assert meta["step"] == 1 and int(state["step"]) == 1
    assert len(warnings) == 1 and "damaged" in warnings[0], warnings
    assert len(os.listdir(tmp_path / "damaged_checkpoints")) == 1  # set aside, not deleted


def test_keeps_newest_and_best(tmp_path):
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, keep=2, keep_best=True, async_save=False)
    it = _iterator()
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        ck.save(step, _state(step), it, {}, val_loss=loss)
    ck.close()
    assert ck.steps() == [2, 4, 5]  # newest two + the best (lowest validation loss)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import jax.numpy as jnp, numpy as np, grain
    from mlalm.checkpoint import Checkpointer
    from mlalm.errors import CheckpointError
    d = sys.argv[1]
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ck = Checkpointer(d, async_save=sys.argv[2] == "async")
    ck.save(1, {"w": jnp.zeros((8,))}, it, {"config": {}})
    ck.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        big = jnp.asarray(np.random.default_rng(0).normal(size=(1_000_000,)), jnp.float32)
        ck.save(2, {"w": big}, it, {"config": {}})
        ck.wait()
    except CheckpointError as e:
        print("ERROR:", e)
    """)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_failed_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, mode):
    d = str(tmp_path / "checkpoints")
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, d, mode],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("ERROR:")]
    assert line, out.stdout[-1000:] + out.stderr[-3000:]
    assert "saving checkpoint 2" in line[0] and "earlier checkpoints [1] are intact" in line[0]
    warnings = []
    state, meta = Checkpointer(d, log=warnings.append).restore(
        {"w": jax.ShapeDtypeStruct((8,), jnp.float32)},
        iter(__import__("grain").MapDataset.range(10).to_iter_dataset()),
    )
    assert meta["step"] == 1 and not warnings


# -- command-line errors -------------------------------------------------------------------


def test_resume_from_a_missing_path_exits_2(tmp_path):
    out = subprocess.run(
        _cmd(tmp_path, f"train.resume={tmp_path}/nothing"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == f"error: train.resume={tmp_path}/nothing: no such checkpoint or run directory"
    )
    assert not os.path.exists(os.path.join(tmp_path, "r"))


@pytest.mark.slow
def test_resume_with_another_model_exits_2_and_keeps_the_checkpoint(reference_run, tmp_path):
    out = subprocess.run(
        _cmd(tmp_path, f"train.resume={reference_run}", "model.d_model=64"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "model.d_model=48, this config has 64" in out.stderr
    assert not os.path.exists(os.path.join(reference_run, "..", "damaged_checkpoints"))


# -- export ------------------------------------------------------------------------------


def _export(src, out, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export.py"), src, out, *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )


def _tokens(vocab, B=2, T=24, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T)).astype(np.int32)


@pytest.mark.slow
def test_export_hf_logits_match_transformers(reference_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = _export(reference_run, str(tmp_path / "hf"), "--format", "hf")
    assert out.returncode == 0, out.stderr
    model, cfg, _ = load_for_inference(reference_run)
    tokens = _tokens(cfg.model.vocab_size)
    ours = np.asarray(model(jnp.asarray(tokens)))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(tmp_path / "hf"), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.max(np.abs(ours - theirs)) <= 1e-4


@pytest.mark.slow
def test_export_params_roundtrip_and_dtype(reference_run, tmp_path):
    model, cfg, tok = load_for_inference(reference_run)
    tokens = jnp.asarray(_tokens(cfg.model.vocab_size))
    want = np.asarray(model(tokens))
    assert _export(reference_run, str(tmp_path / "p32"), "--format", "params").returncode == 0
    m32, cfg32, _ = load_for_inference(str(tmp_path / "p32"))
    np.testing.assert_array_equal(np.asarray(m32(tokens)), want)  # float32: identical
    assert (
        _export(reference_run, str(tmp_path / "p16"), "--format", "params", "--dtype", "bfloat16").returncode
        == 0
    )
    m16, _, _ = load_for_inference(str(tmp_path / "p16"))
    assert all(
        x.dtype == jnp.bfloat16
        for x in jax.tree.leaves(__import__("flax").nnx.state(m16, __import__("flax").nnx.Param))
    )
    size32 = sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "p32" / "params") for f in fs
    )
    size16 = sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "p16" / "params") for f in fs
    )
    assert size16 < 0.75 * size32
    got = np.asarray(m16(tokens))
    assert np.max(np.abs(got - want)) < 0.1 * np.max(np.abs(want))  # bf16 rounding only
    # the optimizer state is not in a params export
    train_size = sum(
        os.path.getsize(os.path.join(r, f))
        for r, _, fs in os.walk(os.path.join(reference_run, "checkpoints", str(STEPS), "state"))
        for f in fs
    )
    assert size32 < 0.5 * train_size


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--format", "hf"], "does not exist"),
        (["--format", "params"], "does not exist"),
    ],
)
def test_export_bad_input_exits_2(tmp_path, args, msg):
    out = _export(str(tmp_path / "missing"), str(tmp_path / "out"), *args)
    assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_export_refuses_a_non_empty_output(reference_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    out = _export(reference_run, str(tmp_path / "out"), "--format", "params")
    assert out.returncode == 2 and "not empty" in out.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
