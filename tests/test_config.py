"""mlalm.config: every ConfigError path, YAML + dotted overrides, describe_keys."""

import dataclasses
import glob
import os
import re
import typing

import pytest

from mlalm.config import (
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    TrainConfig,
    describe_keys,
    from_dict,
    load_config,
    parse_overrides,
)
from mlalm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_configs_load(path):
    """Every config in configs/ loads: no unknown key, wrong type or inconsistent value (each
    raises ConfigError), and its base chain resolves."""
    assert isinstance(load_config(path), Config)


# A small, valid MoE config that the error cases below perturb one key at a time.
MOE_OK = {"n_routed_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 2}


def _raises(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(raw)


# ---------------------------------------------------------------------------------------
# Sanity: the defaults and a small valid config load (so the error tests below fail only
# because of the key they perturb).
# ---------------------------------------------------------------------------------------


def test_defaults_and_valid_config_load():
    assert from_dict({}) == Config()
    cfg = from_dict(
        {
            "model": {"d_model": 64, "n_layers": 2},
            "moe": dict(MOE_OK),
            "attention": {"kind": "gqa", "n_heads": 8, "n_kv_heads": 2},
        }
    )
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 2
    assert cfg.n_kv_heads == 2
    assert cfg.moe.n_group == 4
    # untouched keys keep their defaults
    assert cfg.model.ffn_dim == ModelConfig().ffn_dim
    assert cfg.optim == OptimConfig()


# ---------------------------------------------------------------------------------------
# Unknown sections / keys, with did-you-mean
# ---------------------------------------------------------------------------------------


def test_unknown_section_suggests_close_match():
    _raises({"modle": {"d_model": 64}}, r"unknown config section 'modle'; did you mean 'model'\?")


def test_unknown_section_without_close_match_lists_valid():
    with pytest.raises(ConfigError, match=r"unknown config section 'zzzzz'") as e:
        from_dict({"zzzzz": {}})
    assert "did you mean" not in str(e.value)
    for section in ("model", "attention", "moe", "optim", "data", "train", "checkpoint", "mesh"):
        assert section in str(e.value)


def test_unknown_key_suggests_close_match():
    _raises({"model": {"n_layer": 3}}, r"unknown config key 'model\.n_layer'; did you mean 'n_layers'\?")
    _raises(
        {"attention": {"kv_lora_rnk": 3}},
        r"unknown config key 'attention\.kv_lora_rnk'; did you mean 'kv_lora_rank'\?",
    )


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'moe\.qwertyuiop'") as e:
        from_dict({"moe": {"qwertyuiop": 1}})
    assert "did you mean" not in str(e.value)


def test_section_must_be_mapping():
    _raises({"model": 3}, r"section 'model' must be a mapping of keys")
    _raises([1, 2], r"config: expected a mapping of sections, got list")


# ---------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"model": {"d_model": "wide"}}, r"model\.d_model: expected an integer, got 'wide'"),
        ({"model": {"n_layers": 2.5}}, r"model\.n_layers: expected an integer, got 2\.5"),
        ({"model": {"n_layers": True}}, r"model\.n_layers: expected an integer, got True"),
        ({"model": {"tie_embeddings": 1}}, r"model\.tie_embeddings: expected true or false, got 1"),
        ({"train": {"progress": "yes"}}, r"train\.progress: expected true or false, got 'yes'"),
        ({"attention": {"kind": "foo"}}, r"attention\.kind: 'foo' is not one of 'mla', 'mha', 'gqa', 'mqa'"),
        ({"model": {"dtype": "float16"}}, r"model\.dtype: 'float16' is not one of"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got 'fast'"),
        ({"optim": {"lr": False}}, r"optim\.lr: expected a number, got False"),
        ({"data": {"path": True}}, r"data\.path: expected a string, got True"),
        ({"attention": {"n_kv_heads": "two"}}, r"attention\.n_kv_heads: expected an integer, got 'two'"),
    ],
)
def test_wrong_types(raw, match):
    _raises(raw, match)


def test_gentle_coercions():
    cfg = from_dict(
        {
            "model": {"d_model": 64.0, "rope_theta": 500000, "tie_embeddings": True},
            "optim": {"lr": "3e-4"},
            "data": {"path": 123},
        }
    )
    assert cfg.model.d_model == 64 and type(cfg.model.d_model) is int
    assert cfg.model.rope_theta == 500000.0 and type(cfg.model.rope_theta) is float
    assert cfg.optim.lr == pytest.approx(3e-4) and type(cfg.optim.lr) is float
    assert cfg.data.path == "123"
    assert cfg.model.tie_embeddings is True


# ---------------------------------------------------------------------------------------
# Attention consistency
# ---------------------------------------------------------------------------------------


def test_gqa_heads_not_divisible_lists_valid_kv_heads():
    _raises(
        {"attention": {"kind": "gqa", "n_heads": 12, "n_kv_heads": 5}},
        re.escape(
            "attention.n_heads (12) must be divisible by attention.n_kv_heads (5); "
            "valid n_kv_heads: [1, 2, 3, 4, 6, 12]"
        ),
    )


def test_gqa_nonpositive_kv_heads():
    _raises(
        {"attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 0}},
        re.escape("valid n_kv_heads: [1, 2, 4]"),
    )


def test_gqa_requires_n_kv_heads():
    _raises(
        {"attention": {"kind": "gqa", "n_heads": 8}},
        r"attention\.n_kv_heads must be set for attention\.kind=gqa",
    )


@pytest.mark.parametrize("kind, n_kv, want", [("mha", 2, 8), ("mqa", 2, 1), ("mqa", 8, 1)])
def test_mha_mqa_contradicting_kv_heads(kind, n_kv, want):
    _raises(
        {"attention": {"kind": kind, "n_heads": 8, "n_kv_heads": n_kv}},
        re.escape(f"attention.n_kv_heads={n_kv} contradicts attention.kind={kind} (which has {want})"),
    )


@pytest.mark.parametrize("kind, n_kv", [("mha", 8), ("mqa", 1)])
def test_mha_mqa_consistent_kv_heads_accepted(kind, n_kv):
    cfg = from_dict({"attention": {"kind": kind, "n_heads": 8, "n_kv_heads": n_kv}})
    assert cfg.n_kv_heads == n_kv


def test_odd_rope_dims():
    _raises(
        {"attention": {"kind": "mla", "qk_rope_head_dim": 7}},
        r"attention\.qk_rope_head_dim must be even for rotary embeddings, got 7",
    )
    for kind in ("mha", "mqa"):
        _raises(
            {"attention": {"kind": kind, "head_dim": 15}},
            r"attention\.head_dim must be even for rotary embeddings, got 15",
        )
    _raises(
        {"attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "head_dim": 9}},
        r"attention\.head_dim must be even",
    )
    # head_dim is irrelevant to MLA, qk_rope_head_dim irrelevant to MHA
    from_dict({"attention": {"kind": "mla", "head_dim": 15}})
    from_dict({"attention": {"kind": "mha", "qk_rope_head_dim": 7}})


def test_mla_nonnegative_and_positive_dims():
    _raises(
        {"attention": {"kind": "mla", "kv_lora_rank": 0}}, r"attention\.kv_lora_rank must be positive, got 0"
    )
    _raises(
        {"attention": {"kind": "mla", "q_lora_rank": -1}},
        r"attention\.qk_nope_head_dim and attention\.q_lora_rank must be >= 0",
    )


def test_positive_keys():
    _raises({"model": {"d_model": 0}}, r"model\.d_model must be positive, got 0")
    _raises({"model": {"vocab_size": -3}}, r"model\.vocab_size must be positive, got -3")


# ---------------------------------------------------------------------------------------
# MoE consistency
# ---------------------------------------------------------------------------------------


def test_top_k_larger_than_experts():
    _raises(
        {"moe": {"n_routed_experts": 4, "top_k": 5}},
        r"moe\.top_k=5 must be between 1 and moe\.n_routed_experts=4",
    )
    _raises({"moe": {"n_routed_experts": 4, "top_k": 0}}, r"moe\.top_k=0 must be between 1")


def test_experts_not_divisible_by_groups():
    _raises(
        {"moe": {"n_routed_experts": 10, "n_group": 4, "topk_group": 2, "top_k": 2}},
        r"moe\.n_routed_experts=10 must be divisible by moe\.n_group=4",
    )


def test_topk_group_above_n_group():
    _raises({"moe": {**MOE_OK, "topk_group": 5}}, r"moe\.topk_group=5 must be <= moe\.n_group=4")


def test_group_needs_two_experts():
    _raises(
        {"moe": {"n_routed_experts": 4, "n_group": 4, "topk_group": 2, "top_k": 2}},
        r"moe\.n_routed_experts/moe\.n_group must be >= 2, got 1",
    )


def test_top_k_beyond_reachable_experts():
    # 4 groups of 2 experts, 1 group kept: only 2 experts are reachable
    _raises(
        {"moe": {**MOE_OK, "topk_group": 1, "top_k": 3}},
        r"moe\.top_k=3 exceeds the experts reachable in moe\.topk_group=1 groups of 2",
    )
    from_dict({"moe": {**MOE_OK, "topk_group": 2, "top_k": 4}})  # exactly reachable


def test_softmax_with_groups_and_dense_replace():
    _raises(
        {"moe": {**MOE_OK, "scoring": "softmax"}},
        r"moe\.n_group > 1 \(group-limited routing\) needs moe\.scoring=sigmoid",
    )
    _raises(
        {"model": {"n_layers": 2}, "moe": {**MOE_OK, "first_k_dense_replace": 3}},
        r"moe\.first_k_dense_replace=3 must be in \[0, model\.n_layers=2\]",
    )
    _raises(
        {"moe": {"bias_update_rate": -1e-3}}, r"moe\.bias_update_rate and moe\.seq_aux_loss_coef must be >= 0"
    )


def test_moe_checks_skipped_when_dense():
    # top_k > n_routed_experts does not matter while MoE is off
    cfg = from_dict({"moe": {"n_routed_experts": 0, "top_k": 7}})
    assert not cfg.is_moe_layer(0)


# ---------------------------------------------------------------------------------------
# Train / optim / data / mesh
# ---------------------------------------------------------------------------------------


def test_seq_len_above_max_seq_len():
    _raises(
        {"model": {"max_seq_len": 64}, "train": {"seq_len": 65}},
        r"train\.seq_len=65 is above model\.max_seq_len=64",
    )
    from_dict({"model": {"max_seq_len": 64}, "train": {"seq_len": 64}})


def test_batch_not_divisible_by_grad_accum():
    _raises(
        {"train": {"batch_size": 10, "grad_accum": 4}},
        r"train\.batch_size=10 must be divisible by train\.grad_accum=4",
    )


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"optim": {"min_lr_ratio": 1.5}}, r"optim\.min_lr_ratio must be in \[0, 1\], got 1\.5"),
        ({"optim": {"decay_fraction": 0}}, r"optim\.decay_fraction must be in \(0, 1\]"),
        ({"optim": {"b2": 1.0}}, r"optim\.b1 and optim\.b2 must be in \[0, 1\)"),
        ({"optim": {"warmup_steps": -1}}, r"optim\.warmup_steps must be >= 0"),
        ({"optim": {"clip_norm": -1}}, r"optim\.clip_norm and optim\.weight_decay must be >= 0"),
        ({"data": {"val_fraction": 1.0}}, r"data\.val_fraction must be in \(0, 1\), got 1\.0"),
        ({"data": {"tokenizer": "bpe", "bpe_vocab_size": 100}}, r"data\.bpe_vocab_size must be at least 260"),
    ],
)
def test_other_range_checks(raw, match):
    _raises(raw, match)


