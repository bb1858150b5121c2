"""mlalm's model against transformers' DeepseekV3ForCausalLM (an independent implementation)."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlalm import CheckpointError, ConfigError  # noqa: E402
from mlalm.config import from_dict  # noqa: E402
from mlalm.hf import config_to_hf, from_pretrained, save_pretrained  # noqa: E402
from mlalm.model import Transformer  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=20,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    rope_interleave=True,
)

CASES = {
    # q LoRA on, group-limited routing, one dense layer, norm_topk_prob on, scaling 2.5
    "qlora_groups": dict(
        q_lora_rank=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    # q LoRA off, no groups, two dense layers, norm_topk_prob off, two shared experts
    "noqlora_plain": dict(
        q_lora_rank=None,
        n_routed_experts=6,
        n_shared_experts=2,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.7,
    ),
    # q LoRA on, groups, no dense layer, tied embeddings, non-interleaved rope declared
    "tied_noninterleaved": dict(
        q_lora_rank=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        norm_topk_prob=True,
        routed_scaling_factor=0.8,
        tie_word_embeddings=True,
        rope_interleave=False,
    ),
}


def _hf_model(overrides, seed):
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random everything, including norms and the balancing bias
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
    model.config._attn_implementation = "eager"
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(2, 24))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(case, tokens, tmp_path):
    hf = _hf_model(CASES[case], seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_pretrained(str(tmp_path))
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _hf_logits(hf, tokens)
    diff = np.abs(ours - ref).max()
    print(f"{case}: max |logit diff| vs transformers = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


@pytest.mark.parametrize("case", ["qlora_groups", "noqlora_plain"])
def test_round_trip_through_transformers(case, tokens, tmp_path):
    """mlalm (random init) -> save_pretrained -> transformers gives mlalm's logits."""
    c = CASES[case]
    cfg = from_dict(
        {
            "model": dict(vocab_size=97, d_model=48, n_layers=3, ffn_dim=80, max_seq_len=64),
            "attention": dict(
                kind="mla",
                n_heads=4,
                q_lora_rank=c["q_lora_rank"] or 0,
                kv_lora_rank=20,
                qk_nope_head_dim=12,
                qk_rope_head_dim=8,
                v_head_dim=10,
            ),
            "moe": dict(
                n_routed_experts=c["n_routed_experts"],
                n_shared_experts=c["n_shared_experts"],
                top_k=c["num_experts_per_tok"],
                expert_ffn_dim=24,
                n_group=c["n_group"],
                topk_group=c["topk_group"],
                first_k_dense_replace=c["first_k_dense_replace"],
                norm_topk_prob=c["norm_topk_prob"],
                routed_scaling_factor=c["routed_scaling_factor"],
                dispatch="dropless",
            ),
            "train": dict(seq_len=32),
        }
    )
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    for moe in model.moe_layers():  # a non-zero bias must survive the trip
        moe.bias_E.set_value(jnp.linspace(-0.05, 0.05, moe.n_experts))
    save_pretrained(model, cfg, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["rope_interleave"] is True
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ours = np.asarray(model(jnp.asarray(tokens)))
    diff = np.abs(ours - _hf_logits(hf, tokens)).max()
    print(f"{case}: round-trip max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    # and back again: identical parameters
    model2, cfg2 = from_pretrained(str(tmp_path))
    assert cfg2.model == cfg.model and cfg2.attention == cfg.attention
    np.testing.assert_array_equal(np.asarray(model2(jnp.asarray(tokens))), ours)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention": {"kind": "gqa", "n_kv_heads": 2}}, "only expresses MLA"),
        ({"attention": {"kind": "mha"}}, r"only expresses MLA attention \(export as Llama"),
        (
            {"attention": {"kind": "mha"}, "moe": {"n_routed_experts": 4}},
            r"only expresses MLA attention$",  # MoE: no Llama either
        ),
        ({"moe": {"n_routed_experts": 4, "n_shared_experts": 0}}, "shared expert"),
        ({"attention": {"kind": "mla", "kv_latent_norm": False}}, "kv_latent_norm=false: DeepSeek-V3"),
    ],
)
def test_inexpressible_config_is_refused(overrides, message):
    cfg = from_dict({"model": {"vocab_size": 50}, **overrides})
    with pytest.raises(ConfigError, match=message):
        config_to_hf(cfg)


