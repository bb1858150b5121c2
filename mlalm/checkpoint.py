"""Checkpoints: an Orbax ``CheckpointManager`` over the train state, the data iterator,
and the resolved config; loading checkpoints and exported parameters for inference.

Layout of a run directory::

    RUN_DIR/checkpoints/<step>/state/     params, optimizer state, balancing biases, step
                              data/       the Grain iterator state (one JSON per process)
                              meta/       step, validation loss, elapsed time, seed, config
                              manifest.json   size and SHA-256 of every file above

Orbax writes each checkpoint into a temporary directory and renames it when every item
is complete, so a checkpoint directory is visible only once whole.  The manifest is
written right after (by Orbax's post-finalisation callback, on the save thread), so
damage that happens later -- a truncated or overwritten file -- is detected on restore,
and :meth:`Checkpointer.restore` falls back to the previous checkpoint, moving the
damaged one to ``RUN_DIR/damaged_checkpoints/`` so that nothing is lost or overwritten.
A checkpoint without a manifest (killed between the rename and the manifest) is still
restored; Orbax's own read errors then decide whether it is usable.

The training step has no randomness of its own (no dropout); the data order is the
Grain iterator's state, and the seed is in ``meta``.  Restoring therefore reproduces the
uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from mlalm.config import Config, from_dict, to_yaml
from mlalm.errors import CheckpointError

MANIFEST = "manifest.json"
EXPORT_MARKER = "mlalm_params.json"


def _grain_args():
    import grain
    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


# ---------------------------------------------------------------------------------------
# Manifests: detect files damaged after the save
# ---------------------------------------------------------------------------------------

ITEMS = ("state", "data", "meta")


def _files(step_dir: str):
    """Every file of the items (Orbax's own top-level metadata is rewritten after saving)."""
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                path = os.path.join(root, name)
                yield os.path.relpath(path, step_dir), path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(step_dir: str) -> None:
    entries = {rel: [os.path.getsize(p), _sha256(p)] for rel, p in sorted(_files(step_dir))}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def check_manifest(step_dir: str) -> str | None:
    """None when every file the manifest lists is there with its size and hash, else
    what is wrong (the first problem found).  No manifest: None (nothing to check)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for rel, (size, digest) in entries.items():
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != size:
            return f"{rel} has {os.path.getsize(p)} bytes, {size} were written (truncated?)"
        if _sha256(p) != digest:
            return f"{rel} does not match its checksum (corrupted)"
    return None


# ---------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------

def abstract_arrays(tree, shardings=None):
    """ShapeDtypeStructs (with shardings when given) that tell Orbax what to restore into."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _disk_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpointer:
    """Saves and restores ``(state, data iterator, meta)`` under ``directory``.

    Args:
        directory: the run's ``checkpoints/`` directory (created on first save).
        keep, keep_best, async_save: as in ``CheckpointConfig``.
        log: where warnings go (the trainer's console logger).
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, log=print):
        self.directory = os.path.abspath(directory)
        self.log = log
        self._last_step = None
        policies = [cm.LatestN(n=keep)]
        if keep_best:  # lowest validation loss; BestN keeps the last n of the sorted list
            policies.append(cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._after_save) if async_save else None,
            cleanup_tmp_directories=True, create=False)
        self.async_save = async_save
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    # -- saving ----------------------------------------------------------------------
    def _after_save(self):
        """Write the manifest once every item is written.  Orbax calls this on its save
        thread just before it renames the temporary directory, so the manifest is part
        of the atomic checkpoint (synchronous saves: called after, on the final one)."""
        step = self._last_step
        if step is None or jax.process_index() != 0:
            return
        tmp = sorted(glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")))
        step_dir = tmp[-1] if tmp else os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):
            write_manifest(step_dir)

    def save(self, step: int, state, data_iter, meta: dict, *, val_loss: float | None = None) -> None:
        """Start saving checkpoint ``step`` (returns while it is written when async).

        Raises:
            CheckpointError: this save or the previous one failed (e.g. a full disk);
                earlier checkpoints are left as they were.
        """
        self.wait()  # the previous save's errors surface here, before a new one starts
        CheckpointSave, _ = _grain_args()
        os.makedirs(self.directory, exist_ok=True)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave({**meta, "step": int(step), "val_loss": val_loss}))
        self._last_step = step
        try:
            self.manager.save(step, args=args, force=True,
                              metrics={"val_loss": float(val_loss)} if val_loss is not None else None)
        except Exception as e:  # noqa: BLE001 - anything Orbax raises is a failed save
            raise self._save_error(step, e) from e
        if not self.async_save:
            self._after_save()

    def wait(self) -> None:
        """Block until the current save is complete; raise CheckpointError if it failed."""
        step = self._last_step
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(step, e) from e

    def _save_error(self, step, e: BaseException) -> CheckpointError:
        kept = [s for s in self.manager.all_steps() if s != step]
        why = "the disk is full" if _disk_error(e) else f"{type(e).__name__}: {e}".splitlines()[0]
        return CheckpointError(
            f"saving checkpoint {step} in {self.directory} failed: {why}; earlier checkpoints "
            f"{sorted(kept) if kept else '(none)'} are intact")

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # -- restoring -------------------------------------------------------------------
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, data_iter):
        """Restore the newest usable checkpoint into ``abstract_state``'s structure.

        ``data_iter``'s position is restored in place.  A damaged checkpoint is moved
        aside with a warning naming what was wrong, and the previous one is tried.

        Returns:
            (state, meta), or None when there is no checkpoint at all.
        Raises:
            CheckpointError: checkpoints exist but none could be restored.
        """
        _, CheckpointRestore = _grain_args()
        tried = []
        for step in reversed(self.steps()):
            step_dir = os.path.join(self.directory, str(step))
            problem = check_manifest(step_dir)
            if problem is None:
                try:
                    out = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=CheckpointRestore(data_iter),
                        meta=ocp.args.JsonRestore()))
                    return out["state"], out["meta"]
                except Exception as e:  # noqa: BLE001 - unreadable: fall back
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            moved = self._set_aside(step_dir)
            self.log(f"warning: checkpoint {step_dir} is damaged ({problem}); moved to {moved}, "
                     f"falling back to the previous checkpoint")
            tried.append(step)
        if tried:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: steps {tried} are damaged "
                                  f"(moved to {os.path.dirname(self._aside_dir())})")
        return None

    def _aside_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")

    def _set_aside(self, step_dir: str) -> str:
        """Move a damaged checkpoint out of the manager's sight (never delete it)."""
        dest = os.path.join(self._aside_dir(), f"{os.path.basename(step_dir)}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(self._aside_dir(), exist_ok=True)
            shutil.move(step_dir, dest)
        self.manager.reload()
        return dest


# ---------------------------------------------------------------------------------------
# Finding checkpoints and loading them for inference
# ---------------------------------------------------------------------------------------

def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def find_checkpoint(path: str) -> str:
    """The step directory or exported-parameters directory that ``path`` names.

    ``path`` may be a run directory (its newest complete checkpoint), its
    ``checkpoints/`` directory, one step directory, or a ``--format params`` export.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(os.path.join(path, EXPORT_MARKER)) or _is_step_dir(path):
        return path
    ckpts = os.path.join(path, "checkpoints")
    directory = ckpts if os.path.isdir(ckpts) else path
    steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()
                    and _is_step_dir(os.path.join(directory, d))), reverse=True)
    for step in steps:
        step_dir = os.path.join(directory, str(step))
        problem = check_manifest(step_dir)
        if problem is None:
            return step_dir
        print(f"warning: checkpoint {step_dir} is damaged ({problem}); using the previous one",
              file=sys.stderr)
    raise CheckpointError(f"{path} holds no checkpoint (expected a run directory with checkpoints/, "
                          f"a checkpoint step directory, or an exported params directory)")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def checkpoint_config(ckpt_dir: str) -> Config:
    """The resolved config stored with a checkpoint or export."""
    if os.path.isfile(os.path.join(ckpt_dir, EXPORT_MARKER)):
        raw = _read_json(os.path.join(ckpt_dir, EXPORT_MARKER))["config"]
    else:
        meta = os.path.join(ckpt_dir, "meta", "metadata")
        raw = _read_json(meta)["config"]
    return from_dict(raw)


def _tokenizer_for(ckpt_dir: str, cfg: Config):
    from mlalm.data.tokenizers import get_tokenizer
    if cfg.data.tokenizer != "bpe":
        return get_tokenizer(cfg.data.tokenizer)
    # exports hold tokenizer.json; a checkpoint's lives in its run directory
    for d in (ckpt_dir, os.path.dirname(os.path.dirname(ckpt_dir))):
        p = os.path.join(d, "tokenizer.json")
        if os.path.isfile(p):
            return get_tokenizer("bpe", path=p)
    raise CheckpointError(f"no tokenizer.json next to {ckpt_dir} or in its run directory")


def abstract_model(cfg: Config):
    """(graphdef, abstract params, abstract rest) of ``cfg``'s model, without allocating."""
    from flax import nnx

    from mlalm.model import Transformer
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)


def load_params(path: str, *, dtype: str | None = None, dispatch: str | None = "dropless"):
    """``(cfg, graphdef, params, rest, ckpt_dir)`` from any checkpoint ``find_checkpoint`` accepts.

    The parameters and the balancing biases are returned (a training checkpoint's
    optimizer state is read and dropped); ``dtype`` casts floating parameters.
    ``dispatch`` replaces ``moe.dispatch``: inference defaults to dropless routing, so a
    token's output never depends on the other tokens in the batch (capacity dispatch,
    the CPU training default, can drop tokens when an expert is over capacity).
    """
    from mlalm.optim import build_optimizer
    ckpt_dir = find_checkpoint(path)
    cfg = checkpoint_config(ckpt_dir)
    if dispatch:
        cfg = replace(cfg, moe=replace(cfg.moe, dispatch=dispatch))
    graphdef, params, rest = abstract_model(cfg)
    if os.path.isfile(os.path.join(ckpt_dir, EXPORT_MARKER)):
        item_dir = os.path.join(ckpt_dir, "params")
        saved = _read_json(os.path.join(ckpt_dir, EXPORT_MARKER)).get("dtype") or "float32"
        target = {"params": _cast_abstract(params, saved), "rest": rest}
    else:  # the train state as the trainer builds it
        item_dir = os.path.join(ckpt_dir, "state")
        tx, _ = build_optimizer(cfg, cfg.train.steps)
        target = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "rest": rest,
                  "step": jax.ShapeDtypeStruct((), np.int32)}
    check_fits(item_dir, {"params": params, "rest": rest})
    try:
        ck = ocp.StandardCheckpointer()
        restored = ck.restore(os.path.abspath(item_dir), abstract_arrays(target))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot restore {item_dir} into the model its config describes: "
                              f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
    p, r = restored["params"], restored["rest"]
    if dtype:
        p = jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, p)
    return cfg, graphdef, p, r, ckpt_dir


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_fits(item_dir: str, expected: dict) -> None:
    """Raise CheckpointError naming the first array whose stored shape differs from the
    model's (or that is missing), from Orbax's metadata alone -- before a restore that
    would fail deep inside its readers."""
    import logging
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
    meta = getattr(meta, "tree", meta)
    stored = {f"{top}/{_path_key(p)}": tuple(x.shape) for top in expected if top in meta
              for p, x in jax.tree_util.tree_flatten_with_path(meta[top])[0]}
    for top, tree in expected.items():
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key, need = f"{top}/{_path_key(p)}", tuple(x.shape)
            have = stored.pop(key, None)
            if have is None:
                raise CheckpointError(f"{item_dir} does not fit its config: {key} (shape {need}) "
                                      f"is not in the checkpoint")
            if have != need:
                raise CheckpointError(f"{item_dir} does not fit its config: {key} has shape {have} "
                                      f"in the checkpoint, the config's model needs {need}")
    if stored:
        raise CheckpointError(f"{item_dir} does not fit its config: the checkpoint has "
                              f"{sorted(stored)[0]}, which the config's model does not")


def _cast_abstract(tree, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if np.issubdtype(x.dtype, np.floating)
                                                       else x.dtype), tree)


def load_for_inference(path: str, *, dtype: str | None = None, dispatch: str | None = "dropless"):
    """``(model, cfg, tokenizer)`` from a run directory, checkpoint or params export
    (MoE routing dropless unless ``dispatch`` says otherwise; see :func:`load_params`)."""
    from flax import nnx
    cfg, graphdef, params, rest, ckpt_dir = load_params(path, dtype=dtype, dispatch=dispatch)
    model = nnx.merge(graphdef, params, rest)
    return model, cfg, _tokenizer_for(ckpt_dir, cfg)


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
        json.dump({"format": "mlalm-params", "dtype": dtype, "source": os.path.abspath(ckpt_dir),
                   "config": cfg.to_dict()}, f, indent=2)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    _tokenizer_for(ckpt_dir, cfg).save(out_dir)
    return out_dir
