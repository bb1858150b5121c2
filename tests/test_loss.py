"""The fused, chunked LM head + cross-entropy against a float64 reference, and the
flattened-row ``linear`` against einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlalm.config import load_config
from mlalm.model.layers import linear
from mlalm.model.loss import _chunk_len, lm_head_cross_entropy


def _reference(h, w, labels):
    """Mean NLL and its gradients in float64 numpy (log-softmax written out)."""
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
    return nll.mean(), d @ w.T, np.einsum("btd,btv->dv", h, d)


def _inputs(B=3, T=12, D=16, V=37, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((B, T, D)).astype(np.float32),
            (0.3 * r.standard_normal((D, V))).astype(np.float32),
            r.integers(0, V, (B, T)))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 12, 36, 10_000])
def test_value_and_gradients_match_float64(chunk_tokens):
    h, w, lab = _inputs()
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: lm_head_cross_entropy(h, w, jnp.asarray(lab), chunk_tokens=chunk_tokens),
        argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
    ref, ref_dh, ref_dw = _reference(h, w, lab)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-7)


def test_undifferentiated_value_and_cotangent_scaling():
    h, w, lab = _inputs(seed=1)
    ref, ref_dh, _ = _reference(h, w, lab)
    f = jax.jit(lambda h, w: lm_head_cross_entropy(h, w, jnp.asarray(lab), chunk_tokens=6))
    np.testing.assert_allclose(float(f(h, w)), ref, rtol=1e-6)
    # a loss scaled by 3 (cotangent 3) scales the gradient by 3
    dh = jax.grad(lambda h: 3.0 * f(h, w))(jnp.asarray(h))
    np.testing.assert_allclose(np.asarray(dh), 3.0 * ref_dh, rtol=1e-5, atol=1e-7)


def test_bfloat16_inputs_close_to_float64():
    h, w, lab = _inputs(seed=2)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: lm_head_cross_entropy(h, w, jnp.asarray(lab), chunk_tokens=8), argnums=(0, 1))(hb, wb)
    assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref, ref_dh, ref_dw = _reference(np.asarray(hb, np.float32), np.asarray(wb, np.float32), lab)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dh, np.float32), ref_dh, rtol=2e-2, atol=2e-4)
    np.testing.assert_allclose(np.asarray(dw, np.float32), ref_dw, rtol=2e-2, atol=2e-4)


def test_chunk_len_divides_positions():
    assert _chunk_len(8, 256, 256) == 32
    assert _chunk_len(3, 12, 7) == 2  # 7 // 3 = 2 positions, a divisor of 12
    assert _chunk_len(4, 10, 1) == 1
    assert _chunk_len(2, 7, 1000) == 7


@pytest.mark.parametrize("tie", [False, True])
def test_training_loss_and_grads_fused_equal_plain(tie):
    """lm_loss with the fused head (train.loss_chunk) equals the plain logits path."""
    from flax import nnx
    from mlalm.model import Transformer
    from mlalm.trainer import lm_loss, split_model
    cfg = load_config(None, ["model.vocab_size=61", "model.d_model=32", "model.n_layers=2",
                             "model.ffn_dim=48", "attention.n_heads=2", "attention.kv_lora_rank=16",
                             "attention.qk_nope_head_dim=8", "attention.qk_rope_head_dim=8",
                             "attention.v_head_dim=8", f"model.tie_embeddings={tie}"])
    graphdef, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = jnp.asarray(np.random.default_rng(3).integers(0, 61, (4, 17)), jnp.int32)
    outs = [jax.value_and_grad(lambda p: lm_loss(graphdef, p, rest, batch, 0.0, chunk)[0])(params)
            for chunk in (0, 16)]
    np.testing.assert_allclose(float(outs[0][0]), float(outs[1][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("spec,n_in", [("btd,dnh->btnh", 1), ("btng,ngd->btd", 2), ("nd,df->nf", 1)])
def test_linear_equals_einsum(spec, n_in):
    r = np.random.default_rng(4)
    lhs, rhs = spec.split("->")[0].split(",")
    dims = dict(b=2, t=5, d=6, n=3, h=4, g=4, f=7)
    x = r.standard_normal([dims[c] for c in lhs]).astype(np.float32)
    w = r.standard_normal([dims[c] for c in rhs]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x), jnp.asarray(w), n_in)),
                               np.einsum(spec, x.astype(np.float64), w.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)
