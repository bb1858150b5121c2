"""The data section of the config: every key validated with a message naming it."""

import pytest

from mlalm.config import from_dict
from mlalm.errors import ConfigError


def test_defaults_and_accepted_values(tmp_path):
    d = from_dict({}).data
    assert (d.tokenizer, d.max_memory, d.prepare_workers, d.shard_mb, d.mix) == ("byte", "2GB", 0, 256, None)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    d = from_dict(
        {
            "data": {
                "tokenizer": str(tok),
                "eos_token": "</s>",
                "max_memory": 3 * 10**9,
                "mix": [{"path": "a", "weight": 1}, {"path": "b", "weight": 0.25}],
            }
        }
    ).data
    assert d.tokenizer == str(tok) and d.max_memory == "3000000000"
    assert d.mix == ({"path": "a", "weight": 1}, {"path": "b", "weight": 0.25})
    # the config stays hashable (a model keeps it as a static attribute that jit hashes)
    mixed = from_dict({"data": {"mix": [{"path": "a", "weight": 1}]}})
    assert hash(mixed) == hash(from_dict({"data": {"mix": [{"path": "a", "weight": 1}]}}))
    assert from_dict(mixed.to_dict()) == mixed  # and survives its own dict (YAML) form


@pytest.mark.parametrize(
    "data,match",
    [
        ({"tokenizer": "wordpiece"}, r"data\.tokenizer: 'wordpiece' is not 'byte', 'bpe'"),
        ({"tokenizer": "/no/such/tokenizer.json"}, r"data\.tokenizer"),
        ({"prefetch": -1}, r"data\.prefetch must be >= 0, got -1"),
        ({"num_workers": -2}, r"data\.num_workers must be >= 0"),
        ({"prepare_workers": -1}, r"data\.prepare_workers must be >= 0"),
        ({"shard_mb": 0}, r"data\.shard_mb must be >= 1"),
        ({"max_memory": "lots"}, r"data\.max_memory='lots'"),
        ({"max_memory": "0GB"}, r"data\.max_memory"),
        ({"val_fraction": 0.0}, r"data\.val_fraction must be in \(0, 1\)"),
        ({"text_key": ""}, r"data\.text_key"),
        ({"eos_token": ""}, r"data\.eos_token"),
        ({"mix": []}, r"data\.mix is empty"),
        ({"mix": [{"path": "a"}]}, r"data\.mix\[0\]: expected \{path: DIR, weight: w\}"),
        ({"mix": [{"path": "a", "weight": 1, "extra": 2}]}, r"data\.mix\[0\]"),
        ({"mix": ["a"]}, r"data\.mix\[0\]"),
        ({"mix": [{"path": "a", "weight": 1}, {"path": "b", "weight": 0}]}, r"data\.mix\[1\]\.weight"),
        ({"mix": [{"path": "a", "weight": -1}]}, r"data\.mix\[0\]\.weight"),
        ({"mix": [{"path": "a", "weight": float("inf")}]}, r"data\.mix\[0\]\.weight"),
        ({"mix": [{"path": "a", "weight": True}]}, r"data\.mix\[0\]\.weight"),
        ({"mix": [{"path": "", "weight": 1}]}, r"data\.mix\[0\]\.path"),
        ({"mix": [{"path": "a", "weight": 1}], "path": "b"}, r"data\.mix and data\.path exclude"),
    ],
)
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"data": data})
