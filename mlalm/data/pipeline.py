"""Token arrays (memory-mapped cache) and the Grain pipeline over them.

Tokens of a split are cached as a raw ``.npy`` memmap named by the sha256 of the split's
content and the tokenizer's fingerprint, so a second run with the same data starts at
once.  Training draws non-overlapping windows of ``seq_len + 1`` tokens, shuffled with a
seed (a new order each epoch), batched and prefetched by Grain; the iterator's state is a
small dict that checkpoints store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

import grain
import numpy as np

from mlalm.data.sources import load_splits, read_documents
from mlalm.data.tokenizers import BPETokenizer, get_tokenizer
from mlalm.errors import DataError


@dataclasses.dataclass
class Corpus:
    tokenizer: object
    train: np.ndarray  # 1-D token ids (memmap)
    val: np.ndarray
    train_bytes: int
    val_bytes: int
    test: np.ndarray | None = None
    test_bytes: int = 0


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlalm")


def _digest(docs) -> str:
    h = hashlib.sha256()
    for name, data in docs:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def _chunks(data: bytes, size: int = 1 << 16):
    """Split text at newlines into ~size-byte pieces (for parallel BPE encoding)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start + size)
        end = len(data) if end < 0 else end + 1
        yield data[start:end]
        start = end


def _encode(tokenizer, docs) -> np.ndarray:
    """Documents joined by the tokenizer's end-of-text id."""
    parts = []
    for _, data in docs:
        if isinstance(tokenizer, BPETokenizer):
            pieces = [c.decode("utf-8", errors="replace") for c in _chunks(data)]
            parts += tokenizer.encode_batch(pieces)
        else:
            parts.append(tokenizer.encode(data))
        parts.append(np.asarray([tokenizer.eos_id], np.int32))
    return np.concatenate(parts)


def _atomic_save(path: str, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def cached_tokens(tokenizer, docs, cache_dir: str) -> np.ndarray:
    """Token ids of ``docs`` from the cache, encoding and storing them on a miss."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"tokens-{tokenizer.fingerprint()}-{_digest(docs)}.npy")
    if not os.path.isfile(path):
        ids = _encode(tokenizer, docs)
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        _atomic_save(path, ids.astype(dtype))
    return np.load(path, mmap_mode="r")


def load_corpus(data_cfg, *, tokenizer_path: str | None = None) -> Corpus:
    """Read, split, tokenize (cached) the corpus a DataConfig names.

    Args:
        tokenizer_path: a BPE tokenizer.json to reuse (e.g. the run directory's); when
            absent a BPE tokenizer is trained on the training split and cached.
    """
    train_docs, val_docs = load_splits(data_cfg.path, data_cfg.val_path, data_cfg.val_fraction,
                                       data_cfg.text_key)
    cache_dir = data_cfg.cache_dir or default_cache_dir()
    if data_cfg.tokenizer == "bpe" and not (tokenizer_path and os.path.isfile(tokenizer_path)):
        # a BPE model trained on this training split is cached by content and vocab size
        cached = os.path.join(cache_dir, f"bpe-{data_cfg.bpe_vocab_size}-{_digest(train_docs)}.json")
        if not os.path.isfile(cached):
            texts = (c.decode("utf-8", errors="replace") for _, d in train_docs for c in _chunks(d))
            tok = get_tokenizer("bpe", train_texts=texts, vocab_size=data_cfg.bpe_vocab_size)
            os.makedirs(cache_dir, exist_ok=True)
            tmp = cached + ".tmp"
            tok.tok.save(tmp)
            os.replace(tmp, cached)
        tokenizer_path = cached
    tokenizer = get_tokenizer(data_cfg.tokenizer, vocab_size=data_cfg.bpe_vocab_size, path=tokenizer_path)
    test = None
    if data_cfg.test_path:
        test_docs = read_documents(data_cfg.test_path, data_cfg.text_key, key="data.test_path")
        test = (cached_tokens(tokenizer, test_docs, cache_dir), sum(len(d) for _, d in test_docs))
    return Corpus(tokenizer=tokenizer,
                  train=cached_tokens(tokenizer, train_docs, cache_dir),
                  val=cached_tokens(tokenizer, val_docs, cache_dir),
                  train_bytes=sum(len(d) for _, d in train_docs),
                  val_bytes=sum(len(d) for _, d in val_docs),
                  test=test[0] if test else None, test_bytes=test[1] if test else 0)


class Windows:
    """Random-access source of non-overlapping windows of ``seq_len + 1`` tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, name: str = "corpus"):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"{name} has {len(tokens)} tokens, fewer than one window of "
                            f"train.seq_len + 1 = {seq_len + 1}; lower train.seq_len or add data")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1, prefetch: int = 2,
                  num_threads: int = 1, name: str = "training split") -> grain.IterDataset:
    """Endless shuffled batches [batch_size, seq_len + 1] (int32) for one process.

    Every process shuffles the same global order and keeps its own slice of every
    global batch, so the union of the processes' batches is the single-process batch.
    """
    windows = Windows(tokens, seq_len, name=name)
    if batch_size % shard_count:
        raise DataError(f"train.batch_size={batch_size} is not divisible by {shard_count} processes")
    ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    if shard_count > 1:
        per = batch_size // shard_count
        ds = ds.map(lambda b: b[shard_index * per:(shard_index + 1) * per])
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(options)


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int = 0,
                 name: str = "validation split"):
    """Sequential non-overlapping windows in batches; the last batch may be short."""
    windows = Windows(tokens, seq_len, name=name)
    n = len(windows)
    if max_batches:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        yield np.stack([windows[i] for i in range(start, min(start + batch_size, n))])
