"""Corpus sources: the built-in corpus, text files, directories and JSONL.

A corpus is a list of documents ``(name, bytes)``.  Bytes, not str: the byte tokenizer
takes any input, non-UTF-8 included, and bits-per-byte needs the byte count.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib

from mlalm.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def builtin_documents() -> list[tuple[str, bytes]]:
    """The built-in corpus: the top-level ``*.py`` modules of this Python's standard library.

    Present on every machine that runs Python, so ``python train.py`` needs no download.
    (Roughly 200 files and 7 MB on CPython 3.11; the exact set follows the Python version.)
    """
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(root) if f.endswith(".py") and not f.startswith("."))
    docs = []
    for name in names:
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
        if data.strip():
            docs.append((name, data))
    if not docs:
        raise DataError(f"built-in corpus: no .py files found under {root}")
    return docs


def _read_jsonl(path: str, text_key: str) -> list[tuple[str, bytes]]:
    docs = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.__class__.__name__}: {e})")
            if not isinstance(obj, dict) or text_key not in obj:
                raise DataError(f"{path}:{lineno}: no '{text_key}' field (set data.text_key)")
            text = obj[text_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field '{text_key}' is not a string")
            docs.append((f"{path}:{lineno}", text.encode("utf-8")))
    return docs


def read_documents(path: str, text_key: str = "text", *, key: str = "data.path") -> list[tuple[str, bytes]]:
    """Documents of a text file, a JSONL file, or every file under a directory (sorted).

    Raises:
        DataError: missing path, unreadable file, bad JSONL line, or no text at all.
    """
    if not os.path.exists(path):
        raise DataError(f"{key}: no such file or directory: {path}")
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    else:
        files = [path]
    docs = []
    for fpath in files:
        try:
            if fpath.endswith(JSONL_SUFFIXES):
                docs += _read_jsonl(fpath, text_key)
            else:
                with open(fpath, "rb") as f:
                    docs.append((fpath, f.read()))
        except OSError as e:
            raise DataError(f"{fpath}: cannot read ({e.strerror})")
    docs = [(n, d) for n, d in docs if d.strip()]
    if not docs:
        raise DataError(f"{key}: {path} contains no text")
    return docs


def split_documents(docs, val_fraction: float):
    """Deterministic train/validation split.

    One document: its first (1 - f) of the bytes train (moved back to a UTF-8 character
    boundary), the rest validate (the usual Tiny Shakespeare split).  Several: a document validates when crc32(name) falls in the
    fraction, so the split depends on names, not on order or a random draw; each side
    keeps at least one document.
    """
    if len(docs) == 1:
        name, data = docs[0]
        cut = int(len(data) * (1 - val_fraction))
        while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1  # never split a UTF-8 character
        return [(name, data[:cut])], [(name, data[cut:])]
    threshold = int(val_fraction * 1000)
    val = [d for d in docs if zlib.crc32(os.path.basename(d[0]).encode()) % 1000 < threshold]
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
