"""The Grain pipeline over prepared data (sharded streams, multi-process reading, mixtures)
and load_corpus (prepared directories, the cache of raw text, mixtures).

References: plain numpy slicing of the concatenated tokens, Grain's own index shuffle
(the order the pipeline promises), binomial bounds for proportions.
"""

import dataclasses
import json
import math
import os
import threading

import grain
import numpy as np
import pytest

from mlalm.config import Config
from mlalm.data import load_corpus, mixture_dataset, train_dataset
from mlalm.data.prepare import prepare
from mlalm.data.shards import PreparedData, TokenStream
from mlalm.errors import DataError

T, B = 8, 4


def _sharded(tmp_path, values: np.ndarray, sizes) -> TokenStream:
    """``values`` split into shard files of the given sizes."""
    paths, pos = [], 0
    for i, n in enumerate(sizes):
        p = tmp_path / f"{values[0]}-{i}.bin"
        p.write_bytes(values[pos : pos + n].astype("<u2").tobytes())
        paths.append(p)
        pos += n
    assert pos == len(values)
    return TokenStream(paths, sizes, "<u2")


def _take(it, k):
    return [next(it) for _ in range(k)]


def _window(tokens: np.ndarray, i: int) -> np.ndarray:
    return tokens[i * T : i * T + T + 1].astype(np.int32)


# =======================================================================================
# Training windows over sharded streams
# =======================================================================================


def test_sharded_stream_batches_are_the_shuffled_windows(tmp_path):
    ref = np.arange(24 * T + 1, dtype=np.uint16)
    stream = _sharded(tmp_path, ref, [5, 60, 1, 100, len(ref) - 166])
    it = iter(train_dataset(stream, seq_len=T, batch_size=B, seed=3))
    # Grain's index shuffle of the 24 windows (repeated epochs), read B at a time
    order = grain.MapDataset.range(24).shuffle(seed=3).repeat()
    for k, batch in enumerate(_take(it, 12)):
        want = np.stack([_window(ref, order[k * B + r]) for r in range(B)])
        np.testing.assert_array_equal(batch, want)


def test_each_process_reads_only_its_rows(tmp_path):
    ref = np.arange(40 * T + 1, dtype=np.uint16)
    full = _take(iter(train_dataset(ref, seq_len=T, batch_size=B, seed=5)), 9)

    class Counting:
        def __init__(self, a):
            self.a, self.reads = a, 0

        def __len__(self):
            return len(self.a)

        def __getitem__(self, key):
            self.reads += 1
            return self.a[key]

    parts = []
    for p in range(2):
        src = Counting(ref)
        ds = train_dataset(src, seq_len=T, batch_size=B, seed=5, shard_index=p, shard_count=2, prefetch=0)
        parts.append(_take(iter(ds), 9))
        assert src.reads == 9 * B // 2  # its own windows only, not the global batch
    for f, a, b in zip(full, *parts):
        np.testing.assert_array_equal(np.concatenate([a, b]), f)
        starts = {int(r[0]) for r in a} | {int(r[0]) for r in b}
        assert len(starts) == B  # disjoint


def test_resume_is_bitwise_over_a_prepared_directory(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(30):
        (d / f"f{i}.txt").write_text(f"document {i} " * (5 + i))
    prepare([d], tmp_path / "out", shard_bytes=512)
    stream = PreparedData.open(tmp_path / "out").split("train").tokens
    assert len(stream.paths) > 5
    it = iter(train_dataset(stream, seq_len=T, batch_size=B, seed=1))
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 6)
    it2 = iter(train_dataset(stream, seq_len=T, batch_size=B, seed=1))
    _take(it2, 2)
    it2.set_state(json.loads(json.dumps(state)))
    for a, b in zip(_take(it2, 6), expected):
        np.testing.assert_array_equal(a, b)


# =======================================================================================
# Mixtures
# =======================================================================================


