"""Input files: which files a list of inputs names, their formats, and streaming readers.

Formats, by suffix (after an optional ``.gz`` or ``.zst``):

* ``.jsonl``, ``.ndjson``: JSON Lines, one document per record (its ``text_key`` field);
* ``.json``: JSON Lines too, or one JSON array of objects when the file starts with ``[``
  (read whole, so only for small files);
* ``.parquet``: one document per row of the ``text_key`` column, read one record batch at
  a time (never a whole file);
* anything else: a text file, one file = one document; suffixes of formats that cannot be
  read as text (archives, other compressions, binary array formats) are an error.

Every reader streams with bounded memory, and every error is a one-line
:class:`~mlalm.errors.DataError` naming the file (and the line or byte offset).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import stat
import zlib

from mlalm.errors import DataError

BLOCK = 1 << 20
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# formats that are not text and that no reader here understands
UNSUPPORTED = {
    ".bz2",
    ".xz",
    ".lzma",
    ".lz4",
    ".br",
    ".zip",
    ".tar",
    ".tgz",
    ".7z",
    ".rar",
    ".arrow",
    ".feather",
    ".orc",
    ".avro",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".h5",
    ".hdf5",
    ".safetensors",
    ".gguf",
}
SUPPORTED = (
    "text files (any other suffix), .jsonl/.ndjson/.json and .parquet; text and JSON "
    "compressed with .gz or .zst"
)
JSON_ARRAY_LIMIT = 256 * 2**20  # a .json array is parsed whole; larger ones must be JSON Lines


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # 'text' | 'jsonl' | 'json' | 'parquet'
    compression: str | None  # None | 'gzip' | 'zstd'
    size: int  # bytes on disk
    mtime_ns: int

    @property
    def key(self) -> str:
        """The file's name for the split rule: its basename without a compression suffix,
        so ``a.txt.gz`` splits like ``a.txt``."""
        base = os.path.basename(self.path)
        return base[: -len(os.path.splitext(base)[1])] if self.compression else base


def _format_of(path: str) -> tuple[str, str | None]:
    base = os.path.basename(path).lower()
    stem, suffix = os.path.splitext(base)
    compression = COMPRESSIONS.get(suffix)
    if compression:
        stem, suffix = os.path.splitext(stem)
    if suffix in UNSUPPORTED or (compression and suffix == ".parquet"):
        shown = suffix + ("." + {"gzip": "gz", "zstd": "zst"}[compression] if compression else "")
        raise DataError(f"{path}: unknown input format '{shown}' (supported: {SUPPORTED})")
    return RECORD_FORMATS.get(suffix, "text"), compression


def _walk(root: str) -> list[str]:
    """Every non-hidden file under ``root``: each directory's files (sorted), then its
    subdirectories (sorted), depth first."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(n for n in dirs if not n.startswith("."))
        files += [os.path.join(d, n) for n in sorted(names) if not n.startswith(".")]
    return files


