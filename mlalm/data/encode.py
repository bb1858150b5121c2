"""Turning documents into token ids: the split rule, text pieces, and the encoding of one
batch (in a worker process, or in the main process for small inputs).

Split rule (as :func:`mlalm.data.sources.split_documents`): several documents -- a
document validates when ``crc32(name) % 1000 < val_fraction * 1000``, its name being the
file's basename (``a.txt``; compression suffixes dropped) or, for a record,
``basename:N`` (line N of a JSON Lines file, element N of a JSON array, row N of a
parquet file, from 1); each side keeps at least one document (when none validates the
last one does, when all do the first one trains).  One document: the first
``1 - val_fraction`` of its bytes train, cut back to a UTF-8 character boundary, the rest
validates.  ``val_fraction = 0``: everything trains.

Pieces: a document is encoded in pieces cut at the first newline at least PIECE bytes
into the rest (after the newline), so that a document of any size is encoded in bounded
memory; tokenizers that add a space before every text (sentencepiece style) are cut
before a space instead, so a piece starts with the space the tokenizer would otherwise
add.  A piece longer than MAX_PIECE without such a place is cut at a space or at a UTF-8
boundary.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from mlalm.data.formats import parse_line
from mlalm.data.tokenizers import check_utf8

PIECE = 1 << 16
MAX_PIECE = 8 << 20
TRAIN, VAL = 0, 1


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Which split each document goes to (module docstring)."""

    val_fraction: float
    single: str | None = None  # the one document, cut by bytes ...
    single_bytes: int = 0  # ... and its size (needed to cut a text file as a stream)
    overrides: tuple = ()  # ((document name, TRAIN or VAL), ...) for the edge cases

    def of(self, name: str, key: str) -> int:
        if self.val_fraction <= 0:
            return TRAIN
        for n, split in self.overrides:
            if n == name:
                return split
        return VAL if zlib.crc32(key.encode()) % 1000 < int(self.val_fraction * 1000) else TRAIN

    def cut(self, data: bytes) -> int:
        return utf8_cut(data, len(data), self.val_fraction)

    def describe(self) -> dict:
        rule = (
            "none: everything trains"
            if self.val_fraction <= 0
            else "one document: the first 1 - val_fraction of its bytes train (cut back to a UTF-8 boundary)"
            if self.single
            else "crc32(name) % 1000 < val_fraction * 1000 validates; each side keeps a document"
        )
        return {
            "val_fraction": self.val_fraction,
            "rule": rule,
            "single_document": self.single,
            "moved": {n: ("train", "val")[s] for n, s in self.overrides},
        }


def utf8_cut(data: bytes, total: int, val_fraction: float) -> int:
    """``int(total * (1 - f))`` moved back while it falls inside a UTF-8 character
    (``data`` holds at least the bytes up to and including the cut)."""
    cut = int(total * (1 - val_fraction))
    while 0 < cut < total and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def split_stream(blocks, cut: int):
    """``(TRAIN, bytes)`` pieces of ``data[:c]`` then ``(VAL, bytes)`` of ``data[c:]`` for a
    stream of blocks, ``c`` being ``cut`` moved back to a UTF-8 boundary as
    :func:`utf8_cut` does; holds back only the bytes from the last character start."""
    held, pos = b"", 0  # held = data[pos:pos + len(held)], not yet given out
    it = iter(blocks)
    for block in it:
        held += block
        if pos + len(held) > cut:
            i = cut - pos
            while i > 0 and (held[i] & 0xC0) == 0x80:
                i -= 1
            yield TRAIN, held[:i]
            yield VAL, held[i:]
            for rest in it:
                yield VAL, rest
            return
        j = len(held) - 1
        while j > 0 and (held[j] & 0xC0) == 0x80:
            j -= 1
        yield TRAIN, held[:j]
        pos, held = pos + j, held[j:]
    yield TRAIN, held


class Chunker:
    """Cuts a document, given in blocks, into pieces (module docstring); the pieces are
    the same whatever the block boundaries."""

    def __init__(self, before_space: bool = False, size: int = PIECE):
        self.sep, self.before, self.size = (b" " if before_space else b"\n"), before_space, size
        self.parts, self.length = [], 0

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        self.parts.append(data)
        self.length += len(data)
        if self.length <= self.size:
            return []
        buf = b"".join(self.parts)
        out = []
        while True:
            end = buf.find(self.sep, self.size)
            if end < 0:
                break
            cut = end if self.before else end + 1
            out.append(buf[:cut])
            buf = buf[cut:]
        while len(buf) > MAX_PIECE:  # no place to cut in MAX_PIECE bytes: a space, else a character start
            cut = buf.rfind(b" ", self.size, MAX_PIECE)
            if cut <= 0:
                cut = MAX_PIECE
                while cut > 0 and (buf[cut] & 0xC0) == 0x80:
                    cut -= 1
            out.append(buf[:cut])
            buf = buf[cut:]
        self.parts, self.length = ([buf], len(buf)) if buf else ([], 0)
        return out

    def flush(self) -> list[bytes]:
        buf = b"".join(self.parts)
        self.parts, self.length = [], 0
        return [buf] if buf else []


def pieces(data: bytes, before_space: bool = False) -> list[bytes]:
    c = Chunker(before_space)
    return c.feed(data) + c.flush()


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------
# A batch is a list of items, in document order:
#   ("piece", name, split, data, offset, last, doc_bytes)  part of a text file's document,
#        split decided by the reader; doc_bytes (the document's size) on its last piece
#   ("line", path, key, lineno, raw)                       one JSON Lines line
#   ("record", path, key, n, text)                          a parquet row / JSON array element


