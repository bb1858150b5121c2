"""The fused, chunked LM head + cross-entropy against a float64 reference, and the
flattened-row ``linear`` against einsum.  Errors are ``tests/numerics.err``: relative to
max(max|ref|, floor), the floor being the sum of |terms| of the same computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlalm.config import load_config
from mlalm.model.layers import linear
from mlalm.model.loss import _chunk_len, lm_head_cross_entropy
from numerics import assert_close, err, float64_ops, term_scale


def _reference(h, w, labels):
    """Mean NLL and its gradients in float64 numpy (log-softmax written out), and the
    error floors: mean(|lse| + |target logit|) for the loss (its two terms cancel when
    the model is confident), Σ|terms| of dh = d wᵀ and dw = hᵀ d."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    logits = h @ w
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    lab = np.asarray(labels)
    nll = lse - np.take_along_axis(logits, lab[..., None], -1)[..., 0]
    n = nll.size
    d = np.exp(logits - lse[..., None])
    np.put_along_axis(d, lab[..., None], np.take_along_axis(d, lab[..., None], -1) - 1.0, -1)
    d /= n
    floor = {
        "loss": float(np.mean(np.abs(lse) + np.abs(nll - lse))),
        "dh": term_scale("btv,dv->btd", d, w),
        "dw": term_scale("btd,btv->dv", h, d),
    }
    return nll.mean(), d @ w.T, np.einsum("btd,btv->dv", h, d), floor


def _inputs(B=3, T=12, D=16, V=37, seed=0):
    r = np.random.default_rng(seed)
    return (
        r.standard_normal((B, T, D)).astype(np.float32),
        (0.3 * r.standard_normal((D, V))).astype(np.float32),
        r.integers(0, V, (B, T)),
    )


@pytest.mark.parametrize("chunk_tokens", [1, 7, 12, 36, 10_000])
def test_value_and_gradients_match_float64(chunk_tokens):
    h, w, lab = _inputs()
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: lm_head_cross_entropy(h, w, jnp.asarray(lab), chunk_tokens=chunk_tokens), argnums=(0, 1)
    )(jnp.asarray(h), jnp.asarray(w))
    ref, ref_dh, ref_dw, floor = _reference(h, w, lab)
    assert_close(loss, ref, rtol=1e-6, scale=floor["loss"], what="loss")
    assert_close(dh, ref_dh, rtol=1e-5, scale=floor["dh"], what="dh")
    assert_close(dw, ref_dw, rtol=1e-5, scale=floor["dw"], what="dw")
    # the check can fail: a mean over one token too many (1/(n+1) for 1/n) is rejected
    n = lab.size
    assert err(ref_dh * n / (n + 1), ref_dh, floor["dh"]) > 1e-5
    assert err(ref_dw * n / (n + 1), ref_dw, floor["dw"]) > 1e-5


def test_undifferentiated_value_and_cotangent_scaling():
    h, w, lab = _inputs(seed=1)
    ref, ref_dh, _, floor = _reference(h, w, lab)
    f = jax.jit(lambda h, w: lm_head_cross_entropy(h, w, jnp.asarray(lab), chunk_tokens=6))
    assert_close(f(h, w), ref, rtol=1e-6, scale=floor["loss"], what="loss")
    # a loss scaled by 3 (cotangent 3) scales the gradient by 3
    dh = jax.grad(lambda h: 3.0 * f(h, w))(jnp.asarray(h))
    assert_close(dh, 3.0 * ref_dh, rtol=1e-5, scale=3.0 * floor["dh"], what="dh")


def test_bfloat16_inputs_close_to_float64():
    h, w, lab = _inputs(seed=2)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: lm_head_cross_entropy(h, w, jnp.asarray(lab), chunk_tokens=8), argnums=(0, 1)
    )(hb, wb)
    assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref, ref_dh, ref_dw, floor = _reference(np.asarray(hb, np.float32), np.asarray(wb, np.float32), lab)
    assert_close(loss, ref, rtol=1e-4, scale=floor["loss"], what="loss")
    assert_close(dh, ref_dh, rtol=2e-2, scale=floor["dh"], what="dh")
    assert_close(dw, ref_dw, rtol=2e-2, scale=floor["dw"], what="dw")