def _three_sources(tmp_path):
    # source k holds values in [1000k, 1000k + n): a row's values tell its source
    return [
        _sharded(tmp_path, np.arange(1000 * k, 1000 * k + n, dtype=np.uint16), [n // 2, n - n // 2])
        for k, n in enumerate([200, 81, 500])
    ]


def test_mixture_rows_follow_the_weights(tmp_path):
    sources, weights = _three_sources(tmp_path), [0.5, 0.2, 0.3]
    it = iter(mixture_dataset(sources, weights, seq_len=T, batch_size=B, seed=0, with_source=True))
    counts, n = np.zeros(3), 0
    for rows, src in _take(it, 250):
        assert rows.shape == (B, T + 1) and src.shape == (B,)
        for row, s in zip(rows, src):
            assert int(row[0]) // 1000 == s  # the id names the source the row came from
            tokens = np.arange(1000 * s, 1000 * s + [200, 81, 500][s])
            start = int(row[0]) - 1000 * s
            assert start % T == 0 and row.tolist() == tokens[start : start + T + 1].tolist()
        counts += np.bincount(src, minlength=3)
        n += len(src)
    for k, w in enumerate(weights):
        sigma = math.sqrt(n * w * (1 - w))
        assert abs(counts[k] - n * w) < 4 * sigma, (counts, n)


def test_mixture_is_deterministic_and_resumes_bitwise(tmp_path):
    sources, weights = _three_sources(tmp_path), [1, 1, 2]

    def make(seed=0):
        return iter(mixture_dataset(sources, weights, seq_len=T, batch_size=B, seed=seed))

    a, b = _take(make(), 30), _take(make(), 30)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(_take(make(seed=1), 30)))
    it = make()
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 20)
    fresh = make()
    fresh.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(np.stack(_take(fresh, 20)), np.stack(expected))


def test_mixture_multi_process_union_is_the_global_batch(tmp_path):
    sources = _three_sources(tmp_path)
    full = _take(iter(mixture_dataset(sources, [1, 2, 3], seq_len=T, batch_size=B, seed=4)), 10)
    parts = [
        _take(
            iter(
                mixture_dataset(
                    sources, [1, 2, 3], seq_len=T, batch_size=B, seed=4, shard_index=p, shard_count=2
                )
            ),
            10,
        )
        for p in range(2)
    ]
    for f, a, b in zip(full, *parts):
        np.testing.assert_array_equal(np.concatenate([a, b]), f)


# =======================================================================================
# load_corpus
# =======================================================================================


def _cfg(tmp_path, **kw):
    return dataclasses.replace(Config().data, cache_dir=str(tmp_path / "cache"), **kw)


def _text_dir(tmp_path, name, n=12, word="word"):
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        (d / f"{name}{i}.txt").write_text(f"{word} {i} " * 40)
    return d


def test_prepared_directory_as_path_val_path_and_test_path(tmp_path):
    train = _text_dir(tmp_path, "tr")
    prepare([train], tmp_path / "ptr", val_fraction=0.25)
    val = _text_dir(tmp_path, "va", n=3, word="validation")
    prepare([val], tmp_path / "pva", val_fraction=0.3)  # all of it is evaluated
    test = _text_dir(tmp_path, "te", n=2, word="test")
    c = load_corpus(
        _cfg(tmp_path, path=str(tmp_path / "ptr"), val_path=str(tmp_path / "pva"), test_path=str(test))
    )
    ptr, pva = PreparedData.open(tmp_path / "ptr"), PreparedData.open(tmp_path / "pva")
    assert c.train.tolist() == ptr.split("train").tokens.tolist()
    assert c.val.tolist() == pva.split("train").tokens.tolist() + pva.split("val").tokens.tolist()
    assert c.val_bytes == sum(os.path.getsize(val / f) for f in os.listdir(val))
    want_test = [t for f in sorted(os.listdir(test)) for t in list((test / f).read_bytes()) + [256]]
    assert c.test.tolist() == want_test and c.test_documents == 2
    # without val_path the directory's own val split validates
    c2 = load_corpus(_cfg(tmp_path, path=str(tmp_path / "ptr")))
    assert c2.val.tolist() == ptr.split("val").tokens.tolist()
    assert (c2.train_documents, c2.val_documents) == (
        ptr.manifest["splits"]["train"]["documents"],
        ptr.manifest["splits"]["val"]["documents"],
    )
    # a directory prepared without a val split cannot validate by itself
    prepare([train], tmp_path / "pall", val_fraction=0.0)
    with pytest.raises(DataError, match="data.val_path"):
        load_corpus(_cfg(tmp_path, path=str(tmp_path / "pall")))


