"""Prepared directories: sharded token files, their manifest, and reading them back.

A prepared directory holds, per split (``train``, ``val``), token files
``{split}-00000.bin, ...``: raw little-endian ``uint16`` ids (``uint32`` when the
vocabulary exceeds 65,536), documents one after another, each followed by the end-of-text
id; the split's stream is the concatenation of its shards.  ``manifest.json``, written
last and atomically, makes the directory complete and self-describing: tokenizer (and
``tokenizer.json`` beside it), dtype, per split the shards with their token count, byte
size and CRC-32, the documents and UTF-8 bytes of text (for bits per byte), the sources
and the split rule.

Verification.  Opening reads the manifest and stats every shard: a missing shard or one
whose size differs (truncated, replaced) is a DataError, in O(number of shards).  The
full check -- CRC-32 of every shard, about 3 GB/s -- runs when a directory is opened with
``verify='full'`` (``scripts/prepare.py --verify DIR``), and automatically when the
directory holds at most AUTO_VERIFY_BYTES of tokens, so small prepared corpora (the cache
of a training run's text) are checked on every start while large ones start in O(1).
CRC-32 rather than a cryptographic hash: the aim is to catch truncation, bit rot and
accidental edits, at a speed that keeps verifying a 10 GB directory to seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
import zlib
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from mlalm.errors import DataError

if TYPE_CHECKING:
    from mlalm.data.tokenizers import ByteTokenizer, HFTokenizer

MANIFEST = "manifest.json"
FORMAT = "mlalm-tokens"
VERSION = 1
SPLITS = ("train", "val")
AUTO_VERIFY_BYTES = 64 * 2**20


def dtype_name(vocab_size: int) -> str:
    """'uint16' when every id fits (vocab_size <= 65,536), else 'uint32'."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def file_dtype(name: str) -> np.dtype:
    """The on-disk dtype: little-endian whatever the machine."""
    return np.dtype(name).newbyteorder("<")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Appends token ids to ``{split}-NNNNN.bin`` files of ``shard_tokens`` ids each.

    A shard is written under a unique temporary name and renamed when full (or at
    :meth:`finish`), so a reader never sees a partial shard under a final name; the
    CRC-32 is computed while writing.
    """

    def __init__(self, directory: str, split: str, dtype, shard_tokens: int):
        self.directory, self.split = directory, split
        self.dtype, self.shard_tokens = np.dtype(dtype), max(int(shard_tokens), 1)
        self.shards: list[dict] = []
        self.tokens = 0
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._f: BinaryIO | None = None  # the shard being written, under the name _tmp
        self._tmp: str | None = None
        self._n = self._crc = 0

    def _open(self) -> BinaryIO:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._tmp = os.path.join(self.directory, f".{name}.{self._tag}.tmp")
        self._f = open(self._tmp, "wb")
        self._n = self._crc = 0
        return self._f

    def _close(self) -> None:
        f, tmp = self._f, self._tmp
        assert f is not None and tmp is not None  # a shard is open
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        os.replace(tmp, os.path.join(self.directory, name))
        self.shards.append(
            {
                "file": name,
                "tokens": self._n,
                "bytes": self._n * self.dtype.itemsize,
                "crc32": f"{self._crc:08x}",
            }
        )
        self._f = self._tmp = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        pos = 0
        while pos < len(ids):
            f = self._open() if self._f is None else self._f
            take = min(len(ids) - pos, self.shard_tokens - self._n)
            data = ids[pos : pos + take].data.cast("B")  # the array's memoryview: no copy
            f.write(data)
            self._crc = zlib.crc32(data, self._crc)
            self._n += take
            self.tokens += take
            pos += take
            if self._n == self.shard_tokens:
                self._close()

    def finish(self) -> list[dict]:
        if self._f is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Delete everything this writer wrote (temporary and completed shards)."""
        if self._f is not None:
            self._f.close()
        for path in [self._tmp] + [os.path.join(self.directory, s["file"]) for s in self.shards]:
            if path and os.path.exists(path):
                os.remove(path)
        self._f = self._tmp = None
        self.shards, self.tokens = [], 0


