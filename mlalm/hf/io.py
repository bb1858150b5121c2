"""Reading and writing DeepSeek-V3 checkpoint directories (``mlalm.hf``); the safetensors
access and directory writing ``mlalm.llama`` shares."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.config import Config
from mlalm.errors import CheckpointError
from mlalm.hf.config import config_from_hf, config_to_hf
from mlalm.hf.mapping import _mapping, _module_at, _mtp_copies


class Tensors:
    """Lazy access to a directory's safetensors files, with clear errors."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files")
        self.path = path
        self.key_file = {}
        self.handles = {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise CheckpointError(f"{path}: shard {fname} named in the index is missing")
            try:
                h = safe_open(full, framework="numpy")
            except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
                raise CheckpointError(f"{full}: not a readable safetensors file ({e})") from None
            self.handles[fname] = h
            for k in h.keys():
                self.key_file[k] = fname
        self.used = set()

    def has(self, key):
        return key in self.key_file

    def shape(self, key) -> tuple:
        """The tensor's shape from its file's header (no data is read)."""
        if key not in self.key_file:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor '{key}'")
        return tuple(self.handles[self.key_file[key]].get_slice(key).get_shape())

    def __call__(self, key):
        if key not in self.key_file:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor '{key}'")
        self.used.add(key)
        return self.handles[self.key_file[key]].get_tensor(key)


def _expected_shapes(tensors: Tensors, cfg: Config, interleave: bool, routing_bias: bool) -> dict:
    """{key: shape} of every tensor ``cfg`` reads (the MTP layers' copies included)."""
    m = cfg.model
    shapes = {}
    for *_, hf_shapes in _mapping(cfg, interleave, routing_bias=routing_bias):
        shapes.update(hf_shapes(tensors.has))
    for key, *_ in _mtp_copies(cfg):
        shapes[key] = (m.d_model,) if key.endswith("shared_head.norm.weight") else (m.vocab_size, m.d_model)
    return shapes


def check_shapes(
    tensors: Tensors, cfg: Config, *, interleave: bool = True, routing_bias: bool = True
) -> None:
    """CheckpointError naming the first tensor whose header shape is not the one ``cfg``
    implies (or that is missing); reads the safetensors headers only."""
    for key, expected in _expected_shapes(tensors, cfg, interleave, routing_bias).items():
        found = tensors.shape(key)
        if found != tuple(expected):
            raise CheckpointError(
                f"{tensors.path}: tensor '{key}' has shape {list(found)} in "
                f"{tensors.key_file[key]}, config.json implies {list(expected)}"
            )


def read_config(path: str) -> dict:
    """A checkpoint directory's config.json (CheckpointError when absent or not JSON)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (is this a transformers checkpoint directory?)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def load_config(path: str, base: Config | None = None) -> Config:
    """The mlalm Config of a checkpoint directory's config.json: DeepSeek-V3, or Llama and
    Mistral (``mlalm.llama``) by its ``model_type``."""
    from mlalm import llama

    hf_cfg = read_config(path)
    if hf_cfg.get("model_type") in llama.MODEL_TYPES:
        return llama.config_from_hf(hf_cfg, base)
    return config_from_hf(hf_cfg, base)


def from_pretrained(path: str, *, base: Config | None = None, dtype: str | None = None, mtp: bool = True):
    """Load a transformers DeepSeek-V3 directory into an mlalm model (a Llama or Mistral
    directory, by config.json's ``model_type``, through ``mlalm.llama.from_pretrained``).

    Every tensor shape is checked against config.json (from the safetensors headers)
    before the model is built.

    Args:
        path: directory with config.json and *.safetensors.
        base: optional Config whose non-model sections (train, optim, ...) are kept.
        dtype: parameter dtype ('float32' or 'bfloat16'); default the file's or float32.
        mtp: read the ``num_nextn_predict_layers`` MTP layers (model.mtp_depth); False
            loads the main model only.  Files that declare MTP layers but hold no tensor
            of them (what transformers saves, and many published DeepSeek-V3 derivatives)
            load as the main model; a partly present MTP layer is a CheckpointError
            naming the missing tensor.  The copies an MTP layer carries of the
            embedding, final norm and head must equal the main model's (mlalm shares
            them), else CheckpointError.

    Returns:
        (model, cfg)
    """
    from mlalm import llama
    from mlalm.model import Transformer

    hf_cfg = read_config(path)
    if hf_cfg.get("model_type") in llama.MODEL_TYPES:  # no MTP layers there
        return llama.from_pretrained(path, base=base, dtype=dtype)
    tensors = Tensors(path)
    depth = (hf_cfg.get("num_nextn_predict_layers") or 0) if mtp else 0
    prefix = f"model.layers.{hf_cfg.get('num_hidden_layers', 0)}."
    if depth and not any(k.startswith(prefix) for k in tensors.key_file):
        depth = 0  # declared but not saved (transformers writes no MTP layer): the main model
    cfg = config_from_hf(hf_cfg, base, mtp_depth=depth)
    file_dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    pd = dtype or ("bfloat16" if file_dtype == "bfloat16" else "float32")
    cfg = replace(cfg, model=replace(cfg.model, param_dtype=pd))
    interleave = bool(hf_cfg.get("rope_interleave", True))
    # greedy routing has no correction bias: a file written so carries none (zeros)
    routing_bias = (hf_cfg.get("topk_method") or "noaux_tc") == "noaux_tc"
    check_shapes(tensors, cfg, interleave=interleave, routing_bias=routing_bias)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for mpath, attr, _, from_hf, _ in _mapping(cfg, interleave, routing_bias=routing_bias):
        var = getattr(_module_at(model, mpath), attr)
        value = np.asarray(from_hf(tensors), dtype=np.float32)
        if value.shape != var[...].shape:
            raise CheckpointError(
                f"{path}: tensor for {'.'.join(map(str, mpath))}.{attr} has shape "
                f"{value.shape}, the config implies {var[...].shape}"
            )
        var.set_value(jnp.asarray(value, dtype=var[...].dtype))
    for key, mpath, attr, to_hf in _mtp_copies(cfg):
        main = to_hf(np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32))
        if not np.array_equal(np.asarray(tensors(key), dtype=np.float32), main):
            raise CheckpointError(
                f"{path}: tensor '{key}' differs from the main model's {attr} "
                f"({'.'.join(p for p in mpath if p) or 'model'}): mlalm's MTP modules share the "
                f"embedding, final norm and head with the main model; load with mtp=False to "
                f"read the main model only"
            )
    return model, cfg


def file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file: 0o666 minus the process umask."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def save_pretrained(
    model,
    cfg: Config,
    path: str,
    *,
    dtype: str | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write config.json + model.safetensors (+ generation_config.json) for transformers'
    DeepseekV3ForCausalLM and serving engines.

    Args:
        dtype: 'float32' or 'bfloat16' for the weights (default the model's param_dtype).
        eos_token_id: the end-of-text id (mlalm tokenizers: ``tokenizer.eos_id``), so that
            transformers' ``generate`` and serving engines stop there.
        bos_token_id, pad_token_id: written when given (mlalm tokenizers have neither).

    The token ids go to config.json and, when any is given, to generation_config.json,
    which transformers' ``from_pretrained`` loads as the model's generation defaults and
    vLLM reads for its stop tokens.  Files get the permissions ``open()`` would give
    (0o666 minus the umask).  A softmax-routed model is written with
    ``scoring_func: softmax`` (see :func:`config_to_hf`), which transformers' DeepSeek-V3
    ignores: a UserWarning says so.
    """
    routing_bias = any(bool(np.any(np.asarray(moe.bias_E[...]) != 0)) for moe in model.moe_layers())
    hf_cfg = config_to_hf(
        cfg,
        routing_bias=routing_bias,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )  # raises before writing
    if cfg.moe.n_routed_experts and cfg.moe.scoring == "softmax":
        extra = (
            " SGLang applies sigmoid whenever topk_method=noaux_tc (this model has a non-zero routing bias)."
            if hf_cfg["topk_method"] == "noaux_tc"
            else ""
        )
        warnings.warn(
            "moe.scoring=softmax: config.json says scoring_func=softmax, which vLLM, SGLang "
            "and llama.cpp read, but transformers' DeepseekV3ForCausalLM always routes with "
            "sigmoid and will not reproduce this model." + extra,
            UserWarning,
            stacklevel=2,
        )
    np_dtype = np.float32
    if (dtype or cfg.model.param_dtype) == "bfloat16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "bfloat16"
    else:
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "float32"
    tensors = {}
    # noaux_tc readers create the bias parameter and need the tensor, zero or not
    write_bias = hf_cfg["topk_method"] == "noaux_tc"
    for mpath, attr, to_hf, _, _ in _mapping(cfg, interleave=True, routing_bias=write_bias):
        value = np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32)
        for k, v in to_hf(value).items():
            keep32 = k.endswith("e_score_correction_bias")  # transformers keeps it in float32
            tensors[k] = np.ascontiguousarray(v.astype(np.float32 if keep32 else np_dtype))
    for k, mpath, attr, to_hf in _mtp_copies(cfg):
        value = np.asarray(getattr(_module_at(model, mpath), attr)[...], dtype=np.float32)
        tensors[k] = np.ascontiguousarray(to_hf(value).astype(np_dtype))
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    write_checkpoint_dir(tensors, hf_cfg, path, ids)


def write_checkpoint_dir(tensors: dict, hf_cfg: dict, path: str, token_ids: dict) -> None:
    """model.safetensors (written whole, then renamed into place), config.json and, when a
    token id is not None, generation_config.json (transformers' generation defaults, vLLM's
    stop tokens).  Files get the permissions ``open()`` would give (0o666 minus the umask)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, file_mode())  # safetensors creates its file 0o600
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    ids = {k: v for k, v in token_ids.items() if v is not None}
    if ids:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(ids, f, indent=2)
