"""Muon: parameter routing, Newton–Schulz, scaling, and its config errors."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

from mlalm import ConfigError
from mlalm.config import from_dict, load_config
from mlalm.model import Transformer
from mlalm.model.layers import param
from mlalm.optim import build_optimizer, muon_dimension_numbers, optimizer_labels, param_labels
from mlalm.train import split_model

MLA_MOE = {
    "model": {"vocab_size": 40, "d_model": 32, "n_layers": 2, "ffn_dim": 64, "max_seq_len": 128},
    "attention": {
        "kind": "mla",
        "n_heads": 2,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        "q_lora_rank": 12,
    },
    "moe": {"n_routed_experts": 4, "top_k": 2, "expert_ffn_dim": 16, "first_k_dense_replace": 1},
    "optim": {"name": "muon"},
}


def _named(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)
    ):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out[".".join(k for k in keys if k != "value")] = leaf
    return out


def test_every_leaf_has_the_right_optimizer_and_matrix_view():
    cfg = from_dict(MLA_MOE)
    _, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    labels = _named(optimizer_labels(cfg, params))
    M = "muon"
    expected = {
        "embed_VD": "adam",
        "head_DV": "adam",
        "final_norm.scale": "adam",
        "blocks.0.attn_norm.scale": "adam",
        "blocks.0.ffn_norm.scale": "adam",
        "blocks.0.attn.wq_a_DQ": M,
        "blocks.0.attn.q_norm.scale": "adam",
        "blocks.0.attn.wq_b_QNH": M,
        "blocks.0.attn.wkv_a_DJ": M,
        "blocks.0.attn.kv_norm.scale": "adam",
        "blocks.0.attn.wkv_b_RNU": M,
        "blocks.0.attn.wo_NGD": M,
        "blocks.0.ffn.w_gate_DF": M,
        "blocks.0.ffn.w_up_DF": M,
        "blocks.0.ffn.w_down_FD": M,
        "blocks.1.attn_norm.scale": "adam",
        "blocks.1.ffn_norm.scale": "adam",
        "blocks.1.attn.wq_a_DQ": M,
        "blocks.1.attn.q_norm.scale": "adam",
        "blocks.1.attn.wq_b_QNH": M,
        "blocks.1.attn.wkv_a_DJ": M,
        "blocks.1.attn.kv_norm.scale": "adam",
        "blocks.1.attn.wkv_b_RNU": M,
        "blocks.1.attn.wo_NGD": M,
        "blocks.1.ffn.w_router_DE": "adam",
        "blocks.1.ffn.w_gate_EDF": M,
        "blocks.1.ffn.w_up_EDF": M,
        "blocks.1.ffn.w_down_EFD": M,
        "blocks.1.ffn.shared.w_gate_DF": M,
        "blocks.1.ffn.shared.w_up_DF": M,
        "blocks.1.ffn.shared.w_down_FD": M,
    }
    assert labels == expected  # every leaf, nothing more
    # the balancing bias belongs to no optimizer: it is not among the parameters at all
    assert list(_named(rest)) == ["blocks.1.ffn.bias_E"]
    # AdamW runs label everything 'adam'
    adam_cfg = from_dict({**MLA_MOE, "optim": {"name": "adamw"}})
    assert set(_named(optimizer_labels(adam_cfg, params)).values()) == {"adam"}


# ---------------------------------------------------------------------------------------
# Every leaf's label and Muon view, from tables written out by hand
# ---------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GQA_DENSE = {
    "model": {"vocab_size": 40, "d_model": 32, "n_layers": 2, "ffn_dim": 64, "max_seq_len": 128},
    "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8},
    "moe": {"n_routed_experts": 0},
    "optim": {"name": "muon"},
}


def _config(name):
    if name == "default":  # configs/default.yaml: MLA without q LoRA, layer 0 dense, 1-3 MoE
        return load_config(
            os.path.join(ROOT, "configs", "default.yaml"), ["model.vocab_size=257", "optim.name=muon"]
        )
    return from_dict({"gqa_dense": GQA_DENSE, "mla_qlora_moe": MLA_MOE}[name])


def _expected_views(name, cfg):
    """{leaf path: (label, Muon view)} written out from what each weight means.  A view
    is (reduction axes, output axes, batch axes, matrix shape [batch, rows, cols]) for
    a Muon matrix and None otherwise.  The sizes are the config's, named as in the
    shape key of mlalm/model/__init__.py."""
    m, a, e = cfg.model, cfg.attention, cfg.moe
    D, L, F_dense = m.d_model, m.n_layers, m.ffn_dim
    N, E, F = a.n_heads, e.n_routed_experts, e.expert_ffn_dim
    norm = ("norm", None)

    def matrix(rows, cols):  # x W with W [rows, cols]: rows in, cols out
        return ("hidden", ((0,), (1,), (), (1, rows, cols)))

    def into_heads(rows, heads, width):  # [rows, heads, width]: one rows x heads*width matrix
        return ("hidden", ((0,), (1, 2), (), (1, rows, heads * width)))

    def out_of_heads(heads, width, cols):  # [heads, width, cols]: (heads*width) x cols
        return ("hidden", ((0, 1), (2,), (), (1, heads * width, cols)))

    def experts(rows, cols):  # [E, rows, cols]: E matrices rows x cols, one per expert
        return ("hidden", ((1,), (2,), (0,), (E, rows, cols)))

    if name == "gqa_dense":
        K, H = cfg.n_kv_heads, a.head_dim
        attn = {
            "wq_DNH": into_heads(D, N, H),
            "wk_DKH": into_heads(D, K, H),
            "wv_DKG": into_heads(D, K, H),
            "wo_NGD": out_of_heads(N, H, D),
        }
        moe_layers = set()
    else:  # MLA
        R, P, dn, dv, Q = (
            a.kv_lora_rank,
            a.qk_rope_head_dim,
            a.qk_nope_head_dim,
            a.v_head_dim,
            a.q_lora_rank,
        )
        attn = {
            "wkv_a_DJ": matrix(D, R + P),
            "kv_norm.scale": norm,
            "wkv_b_RNU": into_heads(R, N, dn + dv),  # W_kvb whole: R x N*(d_n + d_v)
            "wo_NGD": out_of_heads(N, dv, D),
        }
        if Q:
            attn.update(
                {"wq_a_DQ": matrix(D, Q), "q_norm.scale": norm, "wq_b_QNH": into_heads(Q, N, dn + P)}
            )  # W_qb whole: Q x N*(d_n + d_r)
        else:
            attn["wq_DNH"] = into_heads(D, N, dn + P)
        moe_layers = set(range(1, L))  # both configs: layer 0 dense, the rest MoE
    want = {"embed_VD": ("embedding", None), "head_DV": ("head", None), "final_norm.scale": norm}
    for i in range(L):
        blk = f"blocks.{i}."
        want.update({blk + "attn_norm.scale": norm, blk + "ffn_norm.scale": norm})
        want.update({blk + "attn." + k: v for k, v in attn.items()})
        if i in moe_layers:
            Fs = F * e.n_shared_experts
            ffn = {
                "w_router_DE": ("router", None),
                "w_gate_EDF": experts(D, F),
                "w_up_EDF": experts(D, F),
                "w_down_EFD": experts(F, D),
                "shared.w_gate_DF": matrix(D, Fs),
                "shared.w_up_DF": matrix(D, Fs),
                "shared.w_down_FD": matrix(Fs, D),
            }
        else:
            ffn = {
                "w_gate_DF": matrix(D, F_dense),
                "w_up_DF": matrix(D, F_dense),
                "w_down_FD": matrix(F_dense, D),
            }
        want.update({blk + "ffn." + k: v for k, v in ffn.items()})
    return want


def _leaves(params):
    """{dotted path: Param} of a parameter State."""
    return {
        ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): var
        for path, var in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    }


def _view(var):
    """(reduction, output, batch, matrix shape) as optax's Muon reshapes the leaf: the
    batch axes are all the others (optax.contrib.MuonDimensionNumbers)."""
    d = muon_dimension_numbers(var)
    red, out = tuple(d.reduction_axis), tuple(d.output_axis)
    batch = tuple(i for i in range(var.ndim) if i not in red + out)
    size = lambda axes: math.prod(var.shape[i] for i in axes)
    return red, out, batch, (size(batch), size(red), size(out))


@pytest.mark.parametrize("name", ["default", "gqa_dense", "mla_qlora_moe"])
def test_every_leaf_label_and_muon_view(name):
    cfg = _config(name)
    want = _expected_views(name, cfg)
    _, params, _ = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    leaves = _leaves(params)
    assert sorted(leaves) == sorted(want)  # every leaf, nothing more
    got_labels = _named(param_labels(params))
    for path, var in leaves.items():
        label, view = want[path]
        assert got_labels[path] == label, path
        if view is None:
            with pytest.raises(ValueError, match="not a Muon matrix"):
                muon_dimension_numbers(var)
        else:
            assert _view(var) == view, path
    # what the optimizer does with them: Muon exactly on the matrices with a view
    assert _named(optimizer_labels(cfg, params)) == {k: "muon" if v[1] else "adam" for k, v in want.items()}


class _Renamed(nnx.Module):
    """Parameters under misleading names: each name is another parameter's shape suffix."""

    def __init__(self, rngs):
        # W_kvb-like [R, N, U] under the output projection's name, a router under the
        # embedding's name, a norm scale under a matrix's name
        self.wo_NHD = param(
            rngs, (16, 2, 8), ("kv_lora", "heads", "head_dim"), label="hidden", fan_in=(0,), fan_out=(1, 2)
        )
        self.embed_VD = param(rngs, (8, 4), ("embed", None), label="router", fan_in=(0,), fan_out=(1,))
        self.w_gate_EDF = param(rngs, (8,), ("norm",), label="norm", init="ones")
        self.scale = param(
            rngs,
            (3, 8, 5),
            ("experts", "embed", "expert_mlp"),
            label="hidden",
            batch=(0,),
            fan_in=(1,),
            fan_out=(2,),
        )


