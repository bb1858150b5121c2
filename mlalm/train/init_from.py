"""``train.init_from=PATH``: start a run from the weights of another model.

PATH may be an mlalm run directory, checkpoint step directory or params export
(``scripts/export.py --format params``, ``scripts/convert_to_mla.py``), or a transformers
directory (DeepSeek-V3, or Llama/Mistral through ``mlalm.hf.from_pretrained``).  The run
starts at step 0 with a fresh optimizer; the ``model``, ``attention`` and ``moe`` sections
are the source's (an override of theirs that disagrees is a ConfigError naming the key),
and the source's tokenizer.json, when it has one, is the run's tokenizer.  A run resumed
after a kill restores its own checkpoints as usual (the source is not read again).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Set as AbstractSet

from mlalm.config import Config, from_dict
from mlalm.errors import CheckpointError, ConfigError

MODEL_SECTIONS = ("model", "attention", "moe")
# keys that change how the same parameters compute, not which parameters there are
FREE_KEYS = {
    ("attention", "impl"),
    ("moe", "dispatch"),
    ("moe", "capacity_factor"),
    ("model", "dtype"),
    ("moe", "bias_update_rate"),
    ("moe", "seq_aux_loss_coef"),
}


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "mlalm_params.json")
    )


def source_config(path: str) -> tuple[dict, str | None]:
    """(the source's model sections as a dict, its tokenizer.json or None)."""
    if not os.path.exists(path):
        raise CheckpointError(f"train.init_from={path}: no such run, checkpoint or model directory")
    if _is_hf(path):
        from mlalm.hf import load_config

        src = load_config(path).to_dict()
        tok = os.path.join(path, "tokenizer.json")
        return {s: src[s] for s in MODEL_SECTIONS}, tok if os.path.isfile(tok) else None
    from mlalm.checkpoint import find_checkpoint
    from mlalm.inference import _local_tokenizer, checkpoint_config

    step_dir = find_checkpoint(path)
    src = checkpoint_config(step_dir).to_dict()
    return {s: src[s] for s in MODEL_SECTIONS}, _local_tokenizer(step_dir)


def resolve(cfg: Config, explicit: AbstractSet[tuple[str, str]] = frozenset()) -> Config:
    """``cfg`` with the source's model sections (and tokenizer); ``explicit`` are the
    (section, key) pairs the user gave (a config file of theirs or the command line): one
    that disagrees with the source is an error, except the free keys above, which apply.

    Raises:
        ConfigError: a conflicting key; CheckpointError: an unreadable source.
    """
    path = cfg.train.init_from
    if path is None:
        return cfg
    src, tokenizer = source_config(path)
    mine = cfg.to_dict()
    for section, key in sorted(explicit):
        if section not in MODEL_SECTIONS or (section, key) in FREE_KEYS:
            continue
        have, want = mine[section].get(key), src[section].get(key)
        if have != want:
            raise ConfigError(
                f"{section}.{key}={have} conflicts with train.init_from={path}, whose model has "
                f"{section}.{key}={want}; drop the override (the model comes from the source)"
            )
    raw = {**{s: dict(src[s]) for s in MODEL_SECTIONS}}
    for section, key in FREE_KEYS:
        if (section, key) in explicit:
            raw[section][key] = mine[section][key]
    out = from_dict(raw, base=cfg)
    if tokenizer is not None and cfg.data.tokenizer != tokenizer:
        out = dataclasses.replace(out, data=dataclasses.replace(out.data, tokenizer=tokenizer))
    return out


def load_weights(cfg: Config, like_params, like_rest):
    """The source's (params, rest), cast to the run's parameter dtypes and checked to
    have the structure and shapes of ``like_params``/``like_rest`` (the fresh model)."""
    import jax

    path = cfg.train.init_from
    assert path is not None
    if _is_hf(path):
        from mlalm.hf import from_pretrained
        from mlalm.train.state import split_model

        model, _ = from_pretrained(path)  # DeepSeek-V3, Llama or Mistral by model_type
        _, params, rest = split_model(model)
    else:
        from mlalm.inference import load_params

        _, _, params, rest, _ = load_params(path, dispatch=None)

    def fit(src, like):
        src_leaves = dict(
            (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(src)[0]
        )
        like_paths, like_def = jax.tree_util.tree_flatten_with_path(like)
        out = []
        for p, x in like_paths:
            key = jax.tree_util.keystr(p)
            got = src_leaves.pop(key, None)
            if got is None or got.shape != x.shape:
                raise CheckpointError(
                    f"train.init_from={path}: {key} is "
                    f"{'missing' if got is None else f'of shape {got.shape}'} where the model needs {x.shape}"
                )
            out.append(jax.numpy.asarray(got, x.dtype))
        if src_leaves:
            raise CheckpointError(f"train.init_from={path}: {sorted(src_leaves)[0]} is not in the model")
        return jax.tree_util.tree_unflatten(like_def, out)

    return fit(params, like_params), fit(rest, like_rest)