def _describe(inp: str, key: str) -> list[str]:
    if os.path.isdir(inp):
        return _walk(inp)
    if os.path.lexists(inp):
        return [inp]
    if glob.has_magic(inp):
        matches = sorted(glob.glob(inp, recursive=True))
        if not matches:
            raise DataError(f"{key}: no file matches {inp}")
        return [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
    raise DataError(f"{key}: no such file or directory: {inp}")


def expand_inputs(inputs, *, key: str = "input") -> list[InputFile]:
    """The files named by ``inputs`` (files, directories read recursively, or globs), in
    order, each once.

    Raises:
        DataError: a missing path, a glob without match, a file that is not a regular file
            (FIFO, device, socket: reading one could hang or never end), an unknown format.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out, seen = [], set()
    for inp in inputs:
        for path in _describe(os.fspath(inp), key):
            try:
                st = os.stat(path)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
            if not stat.S_ISREG(st.st_mode):
                raise DataError(
                    f"{path}: not a regular file (a FIFO, device or socket); give "
                    f"text, JSON Lines or parquet files or directories of them"
                )
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            fmt, comp = _format_of(path)
            out.append(InputFile(path, fmt, comp, st.st_size, st.st_mtime_ns))
    return out


def looks_binary(head: bytes) -> bool:
    """Whether the first bytes of a file look like binary data rather than text: a NUL
    byte, or more than 10% control characters other than tab, newlines, form feed, escape."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    text_controls = {8, 9, 10, 11, 12, 13, 27}
    controls = sum(1 for b in head if (b < 32 and b not in text_controls) or b == 127)
    return controls > len(head) // 10


# ---------------------------------------------------------------------------------------
# Byte streams
# ---------------------------------------------------------------------------------------


class Stream:
    """The (decompressed) bytes of one input file, read in bounded pieces.

    ``offset`` counts decompressed bytes read so far; errors name the file, the compressed
    byte offset reached and the decompressed offset.
    """

    def __init__(self, f: InputFile):
        self.f, self.offset = f, 0
        try:
            self.raw = open(f.path, "rb")
        except OSError as e:
            raise DataError(f"{f.path}: cannot read ({e.strerror})") from None
        self._gz = gzip.GzipFile(fileobj=self.raw, mode="rb") if f.compression == "gzip" else None
        if f.compression == "zstd":
            import zstandard

            self._zctx = zstandard.ZstdDecompressor()
            self._zobj, self._zbuf, self._zpending = self._zctx.decompressobj(), b"", False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.raw.close()

    def _fail(self, e: Exception):
        what = self.f.compression if self.f.compression in ("gzip", "zstd") else ""
        raise DataError(
            f"{self.f.path}: corrupt {what} stream near compressed byte "
            f"{self.raw.tell():,} (after {self.offset:,} decompressed bytes): "
            f"{str(e) or e.__class__.__name__}"
        ) from None

    def _read_zstd(self, n: int) -> bytes:
        import zstandard

        # decompressobj, not stream_reader: the latter ends silently on a truncated frame
        while len(self._zbuf) < n:
            chunk = self.raw.read(1 << 15)
            if not chunk:
                if self._zpending:
                    raise EOFError("the last zstd frame is truncated")
                break
            try:
                while chunk:
                    self._zbuf += self._zobj.decompress(chunk)
                    self._zpending, chunk = True, b""
                    if self._zobj.eof:  # a frame ended: the next one (if any) starts afresh
                        chunk, self._zpending = self._zobj.unused_data, False
                        self._zobj = self._zctx.decompressobj()
            except zstandard.ZstdError as e:
                raise OSError(str(e)) from None
        out, self._zbuf = self._zbuf[:n], self._zbuf[n:]
        return out

    def read(self, n: int = BLOCK) -> bytes:
        try:
            if self._gz is not None:
                data = self._gz.read(n)
            elif self.f.compression == "zstd":
                data = self._read_zstd(n)
            else:
                data = self.raw.read(n)
        except (OSError, EOFError, zlib.error) as e:
            if self.f.compression:
                self._fail(e)
            raise DataError(f"{self.f.path}: cannot read ({e})") from None
        self.offset += len(data)
        return data

    def raw_position(self) -> int:
        """Bytes of the file on disk consumed so far (for progress)."""
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0


def blocks(stream: Stream, size: int = BLOCK):
    """The stream as consecutive byte blocks of at most ``size`` bytes."""
    while True:
        data = stream.read(size)
        if not data:
            return
        yield data


def lines(stream: Stream, first: bytes = b""):
    """``(line number from 1, line without its newline)`` for every line of the stream,
    ``first`` (bytes already read from it) included.  A line of any length is joined
    once, when its newline arrives."""
    lineno, pending = 0, []
    source = blocks(stream)
    chunk = first or next(source, b"")
    while chunk:
        parts = chunk.split(b"\n")
        if len(parts) > 1:
            head = b"".join(pending + [parts[0]]) if pending else parts[0]
            pending = []
            lineno += 1
            yield lineno, head
            for line in parts[1:-1]:
                lineno += 1
                yield lineno, line
        if parts[-1]:
            pending.append(parts[-1])
        chunk = next(source, b"")
    if pending:
        yield lineno + 1, b"".join(pending)


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def record_text(obj, text_key: str, where: str) -> bytes:
    """The UTF-8 text of one JSON record's ``text_key`` field."""
    if not isinstance(obj, dict) or text_key not in obj:
        raise DataError(f"{where}: no '{text_key}' field (set data.text_key or --text-key)")
    text = obj[text_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_key}' is not a string")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field '{text_key}' holds an unpaired surrogate at character {e.start}"
        ) from None


