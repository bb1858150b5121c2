"""Reading for the prepare step: the documents of the input files, in order, as the items
:mod:`mlalm.data.encode` encodes; the split rule (exact up front for text files, corrected
after a pass otherwise); and the sample of the training split a BPE is trained on.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import zlib
from typing import Any, cast

from mlalm.data import encode as enc
from mlalm.data.formats import Stream, blocks, json_records, lines, looks_binary, parquet_batches
from mlalm.errors import DataError


def _nonempty(f) -> bool:
    """Whether a text file holds anything but ASCII whitespace (reads up to the first
    other byte, usually the first)."""
    with Stream(f) as s:
        return any(b.strip() for b in blocks(s, 1 << 16))


def _size_of(f) -> int:
    if not f.compression:
        return f.size
    with Stream(f) as s:
        for _ in blocks(s):
            pass
        return s.offset


def initial_rule(files, val_fraction: float, key: str) -> enc.SplitRule:
    """The split rule, exact when every input is a text file (their documents are known
    up front); otherwise the plain name rule, corrected after a pass if needed."""
    if val_fraction <= 0:
        return enc.SplitRule(0.0)
    if any(f.format != "text" for f in files):
        return enc.SplitRule(val_fraction)
    docs = [f for f in files if _nonempty(f)]
    if not docs:
        raise DataError(
            f"{key}: {_where(files)} contains no text (empty and whitespace-only documents are dropped)"
        )
    if len(docs) == 1:
        return enc.SplitRule(val_fraction, single=docs[0].path, single_bytes=_size_of(docs[0]))
    rule = enc.SplitRule(val_fraction)
    splits = [rule.of(f.path, f.key) for f in docs]
    if enc.VAL not in splits:
        return dataclasses.replace(rule, overrides=((docs[-1].path, enc.VAL),))
    if enc.TRAIN not in splits:
        return dataclasses.replace(rule, overrides=((docs[0].path, enc.TRAIN),))
    return rule


def corrected_rule(rule: enc.SplitRule, summary: enc.Summary, files, key: str) -> enc.SplitRule:
    """The rule that the documents seen in a pass call for (the same when it fits)."""
    if summary.documents == 0:
        raise DataError(
            f"{key}: {_where(files)} contains no text (empty and whitespace-only documents are dropped)"
        )
    if rule.val_fraction <= 0 or rule.single:
        return rule
    first, last = summary.first, summary.last
    assert first is not None and last is not None  # the summary has documents
    if summary.documents == 1:
        return enc.SplitRule(rule.val_fraction, single=first[0], single_bytes=first[2])
    if not summary.splits[enc.VAL]:
        return dataclasses.replace(rule, overrides=rule.overrides + ((last[0], enc.VAL),))
    if not summary.splits[enc.TRAIN]:
        return dataclasses.replace(rule, overrides=rule.overrides + ((first[0], enc.TRAIN),))
    return rule


def _where(files) -> str:
    return files[0].path if len(files) == 1 else f"{len(files)} files ({files[0].path}, ...)"


# ---------------------------------------------------------------------------------------
# Reading: documents -> items (see mlalm.data.encode)
# ---------------------------------------------------------------------------------------


class Reader:
    """Items of every input file in order; ``consumed`` is the input bytes read so far."""

    def __init__(self, files, rule, text_key: str, *, chunk: bool, before_space: bool, batch_bytes: int):
        self.files, self.rule, self.text_key = files, rule, text_key
        self.chunk, self.before_space, self.batch_bytes = chunk, before_space, batch_bytes
        self.consumed, self._warned = 0, set()

    def _text(self, f, s: Stream):
        name = f.path
        src = blocks(s)
        head = []
        for b in src:
            head.append(b)
            if b.strip():
                break
        else:
            return  # empty or whitespace only: not a document
        if f.path not in self._warned and looks_binary(b"".join(head)[:8192]):
            self._warned.add(f.path)
            warnings.warn(
                f"{f.path}: looks like binary data (NUL or control bytes in its first "
                f"8 KB); it is read as text",
                stacklevel=2,
            )
        data = (b for part in (head, src) for b in part)
        if self.rule.single == name:
            cut = int(self.rule.single_bytes * (1 - self.rule.val_fraction))
            parts = enc.split_stream(data, cut)
        else:
            split = self.rule.of(name, f.key)
            parts = ((split, b) for b in data)
        # each part (the whole document, or its train and val parts) ends with a piece
        # marked last, carrying the part's size; offsets are in the document, for errors
        current, offset, size = None, 0, 0
        chunker: enc.Chunker | None = None  # set with current
        for split, b in parts:
            if split != current:
                if current is not None:
                    assert chunker is not None
                    tail = chunker.flush()
                    yield (
                        "piece",
                        name,
                        current,
                        tail[0] if tail else b"",
                        offset,
                        True,
                        size + (len(tail[0]) if tail else 0),
                    )
                    offset += len(tail[0]) if tail else 0
                current, chunker, size = split, enc.Chunker(self.before_space), 0
            assert chunker is not None
            for piece in chunker.feed(b) if self.chunk else [b]:
                if piece:
                    yield ("piece", name, split, piece, offset, False, 0)
                    offset += len(piece)
                    size += len(piece)
        if current is not None:
            assert chunker is not None
            tail = chunker.flush()
            yield (
                "piece",
                name,
                current,
                tail[0] if tail else b"",
                offset,
                True,
                size + (len(tail[0]) if tail else 0),
            )

    def items(self):
        base = 0
        for f in self.files:
            if f.format == "parquet":
                for row, texts, done in parquet_batches(f, self.text_key, self.batch_bytes):
                    self.consumed = base + done
                    for i, text in enumerate(texts):
                        yield ("record", f.path, f.key, row + i, text)
            else:
                with Stream(f) as s:
                    if f.format == "text":
                        for item in self._text(f, s):
                            self.consumed = base + s.raw_position()
                            yield item
                    else:
                        mode, recs = (
                            json_records(s, self.text_key) if f.format == "json" else ("lines", lines(s))
                        )
                        kind = "record" if mode == "array" else "line"
                        for n, raw in recs:
                            self.consumed = base + s.raw_position()
                            yield (kind, f.path, f.key, n, raw)
            base += f.size
            self.consumed = base

    def batches(self):
        batch, size = [], 0
        for item in self.items():
            batch.append(item)
            payload = item[3] if item[0] == "piece" else item[4]
            size += len(payload) if payload is not None else 0
            if size >= self.batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


# ---------------------------------------------------------------------------------------
# BPE on a sample of the training split
# ---------------------------------------------------------------------------------------


def _sample_texts(files, rule, text_key: str, sample_bytes: int, taken: list):
    """Training-split text pieces for BPE (module docstring); ``taken[0]`` counts bytes."""
    ratio = {None: 1, "gzip": 3, "zstd": 3}
    est = sum(f.size * (3 if f.format == "parquet" else ratio[f.compression]) for f in files)
    rate = min(1.0, sample_bytes / max(est * (1 - rule.val_fraction), 1))

    def chosen(key: str) -> bool:
        return rate >= 1 or zlib.crc32(b"bpe\0" + key.encode()) < rate * 2**32

    reader = Reader(files, rule, text_key, chunk=True, before_space=False, batch_bytes=4 << 20)
    for f in files:
        if taken[0] >= sample_bytes:
            return
        if f.format == "text":
            with Stream(f) as s:
                for i, item in enumerate(reader._text(f, s)):
                    if item[2] != enc.TRAIN:
                        break
                    if item[3] and chosen(f"{f.key}#{i}"):
                        taken[0] += len(item[3])
                        yield enc.check_utf8(item[3], f.path, item[4])
                        if taken[0] >= sample_bytes:
                            return
            continue
        reader.files = [f]
        for item in reader.items():
            # a JSON Lines line or a record: f is not a text file, so no pieces
            path, key, n, raw = cast("tuple[str, str, int, Any]", item[1:])
            name, dkey = f"{path}:{n}", f"{key}:{n}"
            if rule.single != name and (rule.of(name, dkey) != enc.TRAIN or not chosen(dkey)):
                continue
            if item[0] == "line":
                data = enc.parse_line(raw, text_key, name)
            else:
                data = raw.encode("utf-8") if isinstance(raw, str) else raw
            if not data or not data.strip():
                continue
            if rule.single == name:
                data = data[: rule.cut(data)]
            for piece in enc.pieces(data):
                taken[0] += len(piece)
                yield enc.check_utf8(piece, name)
            if taken[0] >= sample_bytes:
                return


def train_bpe(files, rule, *, text_key: str, vocab_size: int, sample_bytes: int, log):
    from mlalm.data.tokenizers import BPETokenizer

    taken = [0]
    t0 = time.perf_counter()
    tok = BPETokenizer.train(_sample_texts(files, rule, text_key, sample_bytes, taken), vocab_size)
    seconds = time.perf_counter() - t0
    log(
        f"prepare: BPE with {tok.vocab_size} tokens trained on {taken[0] / 1e6:.1f} MB of the "
        f"training split in {seconds:.0f}s"
    )
    return tok, {
        "vocab_size": vocab_size,
        "sample_bytes": sample_bytes,
        "sampled_bytes": taken[0],
        "train_seconds": round(seconds, 3),
    }