def test_cache_reuse_does_not_read_the_sources(tmp_path, monkeypatch):
    d = _text_dir(tmp_path, "c")
    cfg = _cfg(tmp_path, path=str(d))
    first = load_corpus(cfg)
    from mlalm.data import formats

    def no_reading(*a, **k):
        raise AssertionError("the sources were read again")

    monkeypatch.setattr(formats.Stream, "__init__", no_reading)
    second = load_corpus(cfg)
    assert second.train.tolist() == first.train.tolist()
    # a touched source (new mtime) is read again
    monkeypatch.undo()
    os.utime(d / "c0.txt", ns=(1, 1))
    monkeypatch.setattr(formats.Stream, "__init__", no_reading)
    with pytest.raises(AssertionError, match="read again"):
        load_corpus(cfg)


def test_concurrent_cache_preparation(tmp_path):
    d = _text_dir(tmp_path, "c", n=40)
    cfg = _cfg(tmp_path, path=str(d), tokenizer="bpe", bpe_vocab_size=270)
    results, errors = [], []

    def run():
        try:
            results.append(load_corpus(cfg))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 3
    assert len({r.tokenizer.fingerprint() for r in results}) == 1
    assert all(r.train.tolist() == results[0].train.tolist() for r in results)
    entries = os.listdir(tmp_path / "cache" / "prepared")
    assert len(entries) == 1
    assert not [n for n in os.listdir(tmp_path / "cache" / "prepared" / entries[0]) if n.endswith(".tmp")]


def test_load_corpus_mixture(tmp_path):
    a, b = _text_dir(tmp_path, "a", word="alpha"), _text_dir(tmp_path, "b", word="beta")
    prepare([a], tmp_path / "pa")
    prepare([b], tmp_path / "pb")
    cfg = _cfg(
        tmp_path,
        mix=({"path": str(tmp_path / "pa"), "weight": 3}, {"path": str(tmp_path / "pb"), "weight": 1}),
    )
    c = load_corpus(cfg)
    assert c.train is None and [s.weight for s in c.sources] == [3.0, 1.0]
    pa, pb = PreparedData.open(tmp_path / "pa"), PreparedData.open(tmp_path / "pb")
    assert c.val.tolist() == pa.split("val").tokens.tolist() + pb.split("val").tokens.tolist()
    assert c.train_bytes == pa.split("train").bytes + pb.split("train").bytes
    rows, src = next(iter(c.train_dataset(seq_len=T, batch_size=8, seed=0, with_source=True)))
    assert rows.shape == (8, T + 1) and sorted(np.bincount(src, minlength=2).tolist()) == [2, 6]
    # raw text in a mixture is prepared through the cache with the same tokenizer
    c2 = load_corpus(
        _cfg(tmp_path, mix=({"path": str(a), "weight": 1}, {"path": str(tmp_path / "pb"), "weight": 1}))
    )
    assert c2.sources[0].train.tokens.tolist() == pa.split("train").tokens.tolist()


def test_mixture_of_different_tokenizers_names_both(tmp_path):
    a, b = _text_dir(tmp_path, "a"), _text_dir(tmp_path, "b")
    prepare([a], tmp_path / "pa")
    prepare([b], tmp_path / "pb", tokenizer="bpe", bpe_vocab_size=270)
    cfg = _cfg(
        tmp_path,
        mix=({"path": str(tmp_path / "pa"), "weight": 1}, {"path": str(tmp_path / "pb"), "weight": 1}),
    )
    with pytest.raises(DataError) as ei:
        load_corpus(cfg)
    assert str(tmp_path / "pa") in str(ei.value) and str(tmp_path / "pb") in str(ei.value)
    assert "\n" not in str(ei.value)


def test_builtin_corpus_prepared_matches_the_in_memory_split(tmp_path):
    from mlalm.data.sources import load_splits

    train_docs, val_docs = load_splits(None, None, 0.1, "text")
    c = load_corpus(_cfg(tmp_path))
    want_val = [t for _, d in val_docs for t in list(d) + [256]]
    assert c.val.tolist() == want_val
    assert len(c.train) == sum(len(d) + 1 for _, d in train_docs)
    assert c.train_bytes == sum(len(d) for _, d in train_docs)
