"""mlalm's Llama/Mistral import and export against transformers' LlamaForCausalLM and
MistralForCausalLM (an independent implementation)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlalm import CheckpointError, ConfigError  # noqa: E402
from mlalm.config import from_dict  # noqa: E402
from mlalm.llama import config_from_hf, from_pretrained, save_pretrained  # noqa: E402
from mlalm.model import Transformer  # noqa: E402

# head_dim 16 with hidden 48 and 4 heads: N·H = 64 != hidden, which mlalm expresses
BASE = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
)

CASES = {
    "gqa": ("llama", dict(num_key_value_heads=2)),
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "mha": ("llama", dict(num_key_value_heads=4)),
    "tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "head_dim_default": ("llama", dict(num_key_value_heads=2, head_dim=None, hidden_size=64)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    # a window as long as every position never masks anything
    "mistral_long_window": ("mistral", dict(num_key_value_heads=1, sliding_window=64)),
}
KINDS = {1: "mqa", 2: "gqa", 4: "mha"}  # by num_key_value_heads, of 4 query heads


def _hf_model(model_type, overrides, seed=1):
    config_cls = transformers.LlamaConfig if model_type == "llama" else transformers.MistralConfig
    model_cls = transformers.LlamaForCausalLM if model_type == "llama" else transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # random everything, norms included
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.config._attn_implementation = "eager"
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(2, 24))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_equals_transformers(case, tokens, tmp_path):
    model_type, overrides = CASES[case]
    hf = _hf_model(model_type, overrides)
    hf.save_pretrained(tmp_path)
    model, cfg = from_pretrained(str(tmp_path))
    assert cfg.moe.n_routed_experts == 0
    assert cfg.attention.kind == KINDS[overrides["num_key_value_heads"]]
    assert cfg.n_kv_heads == overrides["num_key_value_heads"]
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _hf_logits(hf, tokens)
    diff = np.abs(ours - ref).max()
    print(f"{case}: max |logit diff| vs transformers = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


def _mlalm_model(kind, n_kv_heads=None, tie=False, seed=3):
    attention = {"kind": kind, "n_heads": 4, "head_dim": 16}
    if n_kv_heads:
        attention["n_kv_heads"] = n_kv_heads
    cfg = from_dict(
        {
            "model": dict(
                vocab_size=97,
                d_model=48,
                n_layers=2,
                ffn_dim=80,
                max_seq_len=64,
                norm_eps=1e-5,
                rope_theta=5000.0,
                tie_embeddings=tie,
                init_std=0.1,
            ),
            "attention": attention,
            "train": dict(seq_len=32),
        }
    )
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    for block in model.blocks:  # norms away from 1, so that a swapped norm shows
        for norm in (block.attn_norm, block.ffn_norm):
            norm.scale.set_value(jnp.linspace(0.8, 1.2, cfg.model.d_model))
    return model, cfg


@pytest.mark.parametrize(
    "kind, n_kv_heads, tie, model_type",
    [("gqa", 2, False, "llama"), ("mqa", None, True, "llama"), ("mha", None, False, "mistral")],
)
def test_export_round_trip(kind, n_kv_heads, tie, model_type, tokens, tmp_path):
    """mlalm -> save_pretrained -> transformers gives mlalm's logits; -> from_pretrained
    gives the same parameters (bit for bit)."""
    model, cfg = _mlalm_model(kind, n_kv_heads, tie)
    save_pretrained(model, cfg, str(tmp_path), eos_token_id=96, model_type=model_type)
    written = json.load(open(tmp_path / "config.json"))
    assert written["model_type"] == model_type and written["eos_token_id"] == 96
    assert json.load(open(tmp_path / "generation_config.json")) == {"eos_token_id": 96}
    cls = transformers.LlamaForCausalLM if model_type == "llama" else transformers.MistralForCausalLM
    hf = cls.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ours = np.asarray(model(jnp.asarray(tokens)))
    diff = np.abs(ours - _hf_logits(hf, tokens)).max()
    print(f"{kind}: round-trip max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    model2, cfg2 = from_pretrained(str(tmp_path))
    assert cfg2.model == cfg.model and cfg2.attention == cfg.attention
    np.testing.assert_array_equal(np.asarray(model2(jnp.asarray(tokens))), ours)


def test_export_files_and_dtype(tmp_path):
    model, cfg = _mlalm_model("gqa", 2)
    save_pretrained(model, cfg, str(tmp_path), dtype="bfloat16")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask, name
    assert not (tmp_path / "generation_config.json").exists()  # no token ids given
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    model2, cfg2 = from_pretrained(str(tmp_path))
    assert cfg2.model.param_dtype == "bfloat16"
    ref = np.asarray(jnp.asarray(model.blocks[0].attn.wq_DNH[...], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(model2.blocks[0].attn.wq_DNH[...], np.float32), ref)


@pytest.mark.parametrize(
    "overrides, moe, message",
    [
        ({"attention": {"kind": "mla"}}, {}, "attention.kind=mla"),
        ({"attention": {"kind": "gqa", "n_kv_heads": 2}}, {"n_routed_experts": 4}, "no MoE"),
        ({"attention": {"kind": "mqa"}, "model": {"vocab_size": 50, "mtp_depth": 1}}, {}, "multi-token"),
    ],
)
def test_export_refuses_what_the_format_cannot_say(overrides, moe, message, tmp_path):
    raw = {"model": {"vocab_size": 50}, **overrides, "moe": moe}
    cfg = from_dict(raw)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=message) as e:
        save_pretrained(model, cfg, str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


HF = {**BASE, "model_type": "llama", "num_key_value_heads": 2}


@pytest.mark.parametrize(
    "change, names",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "llama3"),
        (
            {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2}},
            "linear",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial",
        ),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"model_type": "qwen2"}, "qwen2"),
    ],
)
def test_unsupported_feature_is_one_line(change, names):
    with pytest.raises(ConfigError, match=names) as e:
        config_from_hf({**HF, **change})
    assert "\n" not in str(e.value)


@pytest.fixture
def saved_gqa(tmp_path):
    _hf_model("llama", dict(num_key_value_heads=2)).save_pretrained(tmp_path)
    return tmp_path


def test_unsupported_feature_refused_before_reading_weights(saved_gqa):
    cfg = json.load(open(saved_gqa / "config.json"))
    json.dump({**cfg, "attention_bias": True}, open(saved_gqa / "config.json", "w"))
    with pytest.raises(ConfigError, match="attention_bias"):
        from_pretrained(str(saved_gqa))


def _rewrite(path, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    save_file(fn(dict(tensors)), str(path / "model.safetensors"), metadata={"format": "pt"})


def test_extra_tensor_is_refused(saved_gqa):
    _rewrite(saved_gqa, lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' is not part"):
        from_pretrained(str(saved_gqa))


def test_shape_mismatch_names_the_tensor(saved_gqa):
    cfg = json.load(open(saved_gqa / "config.json"))
    json.dump({**cfg, "intermediate_size": 96}, open(saved_gqa / "config.json", "w"))
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[80, 48\]"
    ):
        from_pretrained(str(saved_gqa))


def test_missing_tensor_is_named(saved_gqa):
    _rewrite(saved_gqa, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        from_pretrained(str(saved_gqa))


def test_tied_head_must_equal_the_embedding(tmp_path):
    _hf_model("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1.0})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        from_pretrained(str(tmp_path))


@pytest.mark.slow
def test_cli_exports_a_trained_gqa_run_as_llama(corpus_file, tmp_path, capsys):
    """scripts/export.py --format llama on a trained GQA run: transformers'
    LlamaForCausalLM gives the run's logits, and mlalm.hf.from_pretrained (which hands
    Llama directories to mlalm.llama) reads the parameters back bit for bit.  --format hf
    on the same run names --format llama."""
    import importlib.util

    from conftest import ROOT, tiny
    from mlalm import hf
    from mlalm.inference import load_for_inference
    from mlalm.train import train

    cfg = tiny(
        model={"vocab_size": None},
        attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8},
        moe={"n_routed_experts": 0},
        data={"path": corpus_file, "cache_dir": str(tmp_path / "cache")},
        train={"steps": 3, "run_dir": str(tmp_path / "runs"), "name": "r", "progress": False},
        checkpoint={"async_save": False},
    )
    train(cfg, log=lambda *a: None)
    run = str(tmp_path / "runs" / "r")
    spec = importlib.util.spec_from_file_location("export_cli", os.path.join(ROOT, "scripts", "export.py"))
    export_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_cli)

    assert export_cli.main([run, str(tmp_path / "deepseek"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "attention.kind=mla" in err and "use --format llama" in err and err.count("\n") == 1

    out = str(tmp_path / "llama")
    assert export_cli.main([run, out, "--format", "llama"]) == 0
    model, _, tokenizer = load_for_inference(run)
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["model_type"] == "llama" and written["eos_token_id"] == tokenizer.eos_id
    tokens = np.random.default_rng(3).integers(0, written["vocab_size"], size=(2, 16))
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _hf_logits(transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager"), tokens)
    assert np.abs(ours - ref).max() <= 1e-4
    model2, cfg2 = hf.from_pretrained(out)
    assert cfg2.attention.kind == "gqa" and cfg2.attention.n_kv_heads == 2
    np.testing.assert_array_equal(np.asarray(model2(jnp.asarray(tokens))), ours)
