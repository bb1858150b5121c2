"""The cache of prepared raw text: ``data.path=corpus.txt`` is prepared once into
``{cache_dir}/prepared/<key>/`` and found again on the next start without reading it.

The key is a hash of the sources' resolved paths, sizes and modification times, the
tokenizer settings (name and BPE vocabulary size, or a tokenizer's fingerprint), the
split settings and the text key: a changed file (size or mtime) or setting gives a new
entry.  An entry is opened like any prepared directory -- sizes checked on every open,
CRC-32s too for entries up to 64 MiB (see :mod:`mlalm.data.shards`) -- and one that does
not match its manifest is prepared again, with a warning.  Concurrent runs preparing the
same entry take turns on its lock; the second finds it complete.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import warnings
from typing import TYPE_CHECKING

import numpy as np

from mlalm.data.shards import PreparedData, is_prepared
from mlalm.errors import DataError

if TYPE_CHECKING:
    from mlalm.data.tokenizers import ByteTokenizer, HFTokenizer


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlalm")


def builtin_files() -> list[str]:
    """The built-in corpus: the top-level ``*.py`` modules of this Python's standard library
    (present wherever Python runs; 168 files and 4.7 MB on CPython 3.11.7)."""
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(root) if f.endswith(".py") and not f.startswith("."))
    if not names:
        raise DataError(f"built-in corpus: no .py files found under {root}")
    return [os.path.join(root, n) for n in names]


def prepared_dir(
    inputs,
    *,
    cache_dir: str | None = None,
    tokenizer: str | ByteTokenizer | HFTokenizer = "byte",
    key: str = "data.path",
    verify: str = "auto",
    **settings,
) -> PreparedData:
    """``inputs`` as prepared data: opened directly when it is a prepared directory (one
    with a manifest.json), else prepared through the cache.

    ``settings`` are :func:`mlalm.data.prepare.prepare`'s (val_fraction, text_key,
    bpe_vocab_size, eos_token, workers, max_memory, shard_bytes, log, progress).
    Raises:
        DataError: as :func:`~mlalm.data.prepare.prepare`, or a prepared directory that
            does not match its manifest.
    """
    if isinstance(inputs, (str, os.PathLike)) and is_prepared(inputs):
        return PreparedData.open(inputs, verify=verify)
    from mlalm.data.formats import expand_inputs
    from mlalm.data.prepare import prepare, settings_key

    files = expand_inputs(inputs, key=key)
    tok_setting = (
        tokenizer
        if isinstance(tokenizer, str) and tokenizer in ("byte", "bpe")
        else _fingerprint_of(tokenizer, settings.get("eos_token"))
    )
    entry_key = settings_key(
        files,
        {
            "tokenizer": tok_setting,
            "eos": settings.get("eos_token"),
            "bpe": settings.get("bpe_vocab_size"),
            "val_fraction": settings.get("val_fraction", 0.1),
            "text_key": settings.get("text_key", "text"),
            "shard_bytes": settings.get("shard_bytes"),
        },
    )
    entry = os.path.join(cache_dir or default_cache_dir(), "prepared", entry_key[:32])
    prepare(
        [f.path for f in files],
        entry,
        tokenizer=tokenizer,
        key=key,
        **{k: v for k, v in settings.items() if v is not None},
    )
    return PreparedData.open(entry, verify=verify)


def _fingerprint_of(tokenizer, eos_token) -> str:
    if not isinstance(tokenizer, str):
        return tokenizer.fingerprint()
    from mlalm.data.tokenizers import get_tokenizer

    return get_tokenizer(tokenizer, eos_token=eos_token).fingerprint()


# ---------------------------------------------------------------------------------------
# Documents already in memory (evaluation of (name, bytes) lists)
# ---------------------------------------------------------------------------------------


def _digest(docs) -> str:
    h = hashlib.sha256()
    for _, data in docs:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def cached_tokens(tokenizer, docs, cache_dir: str):
    """Token ids of in-memory documents ``[(name, bytes)]`` (each followed by the
    end-of-text id), as a :class:`~mlalm.data.shards.TokenStream` from a prepared directory
    keyed by the documents' content and the tokenizer; encoded on a miss, verified on open.
    """
    from mlalm.data import encode as enc
    from mlalm.data.prepare import clear, locked
    from mlalm.data.shards import FORMAT, VERSION, ShardWriter, dtype_name, file_dtype, write_manifest

    entry = os.path.join(cache_dir, "documents", f"{tokenizer.fingerprint()}-{_digest(docs)}")
    os.makedirs(entry, exist_ok=True)
    with locked(entry, lambda text: None):
        if is_prepared(entry):
            try:
                return PreparedData.open(entry).split("train").tokens
            except DataError as e:
                warnings.warn(f"{e}; encoding the documents again", stacklevel=2)
        clear(entry)
        dtype = dtype_name(tokenizer.vocab_size)
        writer = ShardWriter(entry, "train", file_dtype(dtype), 1 << 40)
        items = []  # every document, even an empty one, is encoded and followed by end-of-text
        for name, data in docs:
            parts = enc.pieces(data, tokenizer.prefix_space) if tokenizer.strict_utf8 else [data]
            offset = 0
            for i, part in enumerate(parts or [b""]):
                items.append(("piece", name, enc.TRAIN, part, offset, i == max(len(parts), 1) - 1, len(data)))
                offset += len(part)
        res = enc.encode_batch(items, tokenizer, enc.SplitRule(0.0), "text", dtype) if items else None
        writer.write(res.tokens[0] if res else np.empty(0, dtype))
        shards = writer.finish()
        write_manifest(
            entry,
            {
                "format": FORMAT,
                "version": VERSION,
                "tokenizer": {
                    "name": tokenizer.name,
                    "fingerprint": tokenizer.fingerprint(),
                    "file": None,
                    "vocab_size": int(tokenizer.vocab_size),
                    "eos_id": int(tokenizer.eos_id),
                    "eos_token": tokenizer.eos_token,
                },
                "dtype": dtype,
                "byte_order": "little",
                "checksum": "crc32",
                "splits": {
                    "train": {
                        "documents": len(docs),
                        "text_bytes": sum(len(d) for _, d in docs),
                        "tokens": writer.tokens,
                        "shards": shards,
                    },
                    "val": {"documents": 0, "text_bytes": 0, "tokens": 0, "shards": []},
                },
            },
        )
    return PreparedData.open(entry).split("train").tokens
