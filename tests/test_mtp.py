"""Multi-token prediction (mlalm.model.mtp) against independent references.

* Forward and loss against a float64 numpy model written from the DeepSeek-V3 report's
  equations (section 2.2) for an MHA + dense SwiGLU model: the main model's last hidden
  state h^0 before the final norm, h'^k_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
  one causal block, the shared final norm and head, depth k predicting t_{i+k+1} over the
  T - k positions whose target is in the window; total = main + lambda / D * sum_k L_k.
  The reference never calls mlalm code.
* Causality: changing t_j changes no prediction that may not see it.
* The MTP loss's gradient reaches the main model: against a float64 central difference of
  the numpy reference along a random direction of a main-model weight.
* Export: transformers loads it with the main logits unchanged; the MTP layer written the
  way DeepSeek-V3 checkpoints hold it, run as an inference engine runs it (transformers'
  DeepSeek-V3 decoder layer for the block, torch for the rest, composed as vLLM's
  deepseek_mtp.py composes it), gives mlalm's depth-1 logits; from_pretrained gives back
  every parameter exactly.
* Training: the step's metrics and gradient accumulation with MTP; eval's MTP figures
  against the numpy reference.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_model
from mlalm.config import from_dict, load_config
from mlalm.errors import CheckpointError, ConfigError
from mlalm.train import lm_loss, split_model

V, T, B = 23, 12, 2


def mha_cfg(depth=2, **model):
    return from_dict(
        {
            "model": dict(
                vocab_size=V, d_model=16, n_layers=2, ffn_dim=24, max_seq_len=32, mtp_depth=depth, **model
            ),
            "attention": dict(kind="mha", n_heads=2, head_dim=8),
            "train": dict(seq_len=T),
        }
    )


def build(cfg, seed=0, scale=0.3):
    """Weights N(0, scale), norm scales 1 + N(0, 0.3) (``conftest.random_model``)."""
    return random_model(cfg, seed=seed, scale=scale, norm_spread=0.3)


# ---------------------------------------------------------------------------------------
# float64 numpy reference (MHA, dense SwiGLU, RoPE in the half layout)
# ---------------------------------------------------------------------------------------


_OVERRIDE: dict = {}  # id(variable) -> a float64 value the reference uses instead


def f64(var):
    if id(var) in _OVERRIDE:
        return _OVERRIDE[id(var)]
    return np.asarray(var[...], np.float64)


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, theta):  # x [B, T, N, P]; pairs (i, i + P/2)
    P = x.shape[-1]
    ang = np.arange(x.shape[1])[:, None] * (1.0 / theta ** (np.arange(0, P, 2) / P))[None, :]
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : P // 2], x[..., P // 2 :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def ref_block(blk, x, cfg):
    eps, theta = cfg.model.norm_eps, cfg.model.rope_theta
    a = blk.attn
    h = rms(x, f64(blk.attn_norm.scale), eps)
    q = rope(np.einsum("btd,dnh->btnh", h, f64(a.wq_DNH)), theta)
    k = rope(np.einsum("btd,dnh->btnh", h, f64(a.wk_DKH)), theta)
    v = np.einsum("btd,dnh->btnh", h, f64(a.wv_DKG))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    Tn = x.shape[1]
    s = np.where(np.tril(np.ones((Tn, Tn), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum("btnh,nhd->btd", np.einsum("bnts,bsnh->btnh", p, v), f64(a.wo_NGD))
    h = rms(x, f64(blk.ffn_norm.scale), eps)
    g, u = h @ f64(blk.ffn.w_gate_DF), h @ f64(blk.ffn.w_up_DF)
    return x + (g / (1 + np.exp(-g)) * u) @ f64(blk.ffn.w_down_FD)


def ref_forward(model, tokens, cfg, pad=0):
    """(main logits [B, T, V], [depth k logits [B, T, V]]); depth k's input at i >= T - k
    is ``pad`` (those positions predict nothing)."""
    eps = cfg.model.norm_eps
    E = f64(model.embed_VD)
    head = f64(model.head_DV)
    fn = f64(model.final_norm.scale)
    x = E[tokens]
    for blk in model.blocks:
        x = ref_block(blk, x, cfg)
    main = rms(x, fn, eps) @ head
    out, h = [], x  # h^0: before the final norm
    for k, m in enumerate(model.mtp, start=1):
        t_k = np.concatenate([tokens[:, k:], np.full((tokens.shape[0], k), pad)], axis=1)  # t_{i+k}
        e = rms(E[t_k], f64(m.enorm.scale), eps)
        hn = rms(h, f64(m.hnorm.scale), eps)
        W = f64(m.eh_proj_2DD).reshape(2 * cfg.model.d_model, -1)  # rows: [emb half; hidden half]
        h = ref_block(m.block, np.concatenate([e, hn], axis=-1) @ W, cfg)
        out.append(rms(h, fn, eps) @ head)
    return main, out


def ref_nll(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    return lse - np.take_along_axis(z, labels[..., None], -1)[..., 0]


def ref_losses(model, batch, cfg):
    """(main mean NLL, [L_k]) of a [B, T+1] batch."""
    x, y = batch[:, :-1], batch[:, 1:]
    main, mtp = ref_forward(model, x, cfg)
    Tn = x.shape[1]
    return ref_nll(main, y).mean(), [ref_nll(l[:, : Tn - k], y[:, k:]).mean() for k, l in enumerate(mtp, 1)]


@pytest.fixture(scope="module")
def mha():
    cfg = mha_cfg()
    batch = np.random.default_rng(1).integers(0, V, (B, T + 1))
    return cfg, build(cfg), batch


def test_forward_equals_float64_reference(mha):
    cfg, model, batch = mha
    x = batch[:, :-1]
    main_ref, mtp_ref = ref_forward(model, x, cfg)
    h, mtp_h, aux = model.hidden_mtp(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(model.logits(h)), main_ref, rtol=0, atol=2e-5 * np.abs(main_ref).max()
    )
    assert len(mtp_h) == 2
    for k, (hk, ref) in enumerate(zip(mtp_h, mtp_ref), start=1):
        ours = np.asarray(model.logits(hk))[:, : T - k]  # the positions with a target
        ref = ref[:, : T - k]
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        print(f"depth {k}: max rel logit error {err:.2e}")
        assert err < 2e-5
    assert aux["attn_max_logit"].shape == (cfg.model.n_layers + 2, 2)  # the MTP blocks last
    # the plain forward pass is the main model alone
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(x))), np.asarray(model.logits(h)))


@pytest.mark.parametrize("chunk", [0, 8])
def test_loss_equals_float64_reference(mha, chunk):
    """lm_loss = main + lambda / D Σ L_k, plain logits (chunk 0) and the fused chunked head,
    where depth k averages over its B (T - k) positions only."""
    cfg, model, batch = mha
    graphdef, params, rest = split_model(model)
    lam = 0.3
    loss, (nll, aux) = lm_loss(graphdef, params, rest, jnp.asarray(batch), 0.0, chunk, lam)
    main, mtp = ref_losses(model, batch, cfg)
    total = main + lam / 2 * sum(mtp)
    print(f"chunk {chunk}: loss {float(loss):.7f} ref {total:.7f}, mtp {aux['mtp_nll']} ref {mtp}")
    np.testing.assert_allclose(float(nll), main, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(aux["mtp_nll"]), mtp, rtol=2e-6)
    np.testing.assert_allclose(float(loss), total, rtol=2e-6)


def test_predictions_are_causal(mha):
    """Depth k at position i sees t_{<= i+k}: changing t_j leaves exactly the predictions
    with i + k < j unchanged (and changes later ones)."""
    cfg, model, batch = mha
    x = batch[:, :-1].copy()
    _, before, _ = model.hidden_mtp(jnp.asarray(x))
    j = 7
    x[:, j] = (x[:, j] + 5) % V
    _, after, _ = model.hidden_mtp(jnp.asarray(x))
    for k, (b, a) in enumerate(zip(before, after), start=1):
        b, a = np.asarray(b), np.asarray(a)
        np.testing.assert_array_equal(a[:, : j - k], b[:, : j - k])
        assert np.abs(a[:, j - k] - b[:, j - k]).max() > 1e-3  # t_j is depth k's input there


def test_mtp_gradient_reaches_the_main_model(mha):
    """d(Σ_k L_k)/dW for W the first main block's query weight, along a random direction,
    against a float64 central difference of the reference."""
    cfg, model, batch = mha
    graphdef, params, rest = split_model(model)

    def mtp_only(p):
        loss, (nll, _) = lm_loss(graphdef, p, rest, jnp.asarray(batch), 0.0, 8, 2.0)  # lambda / D = 1
        return loss - nll

    grads = jax.jit(jax.grad(mtp_only))(params)
    g = np.asarray(grads["blocks"][0]["attn"]["wq_DNH"][...], np.float64)
    direction = np.random.default_rng(2).standard_normal(g.shape)
    wq = model.blocks[0].attn.wq_DNH
    w0, eps = f64(wq), 1e-5

    def ref_at(w):
        _OVERRIDE[id(wq)] = w
        try:
            return sum(ref_losses(model, batch, cfg)[1])
        finally:
            _OVERRIDE.clear()

    fd = (ref_at(w0 + eps * direction) - ref_at(w0 - eps * direction)) / (2 * eps)
    ours = float(np.sum(g * direction))
    print(f"directional derivative: autodiff {ours:.6f}, float64 central difference {fd:.6f}")
    assert abs(fd) > 1e-2  # the main model's weight moves the MTP losses
    assert abs(ours - fd) <= 1e-4 * abs(fd)


# ---------------------------------------------------------------------------------------
# Export in DeepSeek-V3's layout, and back
# ---------------------------------------------------------------------------------------


def mla_moe_cfg(depth, tie=False):
    return from_dict(
        {
            "model": dict(
                vocab_size=97,
                d_model=48,
                n_layers=2,
                ffn_dim=80,
                max_seq_len=64,
                mtp_depth=depth,
                tie_embeddings=tie,
            ),
            "attention": dict(
                kind="mla",
                n_heads=4,
                q_lora_rank=16,
                kv_lora_rank=20,
                qk_nope_head_dim=12,
                qk_rope_head_dim=8,
                v_head_dim=10,
            ),
            "moe": dict(
                n_routed_experts=6,
                n_shared_experts=1,
                top_k=2,
                expert_ffn_dim=24,
                first_k_dense_replace=1,
                routed_scaling_factor=1.5,
                dispatch="dropless",
            ),
            "train": dict(seq_len=32),
        }
    )


def _exported(tmp_path, depth, tie=False):
    from mlalm.hf import save_pretrained

    cfg = mla_moe_cfg(depth, tie)
    model = build(cfg, seed=4, scale=0.1)
    for moe in model.moe_layers():  # a non-zero routing bias, the MTP layer's included
        moe.bias_E.set_value(jnp.linspace(-0.05, 0.05, moe.n_experts))
    save_pretrained(model, cfg, str(tmp_path))
    return cfg, model


@pytest.mark.slow
def test_export_layout_and_transformers_load(tmp_path):
    """DeepSeek-V3's layout: layer L + k - 1 holds depth k; transformers loads the main
    model with mlalm's logits; the MTP layer run as vLLM's DeepSeekMultiTokenPredictorLayer
    runs it (transformers' decoder layer for the block) gives mlalm's depth-1 logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    cfg, model = _exported(tmp_path, depth=1)
    L, D = cfg.model.n_layers, cfg.model.d_model
    hf_cfg = json.load(open(tmp_path / "config.json"))
    assert hf_cfg["num_nextn_predict_layers"] == 1 and hf_cfg["num_hidden_layers"] == L
    files = load_file(str(tmp_path / "model.safetensors"))
    p = f"model.layers.{L}."
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
                "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight",
                "mlp.gate.e_score_correction_bias", "mlp.experts.0.gate_proj.weight",
                "mlp.shared_experts.down_proj.weight"):  # fmt: skip
        assert p + key in files, key
    assert tuple(files[p + "eh_proj.weight"].shape) == (D, 2 * D)
    assert not any(k.startswith(f"model.layers.{L + 1}.") for k in files)

    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 24))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.float().numpy()
    diff = np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max()
    print(f"main logits vs transformers: max |diff| {diff:.2e}")
    assert diff <= 1e-4

    # the MTP layer as an engine runs it: the block is layer L of a transformers model
    # that believes it has L + 1 layers (it converts the expert tensors as for any layer)
    two = tmp_path / "as_layers"
    two.mkdir()
    (two / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
    json.dump({**hf_cfg, "num_hidden_layers": L + 1}, open(two / "config.json", "w"))
    hf2 = transformers.DeepseekV3ForCausalLM.from_pretrained(str(two), attn_implementation="eager").eval()

    def norm(key):
        n = DeepseekV3RMSNorm(D, eps=cfg.model.norm_eps)
        n.weight.data.copy_(files[key])
        return n

    x = jnp.asarray(tokens)
    h0 = model._trunk(x, None, model.blocks)[0]  # h^0: before the final norm
    _, mtp_h, _ = model.hidden_mtp(x)
    ours = np.asarray(model.logits(mtp_h[0]))
    T = tokens.shape[1]
    with torch.no_grad():
        emb = files[p + "embed_tokens.weight"][torch.tensor(tokens[:, 1:])]  # t_{i+1}, i < T - 1
        h = torch.tensor(np.asarray(h0))[:, : T - 1]
        # vllm/model_executor/models/deepseek_mtp.py: eh_proj(torch.cat([enorm(embeds), hnorm(h)]))
        x1 = (
            torch.cat([norm(p + "enorm.weight")(emb), norm(p + "hnorm.weight")(h)], dim=-1)
            @ files[p + "eh_proj.weight"].T
        )
        pos = torch.arange(T - 1)[None]
        mask = torch.full((T - 1, T - 1), torch.finfo(torch.float32).min).triu(1)[None, None]
        out = hf2.model.layers[L](x1, attention_mask=mask, position_ids=pos,
                                  position_embeddings=hf2.model.rotary_emb(x1, pos))  # fmt: skip
        logits = norm(p + "shared_head.norm.weight")(out) @ files[p + "shared_head.head.weight"].T
    diff = np.abs(logits.numpy() - ours[:, : T - 1]).max()
    print(f"MTP depth-1 logits vs the exported layer in transformers' decoder layer: {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("depth, tie", [pytest.param(1, False, marks=pytest.mark.slow), (2, True)])
def test_export_round_trip_is_exact(tmp_path, depth, tie):
    from mlalm.hf import from_pretrained

    cfg, model = _exported(tmp_path, depth, tie)
    back, cfg2 = from_pretrained(str(tmp_path))
    assert cfg2.model == cfg.model and cfg2.model.mtp_depth == depth
    ours, theirs = _flat(model), _flat(back)
    assert ours.keys() == theirs.keys() and any("mtp" in k for k in ours)
    for k, v in ours.items():
        np.testing.assert_array_equal(theirs[k], v, err_msg=k)
    main_only, cfg3 = from_pretrained(str(tmp_path), mtp=False)
    assert cfg3.model.mtp_depth == 0 and not main_only.mtp_modules()
    main = _flat(main_only)
    assert main.keys() == {k for k in ours if "mtp" not in k}
    for k, v in main.items():
        np.testing.assert_array_equal(v, ours[k], err_msg=k)


def _flat(model) -> dict:
    """{path: value} of every variable (parameters and routing biases)."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def test_import_without_mtp_tensors_or_with_unshared_copies(tmp_path):
    """A config declaring MTP layers the files lack loads the main model (transformers
    saves none); a partial MTP layer, or one whose head differs from the main one (mlalm
    shares it), is refused."""
    from safetensors.numpy import load_file, save_file

    from mlalm.hf import from_pretrained

    cfg, model = _exported(tmp_path, depth=1)
    L = cfg.model.n_layers
    tensors = load_file(str(tmp_path / "model.safetensors"))
    changed = dict(tensors)
    changed[f"model.layers.{L}.shared_head.head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(changed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"shared_head.head.weight' differs .* mtp=False"):
        from_pretrained(str(tmp_path))
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{L}.")},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    back, cfg2 = from_pretrained(str(tmp_path))
    assert cfg2.model.mtp_depth == 0 and not back.mtp_modules()
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith(f"layers.{L}.eh_proj.weight")},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match=rf"no tensor 'model.layers.{L}.eh_proj.weight'"):
        from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------
# Config, training step, evaluation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mtp_depth=-1", r"^model.mtp_depth must be >= 0"),
        ("model.mtp_depth=128", r"^model.mtp_depth=128 leaves no position to predict in train.seq_len=128"),
        ("train.mtp_loss_weight=-0.1", r"^train.mtp_loss_weight must be >= 0"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_step_metrics_and_grad_accumulation():
    """The step reports each depth's loss; two micro-batches give the figures and the
    update of one batch (float32 summation order aside)."""
    from mlalm.optim import build_optimizer
    from mlalm.train.state import init_state
    from mlalm.train.step import make_train_step

    batch = jnp.asarray(np.random.default_rng(3).integers(0, V, (4, T + 1)), jnp.int32)
    results = []
    for accum in (1, 2):
        cfg = from_dict(
            {**_raw(mha_cfg()), "train": dict(seq_len=T, batch_size=4, grad_accum=accum, loss_chunk=8)}
        )
        tx, schedule = build_optimizer(cfg, 10)
        graphdef, state = init_state(cfg, tx, seed=0)
        state, metrics = make_train_step(graphdef, tx, schedule, cfg)(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m2, p2) = results
    assert m1["mtp_loss"].shape == (2,) and m1["attn_max_logit"].shape == (4,)
    for key in ("loss", "nll", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m1["nll"] + 0.3 / 2 * m1["mtp_loss"].sum(), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _raw(cfg):
    d = cfg.to_dict()
    return {k: d[k] for k in ("model", "attention")}


def test_report_logs_each_depth():
    from mlalm.train.report import StepReporter

    class Logger:
        has_bar = True

        def __init__(self):
            self.rows = []

        def write(self, step, record, scalars, loads=None):
            self.rows.append((record, scalars))

        def advance(self, step, text=None):
            pass

        def console(self, text):
            pass

    cfg, logger = mha_cfg(), Logger()
    reporter = StepReporter(cfg, logger, start_step=0, flops_per_token=1.0, peak=1.0)
    metrics = {
        "loss": 3.0, "nll": 2.5, "grad_norm": 1.0, "lr": 1e-3, "balance_loss": 0.0,
        "expert_load": np.zeros((0, 1)), "finite": True, "applied": True,
        "attn_max_logit": np.array([1.0, 2.0, 3.0, 4.0]), "mtp_loss": np.array([2.75, 3.25]),
    }  # fmt: skip
    reporter.step(1, metrics)
    record, scalars = logger.rows[0]
    assert record["mtp_loss"] == [2.75, 3.25] and record["main_loss"] == 2.5
    assert scalars["train/mtp_loss/depth1"] == 2.75 and scalars["train/mtp_loss/depth2"] == 3.25
    assert scalars["attn/max_logit/layer3"] == 4.0  # the second MTP block: layer L + 1


def test_eval_mtp_figures_equal_the_reference():
    """mlalm.evaluate.mtp_quality over a stream of two and a half windows against the
    float64 reference applied window by window."""
    from mlalm.evaluate import mtp_quality

    cfg = mha_cfg()
    model = build(cfg, seed=6)
    # depth k's logits close to the main model's at i + k (so that agreement is neither 0
    # nor 1): the main blocks' outputs scaled down, each MTP module passing the embedding
    # of its input token through (eh_proj = [I; 0], its block's outputs 0)
    for blk in model.blocks:
        for var in (blk.attn.wo_NGD, blk.ffn.w_down_FD):
            var.set_value(var[...] * 0.05)
    for m in model.mtp_modules():
        m.eh_proj_2DD.set_value(jnp.stack([jnp.eye(16), jnp.zeros((16, 16))]))
        m.enorm.scale.set_value(jnp.ones((16,)))
        for var in (m.block.attn.wo_NGD, m.block.ffn.w_down_FD):
            var.set_value(jnp.zeros_like(var[...]))
    tokens = np.random.default_rng(5).integers(0, V, 2 * T + 5)
    eos = 0
    figures = mtp_quality(model, cfg, tokens, eos_id=eos, seq_len=T, batch_size=2)
    stream = np.concatenate([[eos], tokens])
    nll, agree, n = np.zeros(2), np.zeros(2), np.zeros(2)
    for s in range(0, len(stream) - 1, T):
        window = stream[s : s + T + 1]  # inputs window[:-1], targets window[1:]
        x, y = window[:-1][None], window[1:]
        main, mtp = ref_forward(model, x, cfg)
        for k in (1, 2):
            m = len(y) - k  # positions i whose target y[i + k] is in the window
            if m <= 0:
                continue
            nll[k - 1] += ref_nll(mtp[k - 1][0, :m], y[k:]).sum()
            agree[k - 1] += np.sum(np.argmax(mtp[k - 1][0, :m], -1) == np.argmax(main[0, k:], -1))
            n[k - 1] += m
    for k in (1, 2):
        f = figures[k - 1]
        assert f["depth"] == k and f["positions"] == n[k - 1]
        np.testing.assert_allclose(f["loss"], nll[k - 1] / n[k - 1], rtol=1e-5)
        assert f["agreement"] == agree[k - 1] / n[k - 1]
    print(figures)
    assert 0.2 < figures[0]["agreement"] < 0.95 and 0.2 < figures[1]["agreement"] < 0.95