@dataclasses.dataclass
class Summary:
    """What the split rule's edge cases need to know about the documents seen."""

    documents: int = 0
    first: tuple | None = None  # (name, split, bytes)
    last: tuple | None = None
    splits: tuple = (False, False)

    def add(self, name: str, split: int, nbytes: int) -> None:
        if self.last is not None and self.last[0] == name:
            self.merge(
                Summary(1, (name, split, nbytes), (name, split, nbytes), (split == TRAIN, split == VAL))
            )
            return
        self.documents += 1
        self.last = (name, split, nbytes)
        if self.first is None:
            self.first = self.last
        if not self.splits[split]:
            self.splits = (True, self.splits[1]) if split == TRAIN else (self.splits[0], True)

    def merge(self, other: Summary) -> None:
        """``self`` followed by ``other``; the two parts of a document cut by bytes (same
        name, one after the other) count once."""
        if other.documents == 0:
            return
        first = other.first
        assert first is not None  # other has a document, so a first one
        if self.last is not None and self.last[0] == first[0]:
            assert self.first is not None  # self has a last document, so a first one
            joined = (first[0], first[1], self.last[2] + first[2])
            self.documents += other.documents - 1
            if self.first[0] == joined[0]:
                self.first = joined
            self.last = joined if other.documents == 1 else other.last
        else:
            self.documents += other.documents
            self.first = self.first or other.first
            self.last = other.last
        self.splits = tuple(a or b for a, b in zip(self.splits, other.splits))


@dataclasses.dataclass
class Result:
    tokens: list  # [train ids, val ids] (file dtype)
    documents: list  # documents ended, per split
    text_bytes: list  # UTF-8 bytes encoded, per split
    summary: Summary


_STATE: dict = {}


def init_worker(spec, rule: SplitRule, text_key: str, dtype: str) -> None:
    """Worker initializer: one tokenizer per process, built from its JSON."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    os.environ["RAYON_NUM_THREADS"] = "1"
    _STATE.update(tokenizer=build_tokenizer(spec), rule=rule, text_key=text_key, dtype=dtype)


def tokenizer_spec(tok):
    return None if tok.name == "byte" else (tok.tok.to_str(), tok.eos_token, tok.name)


def build_tokenizer(spec):
    from mlalm.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer

    if spec is None:
        return ByteTokenizer()
    from tokenizers import Tokenizer

    text, eos, name = spec
    cls = BPETokenizer if name == "bpe" else HFTokenizer
    kw = {} if cls is BPETokenizer else {"name": name}
    return cls(Tokenizer.from_str(text), eos_token=eos, **kw)


def worker_encode(batch):
    return encode_batch(batch, _STATE["tokenizer"], _STATE["rule"], _STATE["text_key"], _STATE["dtype"])


def encode_batch(batch, tok, rule: SplitRule, text_key: str, dtype: str) -> Result:
    """Token ids of one batch, per split, each document followed by the end-of-text id."""
    strict, before = tok.strict_utf8, tok.prefix_space
    texts: list = []  # what the tokenizer encodes, in order
    plan: list = []  # (split, index into texts or None, eos after it)
    docs, nbytes, summary = [0, 0], [0, 0], Summary()

    def add_document(name, key, data, where):
        split = rule.of(name, key)
        parts = [(split, data)]
        if rule.single == name:
            c = rule.cut(data)
            parts = [(TRAIN, data[:c]), (VAL, data[c:])]
        for split, part in parts:
            off = 0
            chunks = pieces(part, before) if strict else [part]
            for chunk in chunks:
                texts.append(check_utf8(chunk, where, off) if strict else chunk)
                plan.append((split, len(texts) - 1, False))
                off += len(chunk)
            plan.append((split, None, True))
            docs[split] += 1
            nbytes[split] += len(part)
            summary.add(name, split, len(part))

    for item in batch:
        kind = item[0]
        if kind == "piece":
            _, name, split, data, offset, last, doc_bytes = item
            if data:
                texts.append(check_utf8(data, name, offset) if strict else data)
                plan.append((split, len(texts) - 1, False))
            nbytes[split] += len(data)
            if last:
                plan.append((split, None, True))
                docs[split] += 1
                summary.add(name, split, doc_bytes)
        elif kind == "line":
            _, path, key, lineno, raw = item
            data = parse_line(raw, text_key, f"{path}:{lineno}")
            if data is not None and data.strip():
                add_document(f"{path}:{lineno}", f"{key}:{lineno}", data, f"{path}:{lineno}")
        else:
            _, path, key, n, text = item
            data = text.encode("utf-8") if isinstance(text, str) else text
            if data is not None and data.strip():
                add_document(f"{path}:{n}", f"{key}:{n}", bytes(data), f"{path}: record {n}")

    if strict:
        encoded = tok.encode_batch(texts) if texts else []
    else:
        encoded = [np.frombuffer(t, dtype=np.uint8) for t in texts]
    eos = np.asarray([tok.eos_id], dtype=dtype)
    out: list[list] = [[], []]
    for split, index, is_eos in plan:
        out[split].append(eos if is_eos else encoded[index])
    tokens = [np.concatenate(o).astype(dtype, copy=False) if o else np.empty(0, dtype) for o in out]
    return Result(tokens, docs, nbytes, summary)
