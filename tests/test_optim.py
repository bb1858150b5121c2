"""Muon: parameter routing, Newton–Schulz, scaling, and its config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

from mlalm import ConfigError
from mlalm.config import from_dict
from mlalm.model import Transformer
from mlalm.optim import build_optimizer, muon_dimension_numbers, optimizer_labels
from mlalm.train import split_model

MLA_MOE = {
    "model": {"vocab_size": 40, "d_model": 32, "n_layers": 2, "ffn_dim": 64, "max_seq_len": 128},
    "attention": {"kind": "mla", "n_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 4, "v_head_dim": 8, "q_lora_rank": 12},
    "moe": {"n_routed_experts": 4, "top_k": 2, "expert_ffn_dim": 16, "first_k_dense_replace": 1},
    "optim": {"name": "muon"},
}


def _named(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out[".".join(k for k in keys if k != "value")] = leaf
    return out


def test_every_leaf_has_the_right_optimizer_and_matrix_view():
    cfg = from_dict(MLA_MOE)
    _, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    labels = _named(optimizer_labels(cfg, params))
    M = "muon"
    expected = {
        "embed_VD": "adam", "head_DV": "adam", "final_norm.scale": "adam",
        "blocks.0.attn_norm.scale": "adam", "blocks.0.ffn_norm.scale": "adam",
        "blocks.0.attn.wq_a_DQ": M, "blocks.0.attn.q_norm.scale": "adam", "blocks.0.attn.wq_b_QNH": M,
        "blocks.0.attn.wkv_a_DR": M, "blocks.0.attn.kv_norm.scale": "adam", "blocks.0.attn.wkv_b_RNH": M,
        "blocks.0.attn.wo_NHD": M,
        "blocks.0.ffn.w_gate_DF": M, "blocks.0.ffn.w_up_DF": M, "blocks.0.ffn.w_down_FD": M,
        "blocks.1.attn_norm.scale": "adam", "blocks.1.ffn_norm.scale": "adam",
        "blocks.1.attn.wq_a_DQ": M, "blocks.1.attn.q_norm.scale": "adam", "blocks.1.attn.wq_b_QNH": M,
        "blocks.1.attn.wkv_a_DR": M, "blocks.1.attn.kv_norm.scale": "adam", "blocks.1.attn.wkv_b_RNH": M,
        "blocks.1.attn.wo_NHD": M,
        "blocks.1.ffn.w_router_DE": "adam", "blocks.1.ffn.w_gate_EDF": M, "blocks.1.ffn.w_up_EDF": M,
        "blocks.1.ffn.w_down_EFD": M, "blocks.1.ffn.shared.w_gate_DF": M,
        "blocks.1.ffn.shared.w_up_DF": M, "blocks.1.ffn.shared.w_down_FD": M,
    }
    assert labels == expected  # every leaf, nothing more
    # the balancing bias belongs to no optimizer: it is not among the parameters at all
    assert list(_named(rest)) == ["blocks.1.ffn.bias_E"]
    # AdamW runs label everything 'adam'
    adam_cfg = from_dict({**MLA_MOE, "optim": {"name": "adamw"}})
    assert set(_named(optimizer_labels(adam_cfg, params)).values()) == {"adam"}


@pytest.mark.parametrize("name, shape, reduction, output", [
    ("wq_DNH", (32, 2, 12), (0,), (1, 2)),          # D x (N*H), whole matrix
    ("wq_b_QNH", (12, 2, 12), (0,), (1, 2)),        # MLA W_qb as a whole Q x (N*H)
    ("wkv_b_RNH", (16, 2, 16), (0,), (1, 2)),       # MLA W_kvb as a whole R x (N*H)
    ("wo_NHD", (2, 8, 32), (0, 1), (2,)),           # (N*H) x D
    ("w_gate_EDF", (4, 32, 16), (1,), (2,)),        # per expert: E is a batch axis
    ("w_down_EFD", (4, 16, 32), (1,), (2,)),
    ("wkv_a_DR", (32, 20), (0,), (1,)),
])
def test_muon_dimension_numbers(name, shape, reduction, output):
    d = muon_dimension_numbers(name, len(shape))
    assert tuple(d.reduction_axis) == reduction and tuple(d.output_axis) == output


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32), (6, 48, 24)])
def test_newton_schulz_singular_values(shape):
    """5 quintic steps put every singular value of a random matrix in [0.6, 1.3]."""
    x = jax.random.normal(jax.random.key(0), shape)
    coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
    dims = MuonDimensionNumbers((len(shape) - 2,), (len(shape) - 1,))
    y = orthogonalize_via_newton_schulz(x, coeffs, 5, dimension_numbers=dims)
    sv = np.linalg.svd(np.asarray(y, np.float64).reshape((-1,) + shape[-2:]), compute_uv=False)
    assert sv.min() >= 0.6 and sv.max() <= 1.3, (sv.min(), sv.max())
    # and it did something: the input's singular values were far from 1
    sx = np.linalg.svd(np.asarray(x, np.float64).reshape((-1,) + shape[-2:]), compute_uv=False)
    assert sx.max() / sx.min() > 2


def _muon_tx(steps=40, **optim):
    cfg = from_dict({"model": {"vocab_size": 40},
                     "optim": {"name": "muon", "warmup_steps": 0, "schedule": "constant",
                               "clip_norm": 0.0, "weight_decay": 0.0, **optim}})
    return build_optimizer(cfg, steps)[0]


def test_muon_step_on_least_squares_reduces_loss():
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    W_true = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    B = A @ W_true
    params = {"blocks": {"w_DF": jnp.zeros((32, 16))}}  # a 'hidden' matrix -> Muon
    loss = lambda p: jnp.mean((A @ p["blocks"]["w_DF"] - B) ** 2)  # noqa: E731
    tx = _muon_tx(lr=0.3, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    state = tx.init(params)
    losses = [float(loss(params))]
    for _ in range(40):
        g = jax.grad(loss)(params)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss(params)))
    assert losses[-1] < 0.2 * losses[0]
    assert losses[1] < losses[0]


def test_muon_update_rms_matches_the_rule():
    """First step: update = -lr * 0.2*sqrt(max(fan_in, fan_out)) * O with O orthogonal-ish,
    so its RMS is lr*0.2*sqrt(max)/sqrt(min)*... — checked via the 'rms' vs 'shape' ratio."""
    g = {"blocks": {"w_DF": jax.random.normal(jax.random.key(1), (64, 16))}}
    params = jax.tree.map(jnp.zeros_like, g)
    outs = {}
    for mode in ("rms", "shape"):
        tx = _muon_tx(lr=1.0, muon_scale=mode)
        u, _ = tx.update(g, tx.init(params), params)
        outs[mode] = np.asarray(u["blocks"]["w_DF"])
    ratio = np.abs(outs["rms"]).sum() / np.abs(outs["shape"]).sum()
    # rms: 0.2*sqrt(max(64, 16)) = 1.6; shape: sqrt(max(1, 16/64)) = 1
    assert ratio == pytest.approx(0.2 * math.sqrt(64) / 1.0, rel=1e-5)


def test_optimizer_state_shapes_match_parameters():
    cfg = from_dict(MLA_MOE)
    _, params, _ = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx, _ = build_optimizer(cfg, 10)
    state = tx.init(params)
    param_shapes = sorted(x.shape for x in jax.tree.leaves(params))
    # Muon momentum for each Muon leaf, Adam mu and nu for each Adam leaf
    labels = jax.tree.leaves(optimizer_labels(cfg, params))
    shapes = [x.shape for x in jax.tree.leaves(params)]
    want = sorted([s for s, l in zip(shapes, labels) if l == "muon"] +
                  2 * [s for s, l in zip(shapes, labels) if l == "adam"])
    got = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim >= 1 and x.shape != (3,))
    assert got == want
    assert len(param_shapes) == len(labels)


@pytest.mark.parametrize("optim, message", [
    ({"name": "lion"}, "optim.name"),
    ({"ns_coeffs": [1.0, 2.0]}, "three finite numbers"),
    ({"ns_coeffs": [-1.0, 0.0, 0.0]}, "does not orthogonalise"),
    ({"ns_coeffs": [1.0, -5.0, 0.0]}, "does not orthogonalise"),
    ({"ns_coeffs": [[3.4, -4.7, 2.0], [3.4, -4.7, 2.0]], "ns_steps": 5}, "fewer than optim.ns_steps"),
    ({"ns_steps": 0}, "optim.ns_steps"),
    ({"muon_momentum": 1.0}, "optim.muon_momentum"),
    ({"muon_scale": "spectral"}, "optim.muon_scale"),
])
def test_config_errors(optim, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"optim": {"name": "muon", **optim} if "name" not in optim else optim})


@pytest.mark.parametrize("attention", [
    {"kind": "mla", "q_lora_rank": 12}, {"kind": "mla", "q_lora_rank": 0},
    {"kind": "mha", "head_dim": 8}, {"kind": "gqa", "n_kv_heads": 2, "head_dim": 8},
])
def test_qk_clip_brings_each_head_back_to_tau(attention):
    """After QK-clip the same input gives max logits min(old, tau) per head (MHA and MLA
    exactly: every logit of a clipped head scales by gamma; GQA: at most that)."""
    cfg = from_dict({"model": {"vocab_size": 40, "d_model": 32, "n_layers": 2, "init_std": 0.5, "max_seq_len": 128},
                     "attention": {"n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                   "qk_rope_head_dim": 4, "v_head_dim": 8, **attention}})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 40)
    # the first layer's input does not depend on attention weights, so compare layer 0
    before = np.asarray(model(tokens, return_aux=True)[1]["attn_max_logit"])
    tau = float(np.median(before[0]))
    model.apply_qk_clip(jnp.asarray(before), tau)
    after = np.asarray(model(tokens, return_aux=True)[1]["attn_max_logit"])[0]
    want = np.minimum(before[0], tau)
    if attention["kind"] == "gqa":
        assert np.all(after <= want * (1 + 1e-5))
        assert np.any(before[0] > tau)
    else:  # relative to the logits' scale, sound where a head's largest logit is near 0
        np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))


def test_rope_key_untouched_by_mla_qk_clip():
    cfg = from_dict({"model": {"vocab_size": 40, "d_model": 32, "n_layers": 1, "max_seq_len": 128},
                     "attention": {"n_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                   "qk_rope_head_dim": 4, "v_head_dim": 8}})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    attn = model.blocks[0].attn
    kva, kvb, wq = (np.asarray(attn.wkv_a_DR[...]), np.asarray(attn.wkv_b_RNH[...]),
                    np.asarray(attn.wq_DNH[...]))
    attn.clip_qk(jnp.asarray([0.25, 1.0]))
    np.testing.assert_array_equal(np.asarray(attn.wkv_a_DR[...]), kva)  # c_kv and shared k_pe
    got_q, got_kv = np.asarray(attn.wq_DNH[...]), np.asarray(attn.wkv_b_RNH[...])
    np.testing.assert_allclose(got_q[:, 0, :8], 0.5 * wq[:, 0, :8], rtol=1e-6)   # q_nope: sqrt
    np.testing.assert_allclose(got_q[:, 0, 8:], 0.25 * wq[:, 0, 8:], rtol=1e-6)  # q_pe: gamma
    np.testing.assert_allclose(got_kv[:, 0, :8], 0.5 * kvb[:, 0, :8], rtol=1e-6)  # k_nope: sqrt
    np.testing.assert_array_equal(got_kv[:, 0, 8:], kvb[:, 0, 8:])               # values
    np.testing.assert_array_equal(got_q[:, 1], wq[:, 1])                         # gamma 1 head
