"""Checkpoint storage: an Orbax ``CheckpointManager`` over the train state, the data
iterator and a metadata record, with a manifest that detects damage.

Layout of a run directory::

    RUN_DIR/checkpoints/<step>/state/     params, optimizer state, balancing biases, step
                              data/       the Grain iterator state (one JSON per process)
                              meta/       step, validation loss, elapsed time, seed, config
                              manifest.json   size and SHA-256 of every file above

Orbax writes each checkpoint into a temporary directory and renames it when every item
is complete, so a checkpoint directory is visible only once whole.  The manifest is
written inside that temporary directory just before the rename (Orbax's
post-finalisation callback, on the save thread), so every finalized checkpoint carries
one.  On restore, a checkpoint is *damaged* when its manifest is missing, unreadable or
of the wrong shape, when a file it lists is missing, truncated or fails its checksum,
when its metadata cannot be read, or when Orbax cannot read it; a damaged checkpoint is
moved to ``RUN_DIR/damaged_checkpoints/`` (never deleted) with a warning naming the
problem, and the previous one is tried.  (Checkpoints written before manifests existed
count as damaged too; ``write_manifest(step_dir)`` vouches for one by hand.)

This module stores and finds checkpoints; loading one for inference is
``mlalm.inference``.  It imports neither the model nor the optimizer.

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

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from mlalm.errors import CheckpointError

MANIFEST = "manifest.json"
EXPORT_MARKER = "mlalm_params.json"  # a params export (mlalm.inference.export_params)
ITEMS = ("state", "data", "meta")


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


# ---------------------------------------------------------------------------------------
# Manifests and metadata
# ---------------------------------------------------------------------------------------


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
    """None when the manifest is there and every file it lists has its size and hash;
    else what is wrong (the first problem found)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (every checkpoint this version writes has one)"
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
        entries = {str(rel): (int(size), str(digest)) for rel, (size, digest) in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    if not entries:
        return f"{MANIFEST} lists no files"
    for rel, (size, digest) in entries.items():
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != size:
            return f"{rel} has {os.path.getsize(p)} bytes, {size} were written (truncated?)"
        if _sha256(p) != digest:
            return f"{rel} does not match its checksum (corrupted)"
    return None


def read_meta(step_dir: str) -> dict:
    """The metadata record of a checkpoint (or the record of a params export).

    Returns:
        a dict with at least ``config`` (the resolved config as a dict) and, for
        training checkpoints, ``step``.
    Raises:
        CheckpointError: missing, unreadable or not such a record.
    """
    export = os.path.join(step_dir, EXPORT_MARKER)
    path = export if os.path.isfile(export) else os.path.join(step_dir, "meta", "metadata")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("config"), dict)
        or (path != export and not isinstance(meta.get("step"), int))
    ):
        raise CheckpointError(f"{path} is not a checkpoint metadata record (no config or step)")
    return meta