def write_manifest(directory: str, manifest: dict) -> None:
    """Atomically: a unique temporary file, fsync, rename, fsync of the directory."""
    path = os.path.join(directory, MANIFEST)
    tmp = os.path.join(directory, f".{MANIFEST}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def is_prepared(path) -> bool:
    return path is not None and os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{directory}: not a prepared directory (no {MANIFEST}; an interrupted "
            f"prepare leaves none: run scripts/prepare.py again)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{path}: format version {manifest.get('version')} (this mlalm reads "
            f"version {VERSION}); prepare the data again"
        )
    return manifest


class TokenStream:
    """One split: a 1-D sequence of token ids over memory-mapped shards.

    ``len()``, integer indexing and slicing ``[a:b]`` (also across shard boundaries) like a
    numpy array; a slice is read from the shards it touches only.  Shards are mapped on
    first use, so creating a stream reads nothing.
    """

    ndim = 1

    def __init__(self, paths, counts, dtype):
        self.paths = [os.fspath(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.dtype = np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            try:
                m = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.counts[i],))
            except (OSError, ValueError) as e:
                raise DataError(
                    f"{self.paths[i]}: cannot map the token file ({e}); prepare the data again"
                ) from None
            self._maps[i] = m
        return m

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[start:stop][::step] if stop > start else np.empty(0, self.dtype)
            if stop <= start:
                return np.empty(0, self.dtype)
            parts, a = [], start
            i = int(np.searchsorted(self.offsets, a, side="right")) - 1
            while a < stop:
                end = min(stop, int(self.offsets[i + 1]))
                base = int(self.offsets[i])
                parts.append(np.asarray(self._map(i)[a - base : end - base]))
                a, i = end, i + 1
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {key} out of range for a stream of {n}")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self._map(s)[i - int(self.offsets[s])]

    def __array__(self, dtype=None, copy=None):
        out = self[0 : len(self)]
        return out.astype(dtype) if dtype is not None else np.array(out)

    def tolist(self) -> list[int]:
        return self[0 : len(self)].tolist()

    def __repr__(self) -> str:
        return f"TokenStream({len(self):,} tokens, {len(self.paths)} shards, {self.dtype})"


def concat(streams) -> TokenStream:
    """Streams one after another, as one stream (same dtype)."""
    streams = list(streams)
    dtype = streams[0].dtype if streams else file_dtype("uint16")
    return TokenStream([p for s in streams for p in s.paths], [c for s in streams for c in s.counts], dtype)


@dataclasses.dataclass
class Split:
    """A split of prepared data: its tokens, the UTF-8 bytes and documents of its text."""

    tokens: TokenStream
    bytes: int
    documents: int
    name: str


def _crc_file(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(8 << 20)
            if not data:
                return f"{crc:08x}"
            crc = zlib.crc32(data, crc)


class PreparedData:
    """A complete prepared directory (see the module docstring)."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest
        self._tokenizer: ByteTokenizer | HFTokenizer | None = None

    @classmethod
    def open(cls, path, *, verify: str = "auto") -> PreparedData:
        """Read the manifest and check the shards: sizes always, CRC-32 when ``verify`` is
        'full', or 'auto' and the shards total at most AUTO_VERIFY_BYTES ('size': never).

        Raises:
            DataError: no manifest (incomplete directory), a missing, truncated or edited
                shard; the message names the file.
        """
        path = os.fspath(path)
        manifest = read_manifest(path)
        total = 0
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                f = os.path.join(path, shard["file"])
                try:
                    size = os.stat(f).st_size
                except OSError:
                    raise DataError(
                        f"{f}: missing token file listed in {path}/{MANIFEST}; prepare the data again"
                    ) from None
                if size != shard["bytes"]:
                    raise DataError(
                        f"{f}: {size:,} bytes, the manifest says {shard['bytes']:,} "
                        f"(truncated or replaced); prepare the data again"
                    )
                total += size
        if verify == "full" or (verify == "auto" and total <= AUTO_VERIFY_BYTES):
            for split in SPLITS:
                for shard in manifest["splits"][split]["shards"]:
                    f = os.path.join(path, shard["file"])
                    if _crc_file(f) != shard["crc32"]:
                        raise DataError(
                            f"{f}: contents differ from the manifest's checksum (CRC-32 "
                            f"{shard['crc32']}); the file was edited or damaged: prepare "
                            f"the data again"
                        )
        return cls(path, manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        """The tokenizer the tokens were made with (``tokenizer.json`` beside the manifest)."""
        if self._tokenizer is None:
            from mlalm.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer

            t = self.manifest["tokenizer"]
            tok: ByteTokenizer | HFTokenizer
            if t["name"] == "byte":
                tok = ByteTokenizer()
            else:
                tok = load_tokenizer(
                    os.path.join(self.path, t["file"]),
                    eos_token=t["eos_token"],
                    cls=BPETokenizer if t["name"] == "bpe" else HFTokenizer,
                )
            if tok.fingerprint() != t["fingerprint"]:
                raise DataError(
                    f"{self.path}: its tokenizer ({tok.fingerprint()}) is not the one "
                    f"the tokens were made with ({t['fingerprint']}); prepare the data again"
                )
            self._tokenizer = tok
        return self._tokenizer

    def split(self, name: str) -> Split:
        s = self.manifest["splits"][name]
        stream = TokenStream(
            [os.path.join(self.path, x["file"]) for x in s["shards"]],
            [x["tokens"] for x in s["shards"]],
            file_dtype(self.manifest["dtype"]),
        )
        return Split(stream, int(s["text_bytes"]), int(s["documents"]), f"{self.path} ({name})")

    def whole(self) -> Split:
        """Every document of the directory: the train split, then the val split."""
        a, b = self.split("train"), self.split("val")
        return Split(concat([a.tokens, b.tokens]), a.bytes + b.bytes, a.documents + b.documents, self.path)


def verify(path) -> PreparedData:
    """Open ``path`` checking every shard's CRC-32 (``scripts/prepare.py --verify``)."""
    return PreparedData.open(path, verify="full")