def test_float32_under_x64():
    """x64 on: float32 h, w and int64 labels give a float32 loss and gradients, no float64
    value anywhere (forward, backward, the chunk scan), the float64 reference's values and
    the x64-off values."""
    h, w, lab = _inputs(seed=3)
    ref, ref_dh, ref_dw, floor = _reference(h, w, lab)
    f = jax.value_and_grad(lambda h, w, lab: lm_head_cross_entropy(h, w, lab, chunk_tokens=8), argnums=(0, 1))
    off_loss, (off_dh, off_dw) = jax.jit(f)(jnp.asarray(h), jnp.asarray(w), jnp.asarray(lab, jnp.int32))
    with jax.enable_x64(True):
        args = (jnp.asarray(h), jnp.asarray(w), jnp.asarray(lab))
        assert args[2].dtype == jnp.int64 and args[0].dtype == jnp.float32
        assert float64_ops(f, *args) == []
        loss, (dh, dw) = jax.jit(f)(*args)
    assert loss.dtype == dh.dtype == dw.dtype == jnp.float32
    assert_close(loss, ref, rtol=1e-6, scale=floor["loss"], what="loss")
    assert_close(dh, ref_dh, rtol=1e-5, scale=floor["dh"], what="dh")
    assert_close(dw, ref_dw, rtol=1e-5, scale=floor["dw"], what="dw")
    for x, x_off, name in ((loss, off_loss, "loss"), (dh, off_dh, "dh"), (dw, off_dw, "dw")):
        assert_close(x, x_off, rtol=1e-6, scale=floor[name], what=f"{name}: x64 on vs off")


def test_chunk_len_divides_positions():
    assert _chunk_len(8, 256, 256) == 32
    assert _chunk_len(3, 12, 7) == 2  # 7 // 3 = 2 positions, a divisor of 12
    assert _chunk_len(4, 10, 1) == 1
    assert _chunk_len(2, 7, 1000) == 7


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_training_loss_and_grads_fused_equal_plain(tie):
    """lm_loss with the fused head (train.loss_chunk) equals the plain logits path."""
    from flax import nnx

    from mlalm.model import Transformer
    from mlalm.train import lm_loss, split_model

    cfg = load_config(
        None,
        [
            "model.vocab_size=61",
            "model.d_model=32",
            "model.n_layers=2",
            "model.ffn_dim=48",
            "attention.n_heads=2",
            "attention.kv_lora_rank=16",
            "attention.qk_nope_head_dim=8",
            "attention.qk_rope_head_dim=8",
            "attention.v_head_dim=8",
            f"model.tie_embeddings={tie}",
        ],
    )
    graphdef, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = jnp.asarray(np.random.default_rng(3).integers(0, 61, (4, 17)), jnp.int32)
    outs = [
        jax.value_and_grad(lambda p: lm_loss(graphdef, p, rest, batch, 0.0, chunk)[0])(params)
        for chunk in (0, 16)
    ]
    assert_close(outs[1][0], outs[0][0], rtol=1e-6, what="loss")
    # per leaf, relative: no parameter's gradient cancels to 0 here (a vanishing one
    # would read as an infinite error, never as a pass)
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(outs[0][1]), jax.tree_util.tree_leaves_with_path(outs[1][1])
    ):
        assert_close(b, a, rtol=1e-4, what=jax.tree_util.keystr(path))


@pytest.mark.parametrize("spec,n_in", [("btd,dnh->btnh", 1), ("btng,ngd->btd", 2), ("nd,df->nf", 1)])
def test_linear_equals_einsum(spec, n_in):
    r = np.random.default_rng(4)
    lhs, rhs = spec.split("->")[0].split(",")
    dims = dict(b=2, t=5, d=6, n=3, h=4, g=4, f=7)
    x = r.standard_normal([dims[c] for c in lhs]).astype(np.float32)
    w = r.standard_normal([dims[c] for c in rhs]).astype(np.float32)
    assert_close(
        linear(jnp.asarray(x), jnp.asarray(w), n_in),
        np.einsum(spec, x.astype(np.float64), w.astype(np.float64)),
        rtol=1e-5,
        scale=term_scale(spec, x, w),
        what=spec,
    )
