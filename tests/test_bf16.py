"""bfloat16 training as users run it (``model.dtype=bfloat16``, parameters float32): the
softmaxes, router scores and loss stay float32; the loss tracks a float32 run of the same
model on the same data; parameters and AdamW state stay float32 in the train state, in
the saved checkpoint and in a params export."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.extend import core as jex_core

from conftest import tiny

STEPS = 60
TAIL = 20
# mean |loss_bf16 - loss_f32| over the last TAIL steps, in nats.  Both runs see the same
# batches in the same order, so batch noise is common to both curves; what differs is
# bf16 rounding of the activations (2^-9 relative), which moved this tiny model's loss by
# 0.006, 0.024 and 0.009 nats (train.seed 0, 1, 2; CPU).  A run that diverges or learns
# at another rate differs by far more: over these 60 steps the loss falls by ~4 nats
# (ln 257 -> ~1.2), and the test requires the tolerance to be under 1/20 of that fall.
TOL = 0.06


def _eqns(jaxpr):
    """Every equation of ``jaxpr``, nested jaxprs (jit, scan, cond, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _eqns(sub)


def test_bf16_compute_keeps_softmax_router_and_loss_in_float32():
    """In the traced bf16 training loss and its gradient: matmuls run in bf16, while every
    exp (attention and loss softmax), the router's sigmoid and the loss are float32."""
    from mlalm.optim import build_optimizer
    from mlalm.train import init_state, lm_loss

    cfg = tiny(model={"dtype": "bfloat16"})
    tx, _ = build_optimizer(cfg, 10)
    graphdef, state = init_state(cfg, tx, seed=0)
    batch = jnp.zeros((2, cfg.train.seq_len + 1), jnp.int32)
    grad_fn = jax.value_and_grad(
        lambda p: lm_loss(graphdef, p, state.rest, batch, 0.0, cfg.train.loss_chunk), has_aux=True
    )
    closed = jax.make_jaxpr(grad_fn)(state.params)
    eqns = list(_eqns(closed.jaxpr))
    out_dtype = lambda e: e.outvars[0].aval.dtype
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)  # bf16 compute is on
    exps = [e for e in eqns if e.primitive.name == "exp"]
    assert exps and all(out_dtype(e) == jnp.float32 for e in exps), sorted({str(out_dtype(e)) for e in exps})
    E = cfg.moe.n_routed_experts
    sigmoids = [e for e in eqns if e.primitive.name == "logistic"]
    router = [e for e in sigmoids if e.outvars[0].aval.shape[-1:] == (E,)]
    assert router and all(out_dtype(e) == jnp.float32 for e in router)
    assert any(out_dtype(e) == jnp.bfloat16 for e in sigmoids)  # SwiGLU's silu: bf16
    (loss, (nll, _)), grads = jax.eval_shape(grad_fn, state.params)
    assert loss.dtype == nll.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def _floating_dtypes(tree) -> set:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _stored_dtypes(item_dir: str, top: str) -> set:
    """dtypes Orbax recorded for the floating arrays under ``top`` of a saved item."""
    meta = ocp.StandardCheckpointer().metadata(os.path.abspath(item_dir))
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    leaves = jax.tree.leaves(meta[top], is_leaf=lambda x: hasattr(x, "dtype"))
    dts = {str(np.dtype(x.dtype)) for x in leaves if hasattr(x, "dtype")}
    return {d for d in dts if np.issubdtype(np.dtype(d), np.floating)}


@pytest.mark.slow
def test_bf16_run_tracks_float32_and_stores_float32(tmp_path, corpus_file):
    from mlalm.inference import export_params, load_params
    from mlalm.train import train

    runs, losses = {}, {}
    for dt in ("float32", "bfloat16"):
        cfg = tiny(
            model={"vocab_size": None, "dtype": dt},
            data={"path": corpus_file, "cache_dir": str(tmp_path / "cache")},
            train={
                "steps": STEPS,
                "run_dir": str(tmp_path / "runs"),
                "name": dt,
                "log_every": 1,
                "eval_every": 10 * STEPS,
                "final_eval_batches": 2,
                "progress": False,
            },
            optim={"lr": 1e-2, "warmup_steps": 5},
            checkpoint={"every": 0, "async_save": False},
        )
        runs[dt] = train(cfg, log=lambda *_: None)
        with open(os.path.join(runs[dt].run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        losses[dt] = np.array([r["loss"] for r in rows if "loss" in r])
        assert len(losses[dt]) == STEPS and np.all(np.isfinite(losses[dt]))

    f32, bf16 = losses["float32"], losses["bfloat16"]
    fall = f32[:5].mean() - f32[-TAIL:].mean()
    assert fall > 2.0 and bf16[:5].mean() - bf16[-TAIL:].mean() > 2.0  # both learn
    assert TOL < fall / 20
    diff = np.abs(bf16 - f32)
    assert diff[-TAIL:].mean() <= TOL, diff[-TAIL:]
    assert diff.max() > 0  # the bf16 run did compute in bf16

    # the train state: float32 parameters and AdamW moments
    state = runs["bfloat16"].state
    assert _floating_dtypes(state.params) == {"float32"}
    assert _floating_dtypes(state.opt_state) == {"float32"}
    # ... holding float32 values, not bf16 values widened: most weights are not bf16-exact
    w = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
    widened = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.mean(widened != w) > 0.9

    # the saved checkpoint (as Orbax recorded it) and a params export
    run_dir = runs["bfloat16"].run_dir
    step_dir = os.path.join(run_dir, "checkpoints", str(STEPS), "state")
    assert _stored_dtypes(step_dir, "params") == {"float32"}
    assert _stored_dtypes(step_dir, "opt_state") == {"float32"}
    export = export_params(run_dir, str(tmp_path / "export"))
    assert _stored_dtypes(os.path.join(export, "params"), "params") == {"float32"}
    _, _, params, _, _ = load_params(export)
    got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
    }
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bit for bit