def test_token_id_outside_vocab_is_refused():
    cfg = from_dict({"model": {"vocab_size": 50}})
    with pytest.raises(ConfigError, match="eos_token_id=50 is outside the vocabulary"):
        config_to_hf(cfg, eos_token_id=50)


# ---------------------------------------------------------------------------------------
# config.json keys that serving engines read
# ---------------------------------------------------------------------------------------

EOS = 96  # any id of the 97-token vocabulary


def _cfg(scoring, **over):
    """A small MoE config with every value the expectations below spell out."""
    moe = dict(
        n_routed_experts=8,
        n_shared_experts=2,
        top_k=3,
        expert_ffn_dim=24,
        first_k_dense_replace=1,
        scoring=scoring,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        dispatch="dropless",
    )
    if scoring == "sigmoid":
        moe.update(n_group=4, topk_group=2)
    moe.update(over.pop("moe", {}))
    return from_dict(
        {
            "model": dict(
                vocab_size=97,
                d_model=48,
                n_layers=3,
                ffn_dim=80,
                max_seq_len=64,
                norm_eps=1e-5,
                rope_theta=5000.0,
                **over.pop("model", {}),
            ),
            "attention": dict(
                kind="mla",
                n_heads=4,
                kv_lora_rank=20,
                qk_nope_head_dim=12,
                qk_rope_head_dim=8,
                v_head_dim=10,
                **over.pop("attention", {}),
            ),
            "moe": moe,
            "train": dict(seq_len=32),
        }
    )


# What DeepSeek-V3's config.json says for the same keys, with this model's values; the
# routing keys per case: sigmoid + bias is V3's noaux_tc (the bias tensor written even when
# it is zero: noaux_tc readers expect it); softmax + bias can only be said
# as noaux_tc (the bias is applied to the softmax scores); softmax without a bias is
# DeepSeek-V2-Lite's greedy (top-k of softmax, no groups).
COMMON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 20,
    "qk_nope_head_dim": 12,
    "qk_rope_head_dim": 8,
    "v_head_dim": 10,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 24,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 5000.0,
    "rope_interleave": True,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "float32",
    "dtype": "float32",
    "bos_token_id": None,
    "eos_token_id": EOS,
    "pad_token_id": None,
}
ROUTING = {
    "sigmoid": dict(
        scoring="sigmoid",
        bias=True,
        keys={
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "n_group": 4,
            "topk_group": 2,
            "q_lora_rank": 16,
        },
    ),
    "sigmoid_zero_bias": dict(
        scoring="sigmoid",
        bias=False,
        keys={
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "n_group": 4,
            "topk_group": 2,
            "q_lora_rank": 16,
        },
    ),
    "softmax_bias": dict(
        scoring="softmax",
        bias=True,
        keys={
            "scoring_func": "softmax",
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": None,
        },
    ),
    "softmax_no_bias": dict(
        scoring="softmax",
        bias=False,
        keys={
            "scoring_func": "softmax",
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": None,
        },
    ),
}


