"""Loading any run, checkpoint or params export for inference, and the params export.

``load_for_inference(path)`` accepts a run directory (its newest usable checkpoint), a
checkpoint step directory or a ``--format params`` export, and returns the model (MoE
routing dropless), its config and its tokenizer.  ``export_params`` writes the
parameters alone (no optimizer state) in a chosen dtype, with the config and tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mlalm.checkpoint import EXPORT_MARKER, abstract_arrays, find_checkpoint, read_meta
from mlalm.config import Config, from_dict, to_yaml
from mlalm.errors import CheckpointError


def _local_tokenizer(ckpt_dir: str) -> str | None:
    """The tokenizer.json of an export, or of a checkpoint's run directory."""
    for d in (ckpt_dir, os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))):
        p = os.path.join(d, "tokenizer.json")
        if os.path.isfile(p):
            return p
    return None


def checkpoint_config(ckpt_dir: str) -> Config:
    """The resolved config stored with a checkpoint or export.  A ``data.tokenizer`` that
    names a tokenizer.json is replaced by the copy kept beside the checkpoint (the run
    directory's or the export's), so the checkpoint loads where the original file is gone."""
    raw = read_meta(ckpt_dir)["config"]
    tok = (raw.get("data") or {}).get("tokenizer")
    local = _local_tokenizer(ckpt_dir)
    if isinstance(tok, str) and tok not in ("byte", "bpe") and local:
        raw = {**raw, "data": {**raw["data"], "tokenizer": local}}
    return from_dict(raw)


def tokenizer_for(ckpt_dir: str, cfg: Config):
    """The tokenizer a checkpoint was trained with: the tokenizer.json kept beside it (a
    BPE, pretrained or prepared directory's tokenizer), else byte-level."""
    from mlalm.data.tokenizers import get_tokenizer, load_tokenizer

    local = _local_tokenizer(ckpt_dir)
    if local:
        return load_tokenizer(local, eos_token=cfg.data.eos_token)
    if cfg.data.tokenizer != "byte":
        raise CheckpointError(
            f"no tokenizer.json next to {ckpt_dir} or in its run directory "
            f"(the model was trained with data.tokenizer={cfg.data.tokenizer})"
        )
    return get_tokenizer("byte")


def abstract_model(cfg: Config):
    """(graphdef, abstract params, abstract rest) of ``cfg``'s model, without allocating."""
    from mlalm.model import Transformer
    from mlalm.train.state import split_model

    return split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_fits(item_dir: str, expected: dict) -> None:
    """Raise CheckpointError naming the first array whose stored shape differs from the
    model's (or that is missing), from Orbax's metadata alone -- before a restore that
    would fail deep inside its readers."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        meta = ocp.StandardCheckpointer().metadata(os.path.abspath(item_dir))
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore will say why
        return
    finally:
        absl.setLevel(level)
    meta = getattr(meta, "item_metadata", meta)
    # the stored tree: a dict of the saved items (StepMetadata.item_metadata.tree)
    tree = cast("Mapping[str, Any]", getattr(meta, "tree", meta))
    stored = {
        f"{top}/{_path_key(p)}": tuple(x.shape)
        for top in expected
        if top in tree
        for p, x in jax.tree_util.tree_flatten_with_path(tree[top])[0]
    }
    for top, tree in expected.items():
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key, need = f"{top}/{_path_key(p)}", tuple(x.shape)
            have = stored.pop(key, None)
            if have is None:
                raise CheckpointError(
                    f"{item_dir} does not fit its config: {key} (shape {need}) is not in the checkpoint"
                )
            if have != need:
                raise CheckpointError(
                    f"{item_dir} does not fit its config: {key} has shape {have} "
                    f"in the checkpoint, the config's model needs {need}"
                )
    if stored:
        raise CheckpointError(
            f"{item_dir} does not fit its config: the checkpoint has "
            f"{sorted(stored)[0]}, which the config's model does not"
        )


def _cast_abstract(tree, dtype):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if np.issubdtype(x.dtype, np.floating) else x.dtype),
        tree,
    )


def load_params(path: str, *, dtype: str | None = None, dispatch: str | None = "dropless"):
    """``(cfg, graphdef, params, rest, ckpt_dir)`` from any checkpoint ``find_checkpoint`` accepts.

    The parameters and the balancing biases are returned (a training checkpoint's
    optimizer state is read and dropped); ``dtype`` casts floating parameters.
    ``dispatch`` replaces ``moe.dispatch``: inference defaults to dropless routing, so a
    token's output never depends on the other tokens in the batch (capacity dispatch,
    the CPU training default, can drop tokens when an expert is over capacity).
    """
    from mlalm.optim import build_optimizer
    from mlalm.train.state import abstract_state

    ckpt_dir = find_checkpoint(path)
    cfg = checkpoint_config(ckpt_dir)
    if dispatch:
        cfg = replace(cfg, moe=replace(cfg.moe, dispatch=dispatch))
    if os.path.isfile(os.path.join(ckpt_dir, EXPORT_MARKER)):
        graphdef, params, rest = abstract_model(cfg)
        item_dir = os.path.join(ckpt_dir, "params")
        saved = read_meta(ckpt_dir).get("dtype") or "float32"
        target = {"params": _cast_abstract(params, saved), "rest": rest}
    else:  # the train state as the trainer saves it
        item_dir = os.path.join(ckpt_dir, "state")
        tx, _ = build_optimizer(cfg, cfg.train.steps)
        graphdef, target = abstract_state(cfg, tx)
        params, rest = target.params, target.rest
    check_fits(item_dir, {"params": params, "rest": rest})
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.abspath(item_dir), abstract_arrays(target))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"cannot restore {item_dir} into the model its config describes: "
            f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
        ) from None
    if isinstance(restored, dict):
        p, r = restored["params"], restored["rest"]
    else:
        p, r = restored.params, restored.rest
    if dtype:
        p = jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, p)
    return cfg, graphdef, p, r, ckpt_dir


def load_for_inference(path: str, *, dtype: str | None = None, dispatch: str | None = "dropless"):
    """``(model, cfg, tokenizer)`` from a run directory, checkpoint or params export
    (MoE routing dropless unless ``dispatch`` says otherwise; see :func:`load_params`)."""
    cfg, graphdef, params, rest, ckpt_dir = load_params(path, dtype=dtype, dispatch=dispatch)
    return nnx.merge(graphdef, params, rest), cfg, tokenizer_for(ckpt_dir, cfg)


def export_params(path: str, out_dir: str, *, dtype: str = "float32") -> str:
    """Write a parameters-only Orbax checkpoint (no optimizer state) in ``dtype``,
    with the config and tokenizer, that :func:`load_for_inference` reads."""
    cfg, _, params, rest, ckpt_dir = load_params(path, dtype=dtype)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new directory")
    os.makedirs(out_dir, exist_ok=True)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(os.path.abspath(out_dir), "params"), {"params": params, "rest": rest})
    ck.wait_until_finished()
    with open(os.path.join(out_dir, EXPORT_MARKER), "w") as f:
        json.dump(
            {
                "format": "mlalm-params",
                "dtype": dtype,
                "source": os.path.abspath(ckpt_dir),
                "config": cfg.to_dict(),
            },
            f,
            indent=2,
        )
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    tokenizer_for(ckpt_dir, cfg).save(out_dir)
    return out_dir
