"""Reading a conversion's source and writing its params export."""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp

from mlalm.checkpoint import EXPORT_MARKER
from mlalm.config import Config, to_yaml
from mlalm.errors import CheckpointError, ConfigError, DataError


def _hf_type(path: str) -> str | None:
    """The ``model_type`` of a transformers directory (None: not one; an mlalm run,
    checkpoint or params export)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg) or os.path.isfile(os.path.join(path, EXPORT_MARKER)):
        return None
    try:
        with open(cfg) as f:
            return str(json.load(f).get("model_type"))
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cfg}: not a readable config.json ({e})") from None


def _check_hf_type(path: str, model_type: str) -> None:
    from mlalm.llama import MODEL_TYPES

    if model_type == "deepseek_v3":
        raise ConfigError(f"{path} is a DeepSeek-V3 checkpoint: the source model is already MLA")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type {model_type!r} cannot be converted (transformers sources: "
            f"{', '.join(MODEL_TYPES)}; or an mlalm run, checkpoint or params export)"
        )


def source_config(path: str) -> Config:
    """The source's Config, read without loading its weights (for checking a request)."""
    from mlalm.checkpoint import find_checkpoint
    from mlalm.inference import checkpoint_config

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such run, checkpoint, params export or transformers directory")
    model_type = _hf_type(path)
    if model_type is None:
        return checkpoint_config(find_checkpoint(path))
    from mlalm.llama import config_from_hf

    _check_hf_type(path, model_type)
    with open(os.path.join(path, "config.json")) as f:
        return config_from_hf(json.load(f))


def load_source(path: str):
    """(model, cfg, tokenizer) of an mlalm run/checkpoint/export (``load_for_inference``)
    or a Llama/Mistral transformers directory (``mlalm.llama.from_pretrained``, whose
    tokenizer.json becomes the model's tokenizer: ``data.tokenizer`` names it)."""
    from dataclasses import replace

    from mlalm.inference import load_for_inference

    model_type = _hf_type(path)
    if model_type is None:
        return load_for_inference(path)
    from mlalm.data.tokenizers import load_tokenizer
    from mlalm.llama import from_pretrained

    _check_hf_type(path, model_type)
    tok_path = os.path.abspath(os.path.join(path, "tokenizer.json"))
    if not os.path.isfile(tok_path):
        raise CheckpointError(
            f"{path}: no tokenizer.json (the export needs the model's tokenizer; write one with "
            f"transformers' AutoTokenizer.from_pretrained(...).save_pretrained)"
        )
    model, cfg = from_pretrained(path)
    tokenizer = load_tokenizer(tok_path)
    cfg = replace(cfg, data=replace(cfg.data, tokenizer=tok_path, eos_token=tokenizer.eos_token))
    return model, cfg, tokenizer


def calibration_batch(path: str, tokenizer, *, n_tokens: int, seq_len: int) -> np.ndarray:
    """The first ``n_tokens`` tokens of a text file as rows of ``seq_len`` ([B, seq_len] int32)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"--calibration {path}: cannot read it ({e.strerror})") from None
    ids = np.asarray(tokenizer.encode(data if tokenizer.name == "byte" else data.decode("utf-8", "replace")))
    rows = min(len(ids), n_tokens) // seq_len
    if rows < 1:
        raise DataError(
            f"--calibration {path}: {len(ids)} tokens, fewer than one window of {seq_len} (train.seq_len)"
        )
    return ids[: rows * seq_len].reshape(rows, seq_len).astype(np.int32)


def write_export(out_dir: str, model, cfg: Config, tokenizer, *, dtype: str, source: str, meta: dict) -> None:
    """A params export, as ``mlalm.inference.export_params`` writes one (``params/`` Orbax
    item {params, rest}, ``mlalm_params.json``, ``config.yaml``, the tokenizer), with
    ``meta`` added to mlalm_params.json; eval.py, generate.py, export.py and
    ``train.init_from`` read it."""
    import jax

    from mlalm.train.state import split_model

    _, params, rest = split_model(model)
    params = jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, params)
    os.makedirs(out_dir, exist_ok=True)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(os.path.abspath(out_dir), "params"), {"params": params, "rest": rest})
    ck.wait_until_finished()
    record = {
        "format": "mlalm-params",
        "dtype": dtype,
        "source": os.path.abspath(source),
        "config": cfg.to_dict(),
    }
    with open(os.path.join(out_dir, EXPORT_MARKER), "w") as f:
        json.dump({**record, **meta}, f, indent=2)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    tokenizer.save(out_dir)
