"""mlalm's model against transformers' DeepseekV3ForCausalLM (an independent implementation)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlalm import ConfigError  # noqa: E402
from mlalm.config import from_dict  # noqa: E402
from mlalm.hf import config_to_hf, from_pretrained, save_pretrained  # noqa: E402
from mlalm.model import Transformer  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            max_position_embeddings=64, rms_norm_eps=1e-6, hidden_act="silu",
            attention_bias=False, tie_word_embeddings=False, rope_interleave=True)

CASES = {
    # q LoRA on, group-limited routing, one dense layer, norm_topk_prob on, scaling 2.5
    "qlora_groups": dict(q_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                         norm_topk_prob=True, routed_scaling_factor=2.5),
    # q LoRA off, no groups, two dense layers, norm_topk_prob off, two shared experts
    "noqlora_plain": dict(q_lora_rank=None, n_routed_experts=6, n_shared_experts=2,
                          num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2,
                          norm_topk_prob=False, routed_scaling_factor=1.7),
    # q LoRA on, groups, no dense layer, tied embeddings, non-interleaved rope declared
    "tied_noninterleaved": dict(q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
                                num_experts_per_tok=2, n_group=2, topk_group=1,
                                first_k_dense_replace=0, norm_topk_prob=True,
                                routed_scaling_factor=0.8, tie_word_embeddings=True,
                                rope_interleave=False),
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
    cfg = from_dict({
        "model": dict(vocab_size=97, d_model=48, n_layers=3, ffn_dim=80, max_seq_len=64),
        "attention": dict(kind="mla", n_heads=4, q_lora_rank=c["q_lora_rank"] or 0,
                          kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10),
        "moe": dict(n_routed_experts=c["n_routed_experts"], n_shared_experts=c["n_shared_experts"],
                    top_k=c["num_experts_per_tok"], expert_ffn_dim=24, n_group=c["n_group"],
                    topk_group=c["topk_group"], first_k_dense_replace=c["first_k_dense_replace"],
                    norm_topk_prob=c["norm_topk_prob"],
                    routed_scaling_factor=c["routed_scaling_factor"], dispatch="dropless"),
        "train": dict(seq_len=32),
    })
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


@pytest.mark.parametrize("overrides, message", [
    ({"attention": {"kind": "gqa", "n_kv_heads": 2}}, "only expresses MLA"),
    ({"attention": {"kind": "mha"}}, "only expresses MLA"),
    ({"moe": {"n_routed_experts": 4, "scoring": "softmax"}}, "sigmoid"),
])
def test_inexpressible_config_is_refused(overrides, message):
    cfg = from_dict({"model": {"vocab_size": 50}, **overrides})
    with pytest.raises(ConfigError, match=message):
        config_to_hf(cfg)
