"""The prepare step: text in, a prepared directory of sharded token files out.

    prepare(["corpus/"], "prepared/", tokenizer="bpe")  ->  manifest (dict)

Documents are read in order by the main process and encoded in batches by a pool of
worker processes (forkserver, or spawn where there is none) with a bounded number of
batches in flight; the results are written in submission order, so the output is the
same whatever the worker count.  Memory stays under ``max_memory`` (see
:mod:`mlalm.data.memory`) whatever the corpus size.  ``tokenizer='bpe'`` first trains a
BPE on a sample of at most ``bpe_sample_bytes`` (default 100 MB) of the training split:
documents (pieces, for single large files) chosen by a hash of their name at the rate that
spreads the sample over the whole input; a training split smaller than the sample is used
whole, in order.

Interruptions: shards are written under temporary names and renamed when complete,
``manifest.json`` last; a directory without it is incomplete and nothing reads it.  A
rerun starts afresh (removing the previous run's shards), and returns at once when the
directory is already complete for the same sources and settings.  A lock file
(``.lock``) serialises concurrent prepares of one directory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
from typing import TYPE_CHECKING

from mlalm.data import encode as enc
from mlalm.data import memory
from mlalm.data.formats import expand_inputs
from mlalm.data.memory import plan as memory_plan
from mlalm.data.reader import Reader, corrected_rule, initial_rule, train_bpe
from mlalm.data.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    PreparedData,
    ShardWriter,
    dtype_name,
    file_dtype,
    is_prepared,
    read_manifest,
    write_manifest,
)
from mlalm.errors import DataError
from mlalm.utils import parse_size

if TYPE_CHECKING:
    from mlalm.data.tokenizers import ByteTokenizer, HFTokenizer

DEFAULT_SHARD_BYTES = 256 * 2**20
DEFAULT_BPE_SAMPLE = 100 * 10**6
DEFAULT_MAX_MEMORY = "2GB"
_STALE = re.compile(r"^(?:(?:train|val)-\d{5}\.bin|\..*\.tmp)$")


@contextlib.contextmanager
def locked(directory: str, log):
    """An exclusive lock on ``directory/.lock`` (where the platform has flock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(directory, ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another prepare of {directory} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _resolve_tokenizer(tokenizer, eos_token):
    from mlalm.data.tokenizers import get_tokenizer

    if not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer == "bpe":
        return None  # trained below, on the training split
    return get_tokenizer(tokenizer, eos_token=eos_token)


def settings_key(files, settings: dict) -> str:
    sources = [(os.path.realpath(f.path), f.size, f.mtime_ns) for f in files]
    blob = json.dumps({"settings": settings, "sources": sources}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _mp_context():
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["mlalm.data.encode"])
    return ctx


def can_start_workers() -> bool:
    """Whether worker processes can start: forkserver and spawn import the main module
    again in every worker, which fails when it is not a file (python - < script, stdin)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.isfile(path)


def _run_pass(files, rule, tok, *, text_key, plan, out_dir, shard_tokens, dtype, bar):
    writers = [ShardWriter(out_dir, s, file_dtype(dtype), shard_tokens) for s in ("train", "val")]
    counts = {"documents": [0, 0], "text_bytes": [0, 0]}
    summary = enc.Summary()
    reader = Reader(
        files,
        rule,
        text_key,
        chunk=tok.strict_utf8,
        before_space=tok.prefix_space,
        batch_bytes=plan.batch_bytes,
    )

    def consume(res: enc.Result):
        for i in (0, 1):
            writers[i].write(res.tokens[i])
            counts["documents"][i] += res.documents[i]
            counts["text_bytes"][i] += res.text_bytes[i]
        summary.merge(res.summary)
        bar.update(reader.consumed - bar.n)
        bar.set_postfix_str(
            f"{sum(counts['documents']):,} docs, {writers[0].tokens + writers[1].tokens:,} tokens",
            refresh=False,
        )

    pool = None
    try:
        if plan.workers == 0:
            for batch in reader.batches():
                consume(enc.encode_batch(batch, tok, rule, text_key, dtype))
        else:
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(
                plan.workers,
                mp_context=_mp_context(),
                initializer=enc.init_worker,
                initargs=(enc.tokenizer_spec(tok), rule, text_key, dtype),
            )
            inflight = collections.deque()
            for batch in reader.batches():
                inflight.append(pool.submit(enc.worker_encode, batch))
                if len(inflight) >= plan.in_flight:
                    consume(inflight.popleft().result())
            while inflight:
                consume(inflight.popleft().result())
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return writers, counts, summary


def clear(out_dir: str) -> None:
    """Remove a previous (complete or interrupted) prepare's files: the manifest first, so
    the directory stops being complete before anything else changes."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))
    for name in os.listdir(out_dir):
        if _STALE.match(name):
            os.remove(os.path.join(out_dir, name))


def prepare(
    inputs,
    out_dir,
    *,
    tokenizer: str | ByteTokenizer | HFTokenizer = "byte",
    bpe_vocab_size: int = 8192,
    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE,
    eos_token: str | None = None,
    val_fraction: float = 0.1,
    text_key: str = "text",
    workers: int = 0,
    max_memory=DEFAULT_MAX_MEMORY,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: bool = False,
    key: str = "input",
    log=None,
) -> dict:
    """Prepare ``inputs`` (files, directories, globs) into ``out_dir``; returns the manifest.

    Args:
        tokenizer: 'byte', 'bpe' (trained on a sample of the training split), the path of
            a tokenizer.json, or a tokenizer object.
        val_fraction: in [0, 1); 0 puts every document in the train split.
        workers: encoding processes (0: one per core, as many as ``max_memory`` allows;
            none for inputs under 32 MB).
        max_memory: peak memory of all processes together ('2GB', '512MiB' or bytes).
        shard_bytes: size of each token file (the last of a split is smaller).
        force: prepare again even when ``out_dir`` is complete for the same inputs.
        key: how error messages name the inputs (e.g. 'data.path').
        log: ``log(str)`` for progress lines (default: none).
    Raises:
        DataError: unreadable, empty or malformed input (one line naming the file).
    """
    log = log or (lambda text: None)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)")
    files = expand_inputs(inputs, key=key)
    inside = os.path.realpath(out_dir) + os.sep  # an output directory inside an input one
    files = [f for f in files if not os.path.realpath(f.path).startswith(inside)]
    if not files:
        raise DataError(f"{key}: no input files in {inputs}")
    budget = parse_size(max_memory, key="max_memory")
    tok = _resolve_tokenizer(tokenizer, eos_token)
    settings = {
        "format": VERSION,
        "val_fraction": val_fraction,
        "text_key": text_key,
        "shard_bytes": shard_bytes,
        "tokenizer": {"bpe": bpe_vocab_size, "sample": bpe_sample_bytes}
        if tok is None
        else tok.fingerprint(),
    }
    wanted = settings_key(files, settings)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with locked(out_dir, log):
        if not force and is_prepared(out_dir):
            try:
                if read_manifest(out_dir).get("settings_key") == wanted:
                    return PreparedData.open(out_dir).manifest
            except DataError as e:
                warnings.warn(f"{e}; preparing {out_dir} again", stacklevel=2)
        clear(out_dir)
        return _prepare_locked(
            files,
            out_dir,
            tok,
            settings,
            wanted,
            budget=budget,
            workers=workers,
            bpe_vocab_size=bpe_vocab_size,
            bpe_sample_bytes=bpe_sample_bytes,
            val_fraction=val_fraction,
            text_key=text_key,
            shard_bytes=shard_bytes,
            progress=progress,
            key=key,
            log=log,
        )


def _prepare_locked(
    files,
    out_dir,
    tok,
    settings,
    wanted,
    *,
    budget,
    workers,
    bpe_vocab_size,
    bpe_sample_bytes,
    val_fraction,
    text_key,
    shard_bytes,
    progress,
    key,
    log,
):
    from tqdm import tqdm

    t0 = time.perf_counter()
    input_bytes = sum(f.size for f in files)
    plan = memory_plan(budget, workers=workers, input_bytes=input_bytes)
    if plan.workers and not can_start_workers():
        log(
            "prepare: the main module is not a file, so no worker process can start: encoding in this process"
        )
        plan = dataclasses.replace(plan, workers=0)
    if plan.workers:
        log(
            f"prepare: {plan.workers} worker processes, {plan.batch_bytes // 1024} KiB batches, "
            f"{plan.in_flight} in flight (max_memory {budget / 1e9:.2f} GB)"
        )
    if workers > max(plan.workers, 1):
        log(
            f"prepare: {workers} workers do not fit max_memory={budget:,} bytes (about "
            f"{(memory.WORKER_BASE + plan.batch_bytes * memory.WORKER_EXPANSION) / 2**20:.0f} MiB "
            f"each): using {plan.workers}"
        )
    rule = initial_rule(files, val_fraction, key)
    train_tokenizer, bpe_info = tok is None, None
    for _ in range(3):
        if train_tokenizer:
            tok, bpe_info = train_bpe(
                files,
                rule,
                text_key=text_key,
                vocab_size=bpe_vocab_size,
                sample_bytes=bpe_sample_bytes,
                log=log,
            )
        dtype = dtype_name(tok.vocab_size)
        shard_tokens = max(1, shard_bytes // file_dtype(dtype).itemsize)
        with tqdm(
            total=input_bytes,
            unit="B",
            unit_scale=True,
            desc="prepare",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        ) as bar:
            writers, counts, summary = _run_pass(
                files,
                rule,
                tok,
                text_key=text_key,
                plan=plan,
                out_dir=out_dir,
                shard_tokens=shard_tokens,
                dtype=dtype,
                bar=bar,
            )
        new_rule = corrected_rule(rule, summary, files, key)
        if new_rule == rule:
            break
        for w in writers:  # an edge case of the split rule: do it again, knowing the documents
            w.abort()
        rule = new_rule  # (a BPE tokenizer is trained again, on the corrected training split)
    if tok.name != "byte":
        tok.save(out_dir)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "name": tok.name,
            "fingerprint": tok.fingerprint(),
            "file": None if tok.name == "byte" else "tokenizer.json",
            "vocab_size": int(tok.vocab_size),
            "eos_id": int(tok.eos_id),
            "eos_token": tok.eos_token,
        },
        "dtype": dtype,
        "byte_order": "little",
        "checksum": "crc32",
        "splits": {
            name: {
                "documents": counts["documents"][i],
                "text_bytes": counts["text_bytes"][i],
                "tokens": writers[i].tokens,
                "shards": writers[i].shards,
            }
            for i, name in enumerate(("train", "val"))
        },
        "split": rule.describe(),
        "text_key": text_key,
        "sources": [
            {
                "path": os.path.abspath(f.path),
                "format": f.format,
                "compression": f.compression,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
            }
            for f in files
        ],
        "input_bytes": input_bytes,
        "bpe": bpe_info,
        "settings": settings,
        "settings_key": wanted,
        "prepare_seconds": round(time.perf_counter() - t0, 3),
    }
    write_manifest(out_dir, manifest)
    return manifest