def parse_line(line: bytes, text_key: str, where: str) -> bytes | None:
    """The text of one JSON Lines line (None for a blank line)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e.__class__.__name__}: {e})") from None
    return record_text(obj, text_key, where)


def json_records(stream: Stream, text_key: str):
    """For a ``.json`` file: ``('array', [(number from 1, text)])`` when it is one JSON
    array (parsed whole, at most JSON_ARRAY_LIMIT bytes), else ``('lines', iterator of
    (line number, raw line))`` as for JSON Lines."""
    first = stream.read(BLOCK)
    if not first.lstrip().startswith(b"["):
        return "lines", lines(stream, first)
    parts, size = [first], len(first)
    while True:
        data = stream.read(BLOCK)
        if not data:
            break
        size += len(data)
        if size > JSON_ARRAY_LIMIT:
            raise DataError(
                f"{stream.f.path}: a JSON array larger than "
                f"{JSON_ARRAY_LIMIT // 2**20} MiB; write it as JSON Lines (one "
                f"object per line), which is read as a stream"
            )
        parts.append(data)
    try:
        items = json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{stream.f.path}: not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(items, list):
        raise DataError(f"{stream.f.path}: expected a JSON array of objects")
    return "array", [
        (i + 1, record_text(obj, text_key, f"{stream.f.path}: element {i + 1}"))
        for i, obj in enumerate(items)
    ]


def parquet_batches(f: InputFile, text_key: str, batch_bytes: int = 4 * 2**20):
    """``(first row number from 1, list of texts (str, bytes or None), file bytes read)`` per
    record batch of the ``text_key`` column, with about ``batch_bytes`` of text each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{f.path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DataError(
            f"{f.path}: no column '{text_key}' (columns: {', '.join(schema.names)}); "
            f"set data.text_key or --text-key"
        )
    tp = schema.field(text_key).type
    if not (
        pa.types.is_string(tp)
        or pa.types.is_large_string(tp)
        or pa.types.is_binary(tp)
        or pa.types.is_large_binary(tp)
        or str(tp) in ("string_view", "binary_view")
    ):
        raise DataError(f"{f.path}: column '{text_key}' holds {tp}, not text")
    meta = pf.metadata
    rows = max(meta.num_rows, 1)
    col = schema.names.index(text_key)
    text_size = (
        sum(meta.row_group(i).column(col).total_uncompressed_size for i in range(meta.num_row_groups))
        if meta.num_row_groups
        else 0
    )
    per_batch = max(1, min(1 << 16, batch_bytes * rows // max(text_size, 1)))
    row = 1
    try:
        for batch in pf.iter_batches(batch_size=per_batch, columns=[text_key], use_threads=False):
            texts = batch.column(0).to_pylist()
            yield row, texts, f.size * (row - 1 + len(texts)) // rows
            row += len(texts)
    except (OSError, pa.ArrowException) as e:
        raise DataError(
            f"{f.path}: corrupt parquet data after row {row - 1:,} ({str(e).splitlines()[0]})"
        ) from None
