"""mlalm.flops: the documented FLOP formula against independent counts."""

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mlalm.config import from_dict
from mlalm.flops import accelerator_peak, flops_per_token, macs_per_token, matmul_rate, traced_matmul_flops
from mlalm.model import Transformer, count_params
from mlalm.optim import build_optimizer
from mlalm.train import init_state, make_train_step

BASE = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layers": 3, "ffn_dim": 48, "max_seq_len": 64},
    "attention": {
        "kind": "mla",
        "n_heads": 2,
        "q_lora_rank": 12,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 6,
    },
    "moe": {
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "top_k": 2,
        "expert_ffn_dim": 8,
        "first_k_dense_replace": 1,
        "dispatch": "dropless",
    },
    "train": {"seq_len": 32},
}

CASES = {
    "mla_moe_qlora": {},
    "mla_moe_no_qlora_2shared": {"attention": {"q_lora_rank": 0}, "moe": {"n_shared_experts": 2, "top_k": 3}},
    "mla_dense_tied": {"moe": {"n_routed_experts": 0}, "model": {"tie_embeddings": True}},
    "gqa_moe": {"attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8}},
    "mha_dense": {"attention": {"kind": "mha", "n_heads": 2, "head_dim": 8}, "moe": {"n_routed_experts": 0}},
}


def make_cfg(case):
    raw = {k: dict(v) for k, v in BASE.items()}
    for k, v in CASES[case].items():
        raw[k].update(v)
    return from_dict(raw)


def test_hand_count_mla_moe():
    """The bench-like tiny config, written out term by term."""
    cfg = make_cfg("mla_moe_qlora")
    D, N, Q, R, dn, dr, dv, T, V = 32, 2, 12, 16, 8, 4, 6, 32, 64
    attn_proj = D * Q + Q * N * (dn + dr) + D * (R + dr) + R * N * (dn + dv) + N * dv * D
    assert attn_proj == 384 + 288 + 640 + 448 + 384
    attn_products = N * ((dn + dr) + dv) * T  # QK^T over d_qk = 12, PV over d_v = 6, all 32 keys
    dense_ffn = 3 * D * 48  # layer 0 (first_k_dense_replace = 1)
    moe_ffn = D * 4 + (2 + 1) * 3 * D * 8  # router + (top-2 + 1 shared) experts of width 8
    macs = 3 * (attn_proj + attn_products) + dense_ffn + 2 * moe_ffn + D * V
    assert macs == 3 * (2144 + 1152) + 4608 + 2 * 2432 + 2048
    assert flops_per_token(cfg, T) == 6 * macs
    parts = macs_per_token(cfg, T)
    assert parts["total"] == macs and parts["attn_products"] == 3 * attn_products


@pytest.mark.parametrize("case", sorted(CASES))
def test_matmul_params_equal_active_params(case):
    """MACs other than attention products = weight entries a token multiplies with:
    count_params(active=True) less the embedding table and the norm scales (tied: the
    table is the head too)."""
    cfg = make_cfg(case)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    norms = sum(
        x.size for p, x in jax.tree_util.tree_leaves_with_path(params) if "scale" in jax.tree_util.keystr(p)
    )
    m = cfg.model
    embed = m.vocab_size * m.d_model
    active = count_params(model, active=True) - norms - embed + (embed if m.tie_embeddings else 0)
    parts = macs_per_token(cfg, cfg.train.seq_len)
    assert parts["total"] - parts["attn_products"] == active


@pytest.fixture(autouse=True)
def ragged_dropless(monkeypatch):
    """Dropless dispatch through jax.lax.ragged_dot, whatever the backend: it multiplies
    exactly the routed rows, which a trace counts.  On CPU dropless runs the blocked path,
    whose matmuls sit in a loop with a trip count set by the routing (padding included): a
    trace cannot count it, and it is compared with ragged_dot in tests/test_model.py."""
    from mlalm.model import moe

    monkeypatch.setattr(moe, "dispatch_dropless", moe.dispatch_ragged)


@pytest.mark.parametrize("case", sorted(CASES))
def test_formula_equals_traced_forward_matmuls(case):
    """The forward pass's traced matmuls (dropless dispatch: only routed rows are multiplied)
    are exactly 2 · MACs per token · tokens: attention products over the full T x T."""
    cfg = make_cfg(case)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    B, T = 2, cfg.train.seq_len
    tokens = jnp.zeros((B, T), jnp.int32)
    traced = traced_matmul_flops(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
    assert traced == 2 * macs_per_token(cfg, T)["total"] * B * T
    assert 3 * traced == flops_per_token(cfg, T) * B * T


@pytest.mark.parametrize("loss_chunk", [0, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_matmuls_equal_flops_per_token(case, loss_chunk):
    """The whole jitted train step (forward, backward, optimizer; the fused chunked loss
    or the plain one; dropless dispatch, which multiplies routed rows only) traces to
    exactly flops_per_token · tokens of matmuls: the backward pass costs twice the
    forward, as the factor 6 assumes."""
    cfg = make_cfg(case)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=loss_chunk))
    tx, schedule = build_optimizer(cfg, 10)
    graphdef, state = init_state(cfg, tx, seed=0)
    step = make_train_step(graphdef, tx, schedule, cfg)
    B, T = 2, cfg.train.seq_len
    tokens = jnp.zeros((B, T + 1), jnp.int32)
    assert traced_matmul_flops(step, state, tokens) == flops_per_token(cfg, T) * B * T


def test_traced_matmul_flops_basic():
    a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
    assert traced_matmul_flops(jnp.dot, a, b) == 2 * 3 * 5 * 7
    scanned = lambda x: jax.lax.scan(lambda c, _: (c @ b @ b.T, None), x, None, length=4)[0]  # noqa: E731
    assert traced_matmul_flops(scanned, a) == 4 * 2 * (2 * 3 * 5 * 7)
    sizes = jnp.array([1, 2], jnp.int32)
    assert traced_matmul_flops(jax.lax.ragged_dot, a, jnp.ones((2, 5, 7)), sizes) == 2 * 3 * 5 * 7

    # the weight gradient of a grouped matmul ([M, K] x [M, N] -> [G, K, N], ragged
    # contraction): each of the M rows meets one group's weights only, so 2·M·K·N like
    # the forward, not G times that
    def grouped(x, w):
        return jnp.sum(jax.lax.ragged_dot(x, w, jnp.array([1, 2, 3], jnp.int32)))

    x, w = jnp.ones((6, 5)), jnp.ones((3, 5, 7))
    assert traced_matmul_flops(jax.grad(grouped, argnums=1), x, w) == 2 * (2 * 6 * 5 * 7)
    assert traced_matmul_flops(jax.grad(grouped, argnums=(0, 1)), x, w) == 3 * (2 * 6 * 5 * 7)


def test_peaks():
    assert accelerator_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert accelerator_peak("NVIDIA H100 PCIe") == 756e12
    assert accelerator_peak("cpu") is None
    # a rate is the n x n product's 2·n³ FLOPs over the timed seconds
    r = matmul_rate(n=64, repeats=3)
    assert len(r["seconds"]) == 3 and all(t > 0 for t in r["seconds"])
    assert r["median"] == pytest.approx(2 * 64**3 / statistics.median(r["seconds"]), rel=1e-12)
    assert r["best"] == pytest.approx(2 * 64**3 / min(r["seconds"]), rel=1e-12)