@pytest.mark.parametrize("mesh", [{"data": -1, "fsdp": -1}, {"tensor": 0}, {"expert": -2}])
def test_bad_mesh(mesh):
    _raises({"mesh": mesh}, r"mesh sizes must be positive with at most one -1")


def test_good_mesh():
    cfg = from_dict({"mesh": {"data": 2, "fsdp": -1}})
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, -1)


# ---------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(missing)


def test_invalid_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"config file .*bad\.yaml is not valid YAML"):
        load_config(p)


def test_yaml_file_errors_are_config_errors(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'n_layers'"):
        load_config(p)


@pytest.mark.parametrize(
    "item, match",
    [
        ("foo", r"override 'foo' is not of the form section\.key=value"),
        ("a.b.c=1", r"override key 'a\.b\.c' must be section\.key"),
        ("nodot=1", r"override key 'nodot' must be section\.key"),
        (".d_model=1", r"override key '\.d_model' must be section\.key"),
    ],
)
def test_malformed_overrides(item, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides([item])
    with pytest.raises(ConfigError, match=match):
        load_config(None, [item])


def test_parse_overrides_values_are_yaml():
    out = parse_overrides(
        [
            "model.n_layers=3",
            "optim.lr=3e-4",
            "optim.b1=0.8",
            "model.tie_embeddings=true",
            "data.path=null",
            "data.text_key=body",
            "train.name=",
            "data.cache_dir=a=b",
        ]
    )
    assert out["model"] == {"n_layers": 3, "tie_embeddings": True}
    assert out["optim"]["b1"] == 0.8
    assert out["optim"]["lr"] in ("3e-4", 3e-4)  # YAML 1.1 reads 3e-4 (no dot) as a string
    assert out["data"]["path"] is None
    assert out["data"]["text_key"] == "body"
    assert out["train"]["name"] is None
    assert out["data"]["cache_dir"] == "a=b"  # split at the first '=' only


def test_load_config_yaml_plus_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "model:\n"
        "  d_model: 96\n"
        "  n_layers: 6\n"
        "  tie_embeddings: false\n"
        "attention:\n"
        "  kind: gqa\n"
        "  n_heads: 8\n"
        "  n_kv_heads: 4\n"
        "optim:\n"
        "  lr: 1.0e-3\n"
        "data:\n"
        "  path: corpus.txt\n"
        "train: ~\n"
    )
    cfg = load_config(
        p,
        [
            "model.n_layers=3",
            "optim.lr=3e-4",
            "model.tie_embeddings=true",
            "data.path=null",
            "attention.n_kv_heads=2",
            "optim.b1=0.8",
            "moe.n_routed_experts=4",
            "moe.capacity_factor=2",
        ],
    )
    # overrides win over the file
    assert cfg.model.n_layers == 3 and type(cfg.model.n_layers) is int
    assert cfg.optim.lr == pytest.approx(3e-4) and type(cfg.optim.lr) is float
    assert cfg.model.tie_embeddings is True
    assert cfg.data.path is None
    assert cfg.attention.n_kv_heads == 2 and cfg.n_kv_heads == 2
    assert cfg.optim.b1 == pytest.approx(0.8)
    assert cfg.moe.n_routed_experts == 4
    assert cfg.moe.capacity_factor == 2.0 and type(cfg.moe.capacity_factor) is float
    # file values without an override survive
    assert cfg.model.d_model == 96
    assert cfg.attention.kind == "gqa" and cfg.attention.n_heads == 8
    # untouched keys keep their defaults
    assert cfg.model.ffn_dim == ModelConfig().ffn_dim
    assert cfg.model.rope_theta == ModelConfig().rope_theta
    assert cfg.optim.b2 == OptimConfig().b2
    assert cfg.train == TrainConfig()
    assert cfg.mesh == MeshConfig()
    assert cfg.moe.top_k == MoEConfig().top_k


def test_load_config_file_only_and_defaults(tmp_path):
    assert load_config() == Config()
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()
    p2 = tmp_path / "lr.yaml"
    p2.write_text("optim:\n  lr: 3e-4\n")  # no dot: YAML string, still read as a float
    assert load_config(p2).optim.lr == pytest.approx(3e-4)


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match=r"did you mean 'n_layers'"):
        load_config(None, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match=r"train\.batch_size=10 must be divisible"):
        load_config(None, ["train.batch_size=10", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"attention\.kind: 'foo' is not one of"):
        load_config(None, ["attention.kind=foo"])


# ---------------------------------------------------------------------------------------
# describe_keys
# ---------------------------------------------------------------------------------------


def test_describe_keys_lists_every_field():
    sections = {
        "model": ModelConfig,
        "attention": AttentionConfig,
        "moe": MoEConfig,
        "optim": OptimConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "checkpoint": CheckpointConfig,
        "mesh": MeshConfig,
    }
    assert {f.name for f in dataclasses.fields(Config)} == set(sections)
    want = [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]
    lines = describe_keys().splitlines()
    got = [line.split()[0] for line in lines]
    assert sorted(got) == sorted(want)
    assert len(got) == len(set(got))
    # each line shows the field's default
    by_key = dict(zip(got, lines))
    default = Config()
    for s, cls in sections.items():
        for f in dataclasses.fields(cls):
            line = by_key[f"{s}.{f.name}"]
            assert line.rstrip().endswith(f"default: {getattr(getattr(default, s), f.name)!r}")
            if typing.get_origin(typing.get_type_hints(cls)[f.name]) is typing.Literal:
                for option in typing.get_args(typing.get_type_hints(cls)[f.name]):
                    assert str(option) in line