def test_labels_and_views_come_from_metadata_not_names():
    _, params = nnx.split(_Renamed(nnx.Rngs(0)))
    assert _named(param_labels(params)) == {
        "wo_NHD": "hidden",
        "embed_VD": "router",
        "w_gate_EDF": "norm",
        "scale": "hidden",
    }
    assert _view(params["wo_NHD"]) == ((0,), (1, 2), (), (1, 16, 16))
    assert _view(params["scale"]) == ((1,), (2,), (0,), (3, 8, 5))
    # moved to another place in the tree, under yet other names: the same
    moved = {"x": {"y": params["wo_NHD"]}, "head_DV": params["scale"], "z": params["embed_VD"]}
    assert _named(param_labels(moved)) == {"x.y": "hidden", "head_DV": "hidden", "z": "router"}
    assert _view(moved["head_DV"]) == ((1,), (2,), (0,), (3, 8, 5))
    # the model's own parameters keep their roles wherever they are put
    _, model_params, _ = split_model(Transformer(from_dict(MLA_MOE), rngs=nnx.Rngs(0)))
    w = model_params["blocks"][1]["attn"]["wkv_b_RNU"]
    assert _named(param_labels({"w_router_DE": w})) == {"w_router_DE": "hidden"}


def test_a_leaf_without_roles_is_refused():
    """A plain array or a Param made without ``param`` has no label: an error naming it,
    never a guess from its name."""
    with pytest.raises(TypeError, match=r"\['blocks'\]\['w_DF'\].*not an nnx.Param"):
        param_labels({"blocks": {"w_DF": jnp.zeros((4, 4))}})
    with pytest.raises(ValueError, match=r"\['head_DV'\].*no 'label' metadata"):
        param_labels({"head_DV": nnx.Param(jnp.zeros((4, 4)))})
    with pytest.raises(ValueError, match="cover all 3 axes"):  # an axis left out
        param(nnx.Rngs(0), (2, 3, 4), (None, None, None), label="hidden", fan_in=(0,), fan_out=(1,))
    with pytest.raises(ValueError, match="label 'matrix'"):
        param(nnx.Rngs(0), (2, 3), (None, None), label="matrix", fan_in=(0,), fan_out=(1,))