def abstract_arrays(tree, shardings=None):
    """ShapeDtypeStructs (with shardings when given) that tell Orbax what to restore into."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _disk_error(e: BaseException | None) -> str | None:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "the disk is full"
        if isinstance(e, OSError) and e.errno == errno.EFBIG or "File too large" in str(e):
            return "a file would exceed the largest size allowed (EFBIG: file size limit)"
        if "No space left on device" in str(e):
            return "the disk is full"
        e = e.__cause__ or e.__context__
    return None


# ---------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores ``(state, data iterator, meta)`` under ``directory``.

    Args:
        directory: the run's ``checkpoints/`` directory (created on first save).
        keep, keep_best, async_save: as in ``CheckpointConfig``.
        log: where warnings go (the trainer's console logger).
    """

    def __init__(
        self, directory: str, *, keep: int = 3, keep_best: bool = True, async_save: bool = True, log=print
    ):
        self.directory = os.path.abspath(directory)
        self.log = log
        self._last_step = None
        self._started = None  # (step, time) of the save in flight
        policies: list[cm.PreservationPolicy] = [cm.LatestN(n=keep)]
        if keep_best:  # lowest validation loss; BestN keeps the last n of the sorted list
            policies.append(
                cm.BestN(
                    get_metric_fn=lambda m: m["val_loss"],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._after_save)
            if async_save
            else None,
            cleanup_tmp_directories=True,
            create=False,
        )
        self.async_save = async_save
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({**meta, "step": int(step), "val_loss": val_loss}),
        )
        self._last_step = step
        self._started = (step, time.perf_counter())
        try:
            self.manager.save(
                step,
                args=args,
                force=True,
                metrics={"val_loss": float(val_loss)} if val_loss is not None else None,
            )
        except Exception as e:  # noqa: BLE001 - anything Orbax raises is a failed save
            raise self._save_error(step, e) from None
        if not self.async_save:
            self._after_save()

    def finished(self) -> tuple[int, float] | None:
        """(step, seconds) once when the save in flight has completed (non-blocking);
        None while it is still being written or when none was started."""
        if self._started is None or self.manager.is_saving_in_progress():
            return None
        return self.wait()  # at once; raises if the save failed

    def wait(self) -> tuple[int, float] | None:
        """Block until the save in flight is complete; (step, seconds) of it, or None.

        Raises:
            CheckpointError: it failed.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._last_step, e) from None
        return self._collect()

    def _collect(self):
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._started = None
            raise self._save_error(self._last_step, e) from None
        if self._started is None:
            return None
        step, t0 = self._started
        self._started = None
        return step, time.perf_counter() - t0

    def _save_error(self, step, e: BaseException) -> CheckpointError:
        try:
            kept = [s for s in self.manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001
            kept = []
        why = _disk_error(e) or f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return CheckpointError(
            f"saving checkpoint {step} in {self.directory} failed: {why}; earlier checkpoints "
            f"{sorted(kept) if kept else '(none)'} are intact"
        )

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def abandon(self) -> None:
        """After an error: let a save in flight end, close quietly (the first error is the
        one to report; a half-written save is a temporary directory Orbax removes later)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001
            pass

    # -- restoring -------------------------------------------------------------------
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, data_iter, *, step: int | None = None, check=None):
        """Restore a checkpoint into ``abstract_state``'s structure.

        Args:
            step: exactly this step (damage is then an error); None: the newest usable
                one -- a damaged checkpoint is moved aside with a warning naming what was
                wrong, and the previous one is tried.
            check: ``check(meta, step_dir)`` before restoring (e.g. the model's
                compatibility); the CheckpointError it raises is not damage: it propagates
                and the checkpoint stays where it is.
        ``data_iter``'s position is restored in place.

        Returns:
            (state, meta), or None when there is no checkpoint at all.
        Raises:
            CheckpointError: the step asked for is missing or damaged, or checkpoints
                exist but none could be restored.
        """
        steps = self.steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"{self.directory} has no checkpoint {step} (it has {steps or 'none'})")
        tried = []
        for s in [step] if step is not None else reversed(steps):
            step_dir = os.path.join(self.directory, str(s))
            problem = check_manifest(step_dir)
            if problem is None:
                try:
                    meta = read_meta(step_dir)
                except CheckpointError as e:
                    problem = str(e)
            if problem is None:
                if check is not None:
                    check(meta, step_dir)
                problem = self._read(s, abstract_state, data_iter)
                if not isinstance(problem, str):
                    return problem
            if step is not None:
                raise CheckpointError(
                    f"checkpoint {step_dir} is damaged ({problem}); choose another "
                    f"step, or resume the run directory to use its newest usable one"
                )
            moved = self._set_aside(step_dir)
            self.log(
                f"warning: checkpoint {step_dir} is damaged ({problem}); moved to {moved}, "
                f"falling back to the previous checkpoint"
            )
            tried.append(s)
        if tried:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: steps {tried} are damaged "
                f"(moved to {self._aside_dir()})"
            )
        return None

    def _read(self, step: int, abstract_state, data_iter):
        """(state, meta), or a string saying why Orbax could not read the checkpoint."""
        _, CheckpointRestore = _grain_args()
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=CheckpointRestore(data_iter),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            return out["state"], out["meta"]
        except Exception as e:  # noqa: BLE001 - unreadable: damaged
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

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
# Finding checkpoints
# ---------------------------------------------------------------------------------------


def is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def find_checkpoint(path: str, *, warn=None) -> str:
    """The step directory or exported-parameters directory that ``path`` names.

    ``path`` may be a run directory (its newest usable checkpoint: damaged ones are
    skipped with a warning, not moved), its ``checkpoints/`` directory, one step
    directory, or a ``--format params`` export.
    """
    warn = warn or (lambda text: print(text, file=sys.stderr))
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(os.path.join(path, EXPORT_MARKER)) or is_step_dir(path):
        return path
    ckpts = os.path.join(path, "checkpoints")
    directory = ckpts if os.path.isdir(ckpts) else path
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{path} is a file; expected a run directory, a checkpoint step "
            f"directory or an exported params directory"
        )
    steps = sorted(
        (int(d) for d in os.listdir(directory) if d.isdigit() and is_step_dir(os.path.join(directory, d))),
        reverse=True,
    )
    for step in steps:
        step_dir = os.path.join(directory, str(step))
        problem = check_manifest(step_dir)
        if problem is None:
            try:
                read_meta(step_dir)
                return step_dir
            except CheckpointError as e:
                problem = str(e)
        warn(f"warning: checkpoint {step_dir} is damaged ({problem}); using the previous one")
    raise CheckpointError(
        f"{path} holds no usable checkpoint (expected a run directory with "
        f"checkpoints/, a checkpoint step directory, or an exported params directory)"
    )
