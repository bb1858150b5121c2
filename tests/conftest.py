"""Shared test fixtures: tiny configs that build and train in a second, and train.py
runs in a subprocess."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from mlalm.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session, shared by the train.py
# subprocesses (they inherit the variable): the tiny models' steps compile once, not once
# per test.  Results are those of the same executables, so bitwise checks are unaffected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="mlalm-test-xla-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The tests' models are tiny: compiling them costs far more than running them, so XLA's
# CPU backend compiles without LLVM's optimisation passes (measured: 40% less CPU for two
# train-step tests; 22.5 -> 18.2 CPU minutes for the suite).  XLA's own graph passes still
# run and neither level allows fast-math; the tests compare with independent references
# within tolerances, and the bitwise tests compare runs made under the same flag.
# train.py subprocesses and the worker processes inherit it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

# An MLA + MoE model small enough for a CPU test: two layers (the first dense), q LoRA.
TINY = {
    "model": {"vocab_size": 40, "d_model": 32, "n_layers": 2, "ffn_dim": 64, "max_seq_len": 64},
    "attention": {
        "kind": "mla",
        "n_heads": 2,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        "q_lora_rank": 12,
    },
    "moe": {
        "n_routed_experts": 4,
        "top_k": 2,
        "expert_ffn_dim": 16,
        "first_k_dense_replace": 1,
        "dispatch": "dropless",
    },
    "train": {"batch_size": 4, "seq_len": 16, "steps": 10},
    "optim": {"warmup_steps": 2},
}

# The same family as command-line overrides (the subprocess tests of train.py).
TINY_ARGS = [
    "model.d_model=48",
    "model.n_layers=2",
    "model.ffn_dim=96",
    "model.max_seq_len=64",
    "attention.n_heads=2",
    "attention.kv_lora_rank=16",
    "attention.qk_nope_head_dim=8",
    "attention.qk_rope_head_dim=8",
    "attention.v_head_dim=8",
    "moe.n_routed_experts=4",
    "moe.expert_ffn_dim=16",
    "moe.first_k_dense_replace=1",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=5",
    "train.eval_batches=2",
    "train.final_eval_batches=4",
    "train.progress=false",
    "optim.warmup_steps=5",
]


def tiny(**sections):
    """``TINY`` with sections updated key by key, e.g. ``tiny(train={"steps": 3})``."""
    raw = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return from_dict(raw)


def random_model(cfg, *, seed: int = 0, scale: float = 0.1, norm_spread: float = 0.3):
    """A Transformer for ``cfg`` whose parameters numpy draws (no initialiser is compiled):
    weights N(0, scale), norm scales 1 + N(0, norm_spread), so that every norm differs and a
    norm applied to the wrong input shows."""
    import jax.numpy as jnp
    from flax import nnx

    from mlalm.model import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            if path[-1] == "scale":
                v = 1.0 + norm_spread * rng.standard_normal(var.shape)
            else:
                v = scale * rng.standard_normal(var.shape)
            var.set_value(jnp.asarray(v, var.dtype))
    return model


def subprocess_env(**extra):
    """The environment of a train.py/eval.py subprocess: CPU, unbuffered, one device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=TEST_XLA_FLAGS, **extra)
    return env


@pytest.fixture
def corpus_file(tmp_path):
    """A small text file in a 10-word language (400 lines)."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away"]
    text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


# -- train.py in a subprocess: the reference run every interrupted one must reproduce ----

STEPS = 40


def train_cmd(run_dir, *extra):
    """``python train.py`` on the tiny model and the built-in corpus, run ``RUN_DIR/r``."""
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *TINY_ARGS,
        f"train.steps={STEPS}",
        f"train.run_dir={run_dir}",
        "train.name=r",
        *extra,
    ]


def losses(run):
    """({step: training loss}, [final validation losses]) from a run's metrics.jsonl."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    final = [r["val_loss"] for r in rows if r.get("final")]
    return per_step, final


def start_and_interrupt(run_dir, sig, *extra, after=10):
    """Start a run; once checkpoint ``after`` is complete, send ``sig``.  Returns (rc, output)."""
    proc = subprocess.Popen(
        train_cmd(run_dir, "checkpoint.every=10", *extra),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marker = os.path.join(run_dir, "r", "checkpoints", str(after))
    deadline = time.time() + 300
    while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The uninterrupted run (checkpoints every 10 steps) interrupted ones must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    out = subprocess.run(
        train_cmd(d, "checkpoint.every=10"), env=subprocess_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return os.path.join(d, "r")


# The longest test files first: the xdist workers take one file at a time (--dist
# loadfile), so a long file started last would run alone while the other workers idle.
LONG_FILES = (
    "test_trainer.py",
    "test_sharding.py",
    "test_resume.py",
    "test_checkpoint.py",
    "test_model.py",
    "test_kernels.py",
    "test_gguf.py",
    "test_gpu_check.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable
