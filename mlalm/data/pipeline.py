"""The Grain pipeline over token streams: training windows, mixtures, evaluation windows.

Training draws non-overlapping windows of ``seq_len + 1`` tokens starting every
``seq_len`` tokens of a split's stream (consecutive windows share one token: the last
target of one is the first input of the next), shuffled with a seed (a new order each
epoch), batched and prefetched by Grain.  The pipeline shuffles and batches window
INDICES; each process of a multi-process run then keeps its slice of every global batch
of indices and reads only those windows.  The iterator's state (``get_state``) is a small
dict that checkpoints store; ``set_state`` resumes bitwise.

A mixture interleaves several sources in proportion to their weights with
``grain.MapDataset.mix``: a deterministic schedule (element k comes from the source
whose running share is furthest behind its weight; weights are rounded to integers
scaled so the smallest is 100), so every stretch of the stream holds each source in its
proportion, and each source's windows are shuffled with their own seed.
"""

from __future__ import annotations

import grain
import numpy as np

from mlalm.errors import DataError


class Windows:
    """Random-access source of non-overlapping windows of ``seq_len + 1`` tokens."""

    def __init__(self, tokens, seq_len: int, *, name: str = "corpus"):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(
                f"{name} has {len(tokens)} tokens, fewer than one window of "
                f"train.seq_len + 1 = {seq_len + 1}; lower train.seq_len or add data"
            )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


class _ReadRows:
    """Global batch of window indices -> this process's rows [per, seq_len + 1] (int32)
    (and, for a mixture, their source ids [per])."""

    def __init__(self, windows: list[Windows], shard_index: int, per: int, with_source: bool):
        self.windows, self.lo, self.hi = windows, shard_index * per, (shard_index + 1) * per
        self.with_source = with_source

    def __call__(self, index_B):
        index_B = np.asarray(index_B)[self.lo : self.hi]
        if index_B.ndim == 1:  # one source
            rows = np.stack([self.windows[0][i] for i in index_B.tolist()])
            source_B = np.zeros(len(index_B), np.int32)
        else:  # (source, window) pairs
            rows = np.stack([self.windows[s][i] for s, i in index_B.tolist()])
            source_B = index_B[:, 0].astype(np.int32)
        return (rows, source_B) if self.with_source else rows


class _Tag:
    """Window index -> (source id, window index)."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, i):
        return np.asarray([self.source, i], dtype=np.int64)


def _check_shards(batch_size: int, shard_count: int) -> int:
    if not 0 < shard_count or batch_size % shard_count:
        raise DataError(f"train.batch_size={batch_size} is not divisible by {shard_count} processes")
    return batch_size // shard_count


def _finish(index_ds, windows, *, batch_size, shard_index, shard_count, prefetch, num_threads, with_source):
    per = _check_shards(batch_size, shard_count)
    ds = index_ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_ReadRows(windows, shard_index, per, with_source))
    options = grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(options)


def train_dataset(
    tokens,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 1,
    name: str = "training split",
    with_source: bool = False,
) -> grain.IterDataset:
    """Endless shuffled batches ``[batch_size / shard_count, seq_len + 1]`` (int32) for one
    process of ``shard_count``.

    Every process shuffles the same global order of windows and reads the rows
    ``shard_index * per .. (shard_index + 1) * per`` of every global batch, so the union of
    the processes' batches is the single-process batch.  ``with_source``: batches are
    ``(rows, source ids)`` (all 0 here; see :func:`mixture_dataset`).
    """
    windows = Windows(tokens, seq_len, name=name)
    _check_shards(batch_size, shard_count)
    index = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat()
    return _finish(
        index,
        [windows],
        batch_size=batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        prefetch=prefetch,
        num_threads=num_threads,
        with_source=with_source,
    )


def _source_seed(seed: int, source: int) -> int:
    return (seed * 1_000_003 + source * 7919) % (2**31 - 1)


def mixture_dataset(
    sources,
    weights,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 1,
    names=None,
    with_source: bool = False,
) -> grain.IterDataset:
    """Endless batches mixing the token streams ``sources`` in proportion to ``weights``.

    Rows of a global batch follow the module docstring's schedule; each source's windows
    are shuffled (a new order each epoch of that source) and repeated.  ``with_source``:
    batches are ``(rows, source ids [rows])``, so the trainer can count each source's tokens.
    """
    if len(sources) != len(weights) or not sources:
        raise DataError(
            f"a mixture needs one weight per source, got {len(sources)} sources and {len(weights)} weights"
        )
    names = names or [f"source {k}" for k in range(len(sources))]
    windows = [Windows(s, seq_len, name=n) for s, n in zip(sources, names)]
    _check_shards(batch_size, shard_count)
    parts = [
        grain.MapDataset.range(len(w)).shuffle(seed=_source_seed(seed, k)).repeat().map(_Tag(k))
        for k, w in enumerate(windows)
    ]
    index = grain.MapDataset.mix(parts, [float(w) for w in weights])
    return _finish(
        index,
        windows,
        batch_size=batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        prefetch=prefetch,
        num_threads=num_threads,
        with_source=with_source,
    )


def eval_batches(
    tokens, *, seq_len: int, batch_size: int, max_batches: int = 0, name: str = "validation split"
):
    """Sequential non-overlapping windows in batches; the last batch may be short."""
    windows = Windows(tokens, seq_len, name=name)
    n = len(windows)
    if max_batches:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        yield np.stack([windows[i] for i in range(start, min(start + batch_size, n))])


def __getattr__(name):
    # earlier homes of these names (kept importable from here)
    if name in ("Corpus", "load_corpus"):
        from mlalm.data import corpus

        return getattr(corpus, name)
    if name in ("cached_tokens", "default_cache_dir"):
        from mlalm.data import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'mlalm.data.pipeline' has no attribute {name!r}")