def _routed_model(case, seed=3):
    r = ROUTING[case]
    q_lora = r["keys"]["q_lora_rank"] or 0
    cfg = _cfg(r["scoring"], attention={"q_lora_rank": q_lora})
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    for moe in model.moe_layers():
        bias = np.linspace(-0.05, 0.05, moe.n_experts) if r["bias"] else np.zeros(moe.n_experts)
        moe.bias_E.set_value(jnp.asarray(bias, jnp.float32))
    return model, cfg


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _engine_routing(x_ND, hf, gate_ED, bias_E):
    """The routing an engine builds from config.json alone, in float64 (vLLM's grouped_topk:
    scores by scoring_func; with topk_method noaux_tc choose by score + bias and rank groups
    by the sum of their two best, else choose by score and rank groups by their best;
    weights are the unbiased scores, renormalised when norm_topk_prob, times
    routed_scaling_factor).  Returns the dense gate weights [N, E] (0 for unchosen)."""
    logits = x_ND @ gate_ED.T
    s = 1 / (1 + np.exp(-logits)) if hf["scoring_func"] == "sigmoid" else _np_softmax(logits)
    N, E = s.shape
    G = hf["n_group"]
    if hf["topk_method"] == "noaux_tc":
        choice = s + bias_E
        group_score = np.sort(choice.reshape(N, G, E // G), axis=-1)[..., -2:].sum(-1)
    else:
        choice = s
        group_score = choice.reshape(N, G, E // G).max(-1)
    keep_groups = np.argsort(-group_score, axis=-1)[:, : hf["topk_group"]]
    allowed = np.zeros((N, G), bool)
    np.put_along_axis(allowed, keep_groups, True, axis=-1)
    choice = np.where(np.repeat(allowed, E // G, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1)[:, : hf["num_experts_per_tok"]]
    w = np.take_along_axis(s, idx, axis=-1)
    if hf["norm_topk_prob"]:
        w = w / w.sum(-1, keepdims=True)
    dense = np.zeros((N, E))
    np.put_along_axis(dense, idx, w * hf["routed_scaling_factor"], axis=-1)
    return dense


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ROUTING))
def test_config_json_describes_the_routing(case, tmp_path):
    """Every key engines read has this model's value, and the routing an engine builds from
    config.json + the file's tensors is mlalm's routing; mlalm reads the export back."""
    from safetensors import safe_open

    from mlalm.model.moe import route

    model, cfg = _routed_model(case)
    if case.startswith("softmax"):
        with pytest.warns(UserWarning, match="DeepseekV3ForCausalLM always routes with sigmoid"):
            save_pretrained(model, cfg, str(tmp_path), eos_token_id=EOS)
    else:
        save_pretrained(model, cfg, str(tmp_path), eos_token_id=EOS)
    hf = json.load(open(tmp_path / "config.json"))
    expected = {**COMMON, **ROUTING[case]["keys"]}
    assert {k: hf.get(k, "<absent>") for k in expected} == expected
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}

    x = np.random.default_rng(5).standard_normal((64, 48))
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        for layer, moe in zip((1, 2), model.moe_layers()):
            bias_key = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
            assert (bias_key in keys) == (hf["topk_method"] == "noaux_tc")
            bias = f.get_tensor(bias_key).astype(np.float64) if bias_key in keys else None
            gate = f.get_tensor(f"model.layers.{layer}.mlp.gate.weight").astype(np.float64)
            ref = _engine_routing(x, hf, gate, bias)
            idx, w, _ = route(
                jnp.asarray(x, jnp.float32),
                moe.w_router_DE[...],
                moe.bias_E[...],
                **dataclasses.asdict(moe.routing),
            )
            ours = np.zeros_like(ref)
            np.put_along_axis(ours, np.asarray(idx), np.asarray(w, np.float64), axis=-1)
            np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)

    model2, cfg2 = from_pretrained(str(tmp_path))
    assert cfg2.moe.scoring == cfg.moe.scoring and cfg2.model == cfg.model
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 16))
    np.testing.assert_array_equal(
        np.asarray(model2(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens)))
    )


def test_sigmoid_export_without_routing_keys_would_be_misread():
    """The keys matter: without scoring_func an engine defaults to softmax (vLLM, llama.cpp)
    and routes differently; the reference above does see the difference."""
    model, cfg = _routed_model("sigmoid")
    hf = config_to_hf(cfg)
    moe = model.moe_layers()[0]
    x = np.random.default_rng(5).standard_normal((64, 48))
    gate, bias = np.asarray(moe.w_router_DE[...], np.float64).T, np.asarray(moe.bias_E[...], np.float64)
    right = _engine_routing(x, hf, gate, bias)
    wrong = _engine_routing(x, {**hf, "scoring_func": "softmax"}, gate, bias)
    assert np.abs(right - wrong).max() > 0.1


# ---------------------------------------------------------------------------------------
# Token ids: transformers' generate stops at end-of-text
# ---------------------------------------------------------------------------------------