def _newton_schulz_np(x, coeffs=(3.4445, -4.7750, 2.0315), steps=5):
    """float64 quintic Newton–Schulz of one matrix: X <- aX + (bA + cA²)X, A = X Xᵀ, from
    X = x / ||x||_F, on the wide orientation (rows <= cols)."""
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    X = x.T if tall else x
    X = X / (np.linalg.norm(X) + 1e-8)
    a, b, c = coeffs
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@pytest.mark.parametrize("leaf", ["wkv_b_RNU", "wq_b_QNH", "wo_NGD", "w_gate_EDF"])
def test_muon_step_orthogonalises_the_matrix_its_roles_describe(leaf):
    """One Muon step (lr 1, no weight decay) on one parameter of the MLA + MoE model:
    update = -0.2·sqrt(max(rows, cols)) · NS(G viewed as the matrix), against float64
    numpy Newton–Schulz of the gradient reshaped BY HAND:
      W_kvb [R, N, d_n + d_v] -> one R x N(d_n + d_v) matrix (not N per-head matrices),
      W_qb  [Q, N, d_n + d_r] -> one Q x N(d_n + d_r) matrix,
      W_o   [N, d_v, D]       -> one N·d_v x D matrix,
      experts [E, D, F]       -> E matrices D x F, each on its own.
    (With zero momentum the first Nesterov step is a positive multiple of G, which the
    Frobenius pre-normalisation removes.)"""
    cfg = from_dict(
        {
            **MLA_MOE,
            "optim": {
                "name": "muon",
                "warmup_steps": 0,
                "muon_lr": 1.0,
                "schedule": "constant",
                "clip_norm": 0.0,
                "weight_decay": 0.0,
                "muon_scale": "rms",
            },
        }
    )
    _, params, _ = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    block = params["blocks"][1]
    var = block["ffn"][leaf] if leaf.startswith("w_gate") else block["attn"][leaf]
    tree = {"w": var}
    g = np.random.default_rng(3).standard_normal(var.shape).astype(np.float32)
    grads = jax.tree.map(lambda _: jnp.asarray(g), tree)
    tx, _ = build_optimizer(cfg, 10)
    update = np.asarray(tx.update(grads, tx.init(tree), tree)[0]["w"][...], np.float64)

    R, N, dn, P, dv, Q, D, F = 16, 2, 8, 4, 8, 12, 32, 16
    g64 = g.astype(np.float64)
    if leaf == "wkv_b_RNU":
        want = _newton_schulz_np(g64.reshape(R, N * (dn + dv))).reshape(g.shape)
        factor, per_head = 0.2 * math.sqrt(N * (dn + dv)), [g64[:, n] for n in range(N)]
    elif leaf == "wq_b_QNH":
        want = _newton_schulz_np(g64.reshape(Q, N * (dn + P))).reshape(g.shape)
        factor, per_head = 0.2 * math.sqrt(N * (dn + P)), [g64[:, n] for n in range(N)]
    elif leaf == "wo_NGD":
        want = _newton_schulz_np(g64.reshape(N * dv, D)).reshape(g.shape)
        factor, per_head = 0.2 * math.sqrt(D), [g64[n] for n in range(N)]
    else:
        want = np.stack([_newton_schulz_np(g64[e]) for e in range(g.shape[0])])
        factor, per_head = 0.2 * math.sqrt(max(D, F)), None
    want = -factor * want
    scale = np.abs(want).max()
    np.testing.assert_allclose(update, want, atol=2e-5 * scale, rtol=0)
    if per_head is not None:  # and it is not what orthogonalising each head would give
        axis = 0 if leaf == "wo_NGD" else 1  # where the head axis sits
        heads = np.stack([_newton_schulz_np(h) for h in per_head], axis=axis)
        assert np.abs(-factor * heads - update).max() > 0.05 * scale


