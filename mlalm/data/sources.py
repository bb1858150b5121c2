"""Corpus sources as documents in memory: the built-in corpus, and any input the readers of
:mod:`mlalm.data.formats` understand (text, JSON Lines/JSON, parquet, .gz/.zst).

A document is ``(name, bytes)``: bytes, not str, because the byte tokenizer takes any
input, non-UTF-8 included, and bits per byte needs the byte count.  Names: a text file's
path, or ``path:N`` for record N (line of a JSON Lines file, element of a JSON array, row
of a parquet file).  These lists hold whole corpora in memory: for evaluation of small
files and for tests; training prepares data as a stream (:mod:`mlalm.data.prepare`) with
the same documents and the same split.
"""

from __future__ import annotations

import os
import re
import zlib

from mlalm.data.cache import builtin_files
from mlalm.data.formats import Stream, blocks, expand_inputs, json_records, lines, parquet_batches, parse_line
from mlalm.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def builtin_documents() -> list[tuple[str, bytes]]:
    """The built-in corpus: the top-level ``*.py`` modules of this Python's standard library.

    Present on every machine that runs Python, so ``python train.py`` needs no download.
    (Roughly 200 files and 7 MB on CPython 3.11; the exact set follows the Python version.)
    """
    docs = []
    for path in builtin_files():
        with open(path, "rb") as f:
            data = f.read()
        if data.strip():
            docs.append((os.path.basename(path), data))
    if not docs:
        raise DataError("built-in corpus: no text in the standard library's .py files")
    return docs


def _file_documents(f, text_key: str) -> list[tuple[str, bytes]]:
    if f.format == "parquet":
        out = []
        for row, texts, _ in parquet_batches(f, text_key):
            for i, t in enumerate(texts):
                out.append((f"{f.path}:{row + i}", t.encode("utf-8") if isinstance(t, str) else (t or b"")))
        return out
    with Stream(f) as s:
        if f.format == "text":
            return [(f.path, b"".join(blocks(s)))]
        mode, recs = json_records(s, text_key) if f.format == "json" else ("lines", lines(s))
        if mode == "array":
            return [(f"{f.path}:{n}", data) for n, data in recs]
        out = []
        for lineno, raw in recs:
            data = parse_line(raw, text_key, f"{f.path}:{lineno}")
            if data is not None:
                out.append((f"{f.path}:{lineno}", data))
        return out


def read_documents(path, text_key: str = "text", *, key: str = "data.path") -> list[tuple[str, bytes]]:
    """Documents of a file, a directory (every non-hidden file under it, sorted) or a glob,
    in any input format; empty and whitespace-only documents are dropped.

    Raises:
        DataError: missing path, unreadable or malformed file, or no text at all.
    """
    docs = []
    for f in expand_inputs([path], key=key):
        docs += _file_documents(f, text_key)
    docs = [(n, d) for n, d in docs if d.strip()]
    if not docs:
        raise DataError(f"{key}: {path} contains no text")
    return docs


def split_key(name: str) -> str:
    """What the split rule hashes: the basename of a document's name without a compression
    suffix (``dir/a.txt.gz`` -> ``a.txt``, ``dir/b.jsonl.zst:7`` -> ``b.jsonl:7``)."""
    return re.sub(r"\.(?:gz|zst)(?=(?::\d+)?$)", "", os.path.basename(name))


def split_documents(docs, val_fraction: float):
    """Deterministic train/validation split.

    One document: its first (1 - f) of the bytes train (moved back to a UTF-8 character
    boundary), the rest validate (the usual Tiny Shakespeare split).  Several: a document
    validates when crc32(split_key(name)) % 1000 < f * 1000, so the split depends on
    names, not on order or a random draw; each side keeps at least one document.
    """
    if len(docs) == 1:
        name, data = docs[0]
        cut = int(len(data) * (1 - val_fraction))
        while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1  # never split a UTF-8 character
        return [(name, data[:cut])], [(name, data[cut:])]
    threshold = int(val_fraction * 1000)
    val = [d for d in docs if zlib.crc32(split_key(d[0]).encode()) % 1000 < threshold]
    if not val:
        val = [docs[-1]]
    if len(val) == len(docs):
        val = val[1:]  # keep at least one document for training
    val_names = {n for n, _ in val}
    return [d for d in docs if d[0] not in val_names], val


def load_splits(path: str | None, val_path: str | None, val_fraction: float, text_key: str):
    """(train_docs, val_docs) for a DataConfig's path settings."""
    if path is None:
        if val_path is not None:
            raise DataError("data.val_path is set but data.path is not")
        return split_documents(builtin_documents(), val_fraction)
    docs = read_documents(path, text_key)
    if val_path is not None:
        return docs, read_documents(val_path, text_key, key="data.val_path")
    return split_documents(docs, val_fraction)