CHAIN = [5, 17, 42, EOS]  # prompt token, then what the rigged model emits after each


def _chain_model():
    """A model whose next token depends only on the current one: attention and FFN outputs
    are zeroed, so the last hidden state is the token's embedding; rows 5, 17, 42 are the
    basis vectors e1, e2, e3 and the head maps e1 -> 17, e2 -> 42, e3 -> EOS (logit
    10·sqrt(48) after the final RMSNorm, every other logit 0)."""
    cfg = _cfg("sigmoid", attention={"q_lora_rank": 16})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and path[-1] in ("wo_NGD", "w_down_FD", "w_down_EFD"):
            var.set_value(jnp.zeros_like(var[...]))
    embed = np.asarray(model.embed_VD[...]).copy()
    head = np.zeros((48, 97), np.float32)
    for i, (tok, nxt) in enumerate(zip(CHAIN[:-1], CHAIN[1:]), start=1):
        embed[tok] = 0.0
        embed[tok, i] = 1.0
        head[i, nxt] = 10.0
    model.embed_VD.set_value(jnp.asarray(embed))
    model.head_DV.set_value(jnp.asarray(head))
    model.final_norm.scale.set_value(jnp.ones((48,), jnp.float32))
    return model, cfg


@pytest.mark.parametrize("with_ids", [True, False])
def test_transformers_generate_stops_at_eos(with_ids, tmp_path):
    model, cfg = _chain_model()
    save_pretrained(model, cfg, str(tmp_path), eos_token_id=EOS if with_ids else None)
    hf_cfg = json.load(open(tmp_path / "config.json"))
    assert hf_cfg["eos_token_id"] == (EOS if with_ids else None)
    assert (tmp_path / "generation_config.json").exists() == with_ids
    if with_ids:
        assert json.load(open(tmp_path / "generation_config.json")) == {"eos_token_id": EOS}
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([CHAIN[:1]]), max_new_tokens=8, do_sample=False, pad_token_id=EOS)[
            0
        ].tolist()
    if with_ids:
        assert out == CHAIN
    else:  # the control: without the id the rigged model runs on past EOS
        assert out[:4] == CHAIN and len(out) == 1 + 8


# ---------------------------------------------------------------------------------------
# File modes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_export_files_get_normal_permissions(umask, mode, tmp_path):
    import os
    import stat

    model, cfg = _routed_model("sigmoid")
    old = os.umask(umask)
    try:
        save_pretrained(model, cfg, str(tmp_path), eos_token_id=EOS)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


# ---------------------------------------------------------------------------------------
# from_pretrained checks shapes before allocating
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            {"vocab_size": 10_000_000},
            r"tensor 'model.embed_tokens.weight' has shape \[97, 48\] in model.safetensors, "
            r"config.json implies \[10000000, 48\]",
        ),
        (
            {"kv_lora_rank": 21},
            r"tensor 'model.layers.0.self_attn.kv_a_proj_with_mqa.weight' has shape \[28, 48\] "
            r"in model.safetensors, config.json implies \[29, 48\]",
        ),
        (
            {"moe_intermediate_size": 4096},
            r"tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' has shape \[24, 48\] "
            r"in model.safetensors, config.json implies \[4096, 48\]",
        ),
    ],
)
def test_tampered_config_fails_before_building_the_model(tamper, message, tmp_path, monkeypatch):
    import mlalm.model

    model, cfg = _routed_model("sigmoid")
    save_pretrained(model, cfg, str(tmp_path))
    hf = json.load(open(tmp_path / "config.json"))
    json.dump({**hf, **tamper}, open(tmp_path / "config.json", "w"))
    built = []
    monkeypatch.setattr(mlalm.model, "Transformer", lambda *a, **k: built.append(1))
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(str(tmp_path))
    assert not built, "the model was built before the shapes were checked"
    assert "\n" not in str(info.value)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    model, cfg = _routed_model("sigmoid")
    save_pretrained(model, cfg, str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.2.mlp.shared_experts.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.2.mlp.shared_experts.up_proj.weight'"):
        from_pretrained(str(tmp_path))