# The Polar Express schedule (arXiv 2505.16932, Algorithm 1), written out again here with
# the paper's safety factor 1.01 on all but the last triple, for an independent reference.
_PE_PAPER = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
]


def _polar_express_np(x, steps=5):
    """float64 Algorithm 1: X / (1.01·||X||_F + 1e-7), then X <- aX + (bA + cA²)X with
    the i-th safety-scaled triple (a/1.01, b/1.01³, c/1.01⁵), on the wide orientation."""
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    X = x.T if tall else x
    X = X / (np.linalg.norm(X) * 1.01 + 1e-7)
    for a, b, c in _PE_PAPER[:steps]:
        a, b, c = a / 1.01, b / 1.01**3, c / 1.01**5
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def _normuon_np(g, fan_in_axes, beta2=0.95):
    """float64 NorMuon step from zero state (arXiv 2510.05491; reference normuon.py) on
    one matrix [fan_in, fan_out]: O = NS(G); v = (1 - beta2)·mean over fan-in of O²;
    O' = O / (sqrt(v) + 1e-10), rescaled to ||O||_F."""
    O = _newton_schulz_np(g)
    v = (1 - beta2) * np.mean(O**2, axis=fan_in_axes, keepdims=True)
    scaled = O / (np.sqrt(v) + 1e-10)
    return scaled * (np.linalg.norm(O) / (np.linalg.norm(scaled) + 1e-10))


@pytest.mark.parametrize("variant", ["quintic", "polar_express", "normuon"])
@pytest.mark.parametrize("leaf", ["matrix", "experts", "wkv_b_RNU"])
def test_each_muon_variant_matches_a_float64_reference(variant, leaf):
    """One step of each Muon variant (muon_lr 1, no weight decay) against float64 numpy on
    a [D, F] matrix, an expert stack [E, D, F] (each expert its own matrix) and MLA's
    W_kvb [R, N, d_n + d_v] (one R x N(d_n + d_v) matrix): update = -0.2·sqrt(max(fan_in,
    fan_out)) · variant(G)."""
    cfg = from_dict(
        {
            **MLA_MOE,
            "optim": {
                "name": "muon",
                "muon_variant": variant,
                "warmup_steps": 0,
                "muon_lr": 1.0,
                "schedule": "constant",
                "clip_norm": 0.0,
                "weight_decay": 0.0,
            },
        }
    )
    rng = np.random.default_rng(7)
    if leaf == "matrix":
        var, view = _matrix((24, 40)), lambda g: [g]
    elif leaf == "experts":
        var = param(
            nnx.Rngs(0),
            (3, 24, 16),
            (None, None, None),
            label="hidden",
            batch=(0,),
            fan_in=(1,),
            fan_out=(2,),
            init="zeros",
        )
        view = lambda g: list(g)  # noqa: E731
    else:
        _, params, _ = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
        var = params["blocks"][1]["attn"][leaf]
        view = lambda g: [g.reshape(g.shape[0], -1)]  # noqa: E731
    g = rng.standard_normal(var.shape).astype(np.float32)
    tree = {"w": var}
    tx, _ = build_optimizer(cfg, 10)
    update = np.asarray(
        tx.update({"w": var.replace(jnp.asarray(g))}, tx.init(tree), tree)[0]["w"][...], np.float64
    )
    reference = {
        "quintic": _newton_schulz_np,
        "polar_express": _polar_express_np,
        "normuon": lambda m: _normuon_np(m, (0,)),
    }[variant]
    mats = [reference(m) for m in view(g.astype(np.float64))]
    fan_in, fan_out = mats[0].shape
    want = -0.2 * math.sqrt(max(fan_in, fan_out)) * np.stack(mats).reshape(g.shape)
    scale = np.abs(want).max()
    np.testing.assert_allclose(update, want, atol=3e-5 * scale, rtol=0)
    others = [v for v in ("quintic", "polar_express", "normuon") if v != variant]
    for other in others:  # the variants differ measurably, so the check can tell them apart
        ref = {
            "quintic": _newton_schulz_np,
            "polar_express": _polar_express_np,
            "normuon": lambda m: _normuon_np(m, (0,)),
        }[other]
        alt = -0.2 * math.sqrt(max(fan_in, fan_out)) * np.stack([ref(m) for m in view(g.astype(np.float64))])
        assert np.abs(alt.reshape(g.shape) - update).max() > 100 * 3e-5 * scale


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
    cfg = from_dict(
        {
            "model": {"vocab_size": 40},
            "optim": {
                "name": "muon",
                "warmup_steps": 0,
                "schedule": "constant",
                "clip_norm": 0.0,
                "weight_decay": 0.0,
                **optim,
            },
        }
    )
    return build_optimizer(cfg, steps)[0]


def _matrix(shape, value=None):
    """A 'hidden' [in, out] parameter (a Muon matrix), zeros or ``value``."""
    var = param(nnx.Rngs(0), shape, (None, None), label="hidden", fan_in=(0,), fan_out=(1,), init="zeros")
    if value is not None:
        var.set_value(jnp.asarray(value, jnp.float32))
    return var


def test_muon_step_on_least_squares_reduces_loss():
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    W_true = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    B = A @ W_true
    params = {"blocks": {"w_DF": _matrix((32, 16))}}  # a 'hidden' matrix -> Muon
    loss = lambda p: jnp.mean((A @ p["blocks"]["w_DF"][...] - B) ** 2)
    tx = _muon_tx(muon_lr=0.3, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    losses = [float(loss(params))]
    for _ in range(40):
        params, state = step(params, state)
        losses.append(float(loss(params)))
    assert losses[-1] < 0.2 * losses[0]
    assert losses[1] < losses[0]


def test_muon_update_rms_matches_the_rule():
    """First step: update = -lr * 0.2*sqrt(max(fan_in, fan_out)) * O with O orthogonal-ish,
    so its RMS is lr*0.2*sqrt(max)/sqrt(min)*... — checked via the 'rms' vs 'shape' ratio."""
    g = {"blocks": {"w_DF": _matrix((64, 16), jax.random.normal(jax.random.key(1), (64, 16)))}}
    params = jax.tree.map(jnp.zeros_like, g)
    outs = {}
    for mode in ("rms", "shape"):
        tx = _muon_tx(muon_lr=1.0, muon_scale=mode)
        u, _ = tx.update(g, tx.init(params), params)
        outs[mode] = np.asarray(u["blocks"]["w_DF"][...])
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
    want = sorted(
        [s for s, l in zip(shapes, labels) if l == "muon"]
        + 2 * [s for s, l in zip(shapes, labels) if l == "adam"]
    )
    got = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim >= 1 and x.shape != (3,))
    assert got == want
    assert len(param_shapes) == len(labels)


@pytest.mark.parametrize(
    "optim, message",
    [
        ({"name": "lion"}, "optim.name"),
        ({"ns_coeffs": [1.0, 2.0]}, "three finite numbers"),
        ({"ns_coeffs": [-1.0, 0.0, 0.0]}, "does not orthogonalise"),
        ({"ns_coeffs": [1.0, -5.0, 0.0]}, "does not orthogonalise"),
        ({"ns_coeffs": [[3.4, -4.7, 2.0], [3.4, -4.7, 2.0]], "ns_steps": 5}, "fewer than optim.ns_steps"),
        ({"ns_steps": 0}, "optim.ns_steps"),
        ({"muon_momentum": 1.0}, "optim.muon_momentum"),
        ({"muon_scale": "spectral"}, "optim.muon_scale"),
    ],
)
def test_config_errors(optim, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"optim": {"name": "muon", **optim} if "name" not in optim else optim})


@pytest.mark.parametrize(
    "attention",
    [
        {"kind": "mla", "q_lora_rank": 12},
        {"kind": "mla", "q_lora_rank": 0},
        {"kind": "mha", "head_dim": 8},
        {"kind": "gqa", "n_kv_heads": 2, "head_dim": 8},
    ],
)
@pytest.mark.slow
def test_qk_clip_brings_each_head_back_to_tau(attention):
    """After QK-clip the same input gives max logits min(old, tau) per head (MHA and MLA
    exactly: every logit of a clipped head scales by gamma; GQA: at most that)."""
    cfg = from_dict(
        {
            "model": {"vocab_size": 40, "d_model": 32, "n_layers": 2, "init_std": 0.5, "max_seq_len": 128},
            "attention": {
                "n_heads": 4,
                "kv_lora_rank": 16,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4,
                "v_head_dim": 8,
                **attention,
            },
        }
    )
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
    cfg = from_dict(
        {
            "model": {"vocab_size": 40, "d_model": 32, "n_layers": 1, "max_seq_len": 128},
            "attention": {
                "n_heads": 2,
                "kv_lora_rank": 16,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4,
                "v_head_dim": 8,
            },
        }
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    attn = model.blocks[0].attn
    kva, kvb, wq = (
        np.asarray(attn.wkv_a_DJ[...]),
        np.asarray(attn.wkv_b_RNU[...]),
        np.asarray(attn.wq_DNH[...]),
    )
    attn.clip_qk(jnp.asarray([0.25, 1.0]))
    np.testing.assert_array_equal(np.asarray(attn.wkv_a_DJ[...]), kva)  # c_kv and shared k_pe
    got_q, got_kv = np.asarray(attn.wq_DNH[...]), np.asarray(attn.wkv_b_RNU[...])
    np.testing.assert_allclose(got_q[:, 0, :8], 0.5 * wq[:, 0, :8], rtol=1e-6)  # q_nope: sqrt
    np.testing.assert_allclose(got_q[:, 0, 8:], 0.25 * wq[:, 0, 8:], rtol=1e-6)  # q_pe: gamma
    np.testing.assert_allclose(got_kv[:, 0, :8], 0.5 * kvb[:, 0, :8], rtol=1e-6)  # k_nope: sqrt
    np.testing.assert_array_equal(got_kv[:, 0, 8:], kvb[:, 0, 8:])  # values
    np.testing.assert_array_equal(got_q[:, 1], wq[:, 1])  # gamma 1 head
