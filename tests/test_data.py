"""mlalm.data: tokenizers, corpus sources and splits, the token cache, and the Grain pipeline.

Every expectation here is computed independently of the code under test: Python's own
bytes / UTF-8, hand-computed split points, zlib.crc32 over file names, json, and plain
numpy slicing.  All caches go to tmp_path (never the user's home).
"""

import dataclasses
import json
import os
import random
import re
import sysconfig
import zlib

import numpy as np
import pytest

from mlalm.config import Config, from_dict
from mlalm.data import (
    BPETokenizer,
    ByteTokenizer,
    Windows,
    eval_batches,
    get_tokenizer,
    load_corpus,
    train_dataset,
)
from mlalm.data.sources import load_splits, read_documents, split_documents
from mlalm.errors import ConfigError, DataError

EOS = "<|endoftext|>"

WORDS = (
    "the quick brown fox jumps over lazy dog and then some more words appear in "
    "this little corpus so that merges have something to learn from"
).split()


def _text(n_words: int, seed: int = 0) -> str:
    """Deterministic ASCII prose with newlines (BPE has repeated pairs to merge)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(0, n_words, 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)))
    return "\n".join(lines) + "\n"


def _dcfg(tmp_path, **kw):
    """A DataConfig whose cache lives under tmp_path."""
    return dataclasses.replace(Config().data, cache_dir=str(tmp_path / "cache"), **kw)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# =======================================================================================
# ByteTokenizer
# =======================================================================================


def test_byte_tokenizer_constants():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257
    assert tok.eos_id == 256
    assert get_tokenizer("byte").vocab_size == 257


@pytest.mark.parametrize("text", ["", "hello", "héllo, wörld ✓ 日本語\n\ttab", "a\x00b"])
def test_byte_tokenizer_encode_str_is_utf8_bytes(text):
    ids = ByteTokenizer().encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))


def test_byte_tokenizer_encode_raw_bytes_including_invalid_utf8():
    raw = b"\xff\xfe\x00abc\x80\xc3"  # not valid UTF-8
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    tok = ByteTokenizer()
    assert tok.encode(raw).tolist() == list(raw)
    assert tok.encode(bytearray(raw)).tolist() == list(raw)
    assert tok.encode(b"\xff\xfe").tolist() == [255, 254]


def test_byte_tokenizer_decode():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 日本語\nline two"
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert tok.decode(tok.encode(text)) == text
    # the end-of-text id is dropped from the text
    assert tok.decode(list(b"ab") + [256] + list(b"cd") + [256]) == "abcd"
    # invalid UTF-8 is replaced, as Python's own errors='replace' does
    assert tok.decode([0xFF, 0x61]) == b"\xffa".decode("utf-8", errors="replace") == "\ufffda"


# =======================================================================================
# BPE tokenizer
# =======================================================================================


@pytest.fixture(scope="module")
def bpe():
    return get_tokenizer("bpe", train_texts=[_text(3000, seed=1)], vocab_size=300)


def test_bpe_trains_to_requested_vocab(bpe):
    assert isinstance(bpe, BPETokenizer)
    # 256 byte symbols + <|endoftext|> + learned merges, capped at the requested size
    assert 257 < bpe.vocab_size <= 300
    vocab = json.loads(bpe.tok.to_str())["model"]["vocab"]
    assert len(vocab) > 257
    # eos is the special token named <|endoftext|>
    specials = {t["content"]: t["id"] for t in json.loads(bpe.tok.to_str())["added_tokens"]}
    assert bpe.eos_id == specials[EOS]
    assert bpe.decode([bpe.eos_id]) == ""
    # merges actually compress text it saw
    seen = _text(200, seed=1)
    assert len(bpe.encode(seen)) < len(seen.encode("utf-8")) * 0.7


@pytest.mark.parametrize(
    "text",
    [
        _text(100, seed=1),  # seen during training
        "Completely unseen: Zebra QUIZ 12345!?\n\n  indented\ttab",
        "ünïcödé ✓ 日本語 emoji 🎉 and  double  spaces ",
    ],
)
def test_bpe_roundtrip(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32
    assert all(0 <= int(i) < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    # bytes input is decoded as UTF-8 first
    assert bpe.encode(text.encode("utf-8")).tolist() == ids.tolist()


def test_bpe_save_load_identical_ids(bpe, tmp_path):
    bpe.save(str(tmp_path / "tok"))
    path = tmp_path / "tok" / "tokenizer.json"
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert saved["model"]["type"] == "BPE"
    assert EOS in {t["content"] for t in saved["added_tokens"]}

    loaded = get_tokenizer("bpe", path=str(path))
    assert isinstance(loaded, BPETokenizer)
    for text in (_text(150, seed=1), "unseen Zebra text ✓\n"):
        assert loaded.encode(text).tolist() == bpe.encode(text).tolist()
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.eos_id == bpe.eos_id
    assert loaded.fingerprint() == bpe.fingerprint()


def test_bpe_load_bad_file_and_no_source(tmp_path):
    bad = _write(tmp_path / "tokenizer.json", b"{not json")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        get_tokenizer("bpe", path=str(bad))
    with pytest.raises(DataError, match="BPE"):
        get_tokenizer("bpe", path=str(tmp_path / "missing.json"))


def test_unknown_tokenizer_raises_config_error():
    with pytest.raises(ConfigError, match=r"data\.tokenizer") as ei:
        get_tokenizer("wordpiece")
    assert "wordpiece" in str(ei.value)


# =======================================================================================
# Sources and splits
# =======================================================================================


@pytest.mark.parametrize("f", [0.1, 0.25, 0.5])
def test_single_file_split_exact_byte_cut(tmp_path, f):
    rng = random.Random(7)
    data = bytes(rng.randrange(1, 256) for _ in range(1237)) + b"tail"
    p = _write(tmp_path / "corpus.bin", data)
    train, val = load_splits(str(p), None, f, "text")
    cut = int(len(data) * (1 - f))
    assert train == [(str(p), data[:cut])]
    assert val == [(str(p), data[cut:])]
    assert train[0][1] + val[0][1] == data


def test_single_file_split_hand_computed():
    # 1000 bytes, f=0.1: cut at byte 900 exactly
    from mlalm.data.sources import split_documents

    data = bytes(range(200)) * 5
    train, val = split_documents([("x", data)], 0.1)
    assert len(train[0][1]) == 900 and len(val[0][1]) == 100
    assert val[0][1] == data[900:]


def test_directory_split_by_crc32_of_basename(tmp_path):
    f = 0.3
    names = [f"doc{i:02d}.txt" for i in range(30)]
    expected_val = {n for n in names if zlib.crc32(n.encode()) % 1000 < int(f * 1000)}
    assert 0 < len(expected_val) < len(names)  # the fixture exercises both sides
    d = tmp_path / "corpus"
    # created in reverse order so sorted reading is not an accident of creation order
    for n in reversed(names):
        _write(d / n, f"contents of {n}\n".encode())
    _write(d / ".hidden.txt", b"hidden file text")
    _write(d / ".git" / "config.txt", b"hidden dir text")

    docs = read_documents(str(d))
    assert [os.path.basename(n) for n, _ in docs] == sorted(names)
    assert [data for _, data in docs] == [f"contents of {n}\n".encode() for n in sorted(names)]

    train, val = load_splits(str(d), None, f, "text")
    val_names = [os.path.basename(n) for n, _ in val]
    train_names = [os.path.basename(n) for n, _ in train]
    assert set(val_names) == expected_val
    assert set(train_names) == set(names) - expected_val
    assert val_names == sorted(val_names) and train_names == sorted(train_names)
    for n, data in train + val:
        assert data == f"contents of {os.path.basename(n)}\n".encode()


def test_directory_reads_subdirectories_and_skips_empty_files(tmp_path):
    d = tmp_path / "corpus"
    _write(d / "a.txt", b"alpha\n")
    _write(d / "sub" / "b.txt", b"beta\n")
    _write(d / "empty.txt", b"")
    _write(d / "blank.txt", b"  \n\t\n")
    docs = read_documents(str(d))
    assert sorted((os.path.relpath(n, d), data) for n, data in docs) == [
        ("a.txt", b"alpha\n"),
        (os.path.join("sub", "b.txt"), b"beta\n"),
    ]


def _jsonl(path, records, blank_line_after=None):
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r, ensure_ascii=False))
        if blank_line_after == i:
            lines.append("")
    return _write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def test_jsonl_default_key_one_doc_per_line(tmp_path):
    texts = ["first document", "zweites Dokument: ünïcödé ✓", "third\nhas a newline"]
    p = _jsonl(
        tmp_path / "data.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)], blank_line_after=0
    )
    docs = read_documents(str(p))
    assert [d for _, d in docs] == [t.encode("utf-8") for t in texts]
    # names carry the 1-based line number (line 2 is blank)
    assert [n for n, _ in docs] == [f"{p}:1", f"{p}:3", f"{p}:4"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
def test_jsonl_custom_key(tmp_path, suffix):
    texts = ["alpha body", "beta body", "gamma body"]
    p = _jsonl(tmp_path / f"data{suffix}", [{"body": t, "text": "WRONG"} for t in texts])
    docs = read_documents(str(p), "body")
    assert [d for _, d in docs] == [t.encode() for t in texts]
    train, val = load_splits(str(p), None, 0.5, "body")
    assert sorted(d for _, d in train + val) == sorted(t.encode() for t in texts)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2")):
        read_documents(str(p))


def test_jsonl_invalid_utf8_line_is_data_error(tmp_path):
    p = _write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2")):
        read_documents(str(p))


def test_jsonl_missing_field_names_key(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"content": "b"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:2")) as ei:
        read_documents(str(p))
    assert "'text'" in str(ei.value)
    p2 = _jsonl(tmp_path / "e.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="'body'"):
        read_documents(str(p2), "body")
    p3 = _jsonl(tmp_path / "f.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match="'text'"):
        read_documents(str(p3))


def test_missing_path_names_key_and_path(tmp_path):
    missing = str(tmp_path / "nope" / "corpus.txt")
    with pytest.raises(DataError) as ei:
        load_splits(missing, None, 0.1, "text")
    assert "data.path" in str(ei.value) and missing in str(ei.value)

    good = _write(tmp_path / "train.txt", b"some training text\n")
    with pytest.raises(DataError) as ei:
        load_splits(str(good), missing, 0.1, "text")
    assert "data.val_path" in str(ei.value) and missing in str(ei.value)


@pytest.mark.parametrize("content", [b"", b"   \n\t\r\n  "])
def test_empty_or_whitespace_file_is_data_error(tmp_path, content):
    p = _write(tmp_path / "empty.txt", content)
    with pytest.raises(DataError, match=re.escape(str(p))):
        load_splits(str(p), None, 0.1, "text")


def test_empty_directory_is_data_error(tmp_path):
    d = tmp_path / "emptydir"
    d.mkdir()
    _write(d / ".hidden", b"only hidden text")
    with pytest.raises(DataError, match="data.path"):
        read_documents(str(d))


def test_val_path_used_as_given(tmp_path):
    tr = _write(tmp_path / "train.txt", b"train text " * 50)
    va = _write(tmp_path / "val.txt", b"validation text " * 7)
    train, val = load_splits(str(tr), str(va), 0.1, "text")
    assert train == [(str(tr), b"train text " * 50)]  # not split
    assert val == [(str(va), b"validation text " * 7)]


def test_val_path_without_path_is_error(tmp_path):
    va = _write(tmp_path / "val.txt", b"validation text")
    with pytest.raises(DataError, match="data.val_path"):
        load_splits(None, str(va), 0.1, "text")


def test_builtin_corpus_deterministic_and_disjoint():
    a_train, a_val = load_splits(None, None, 0.1, "text")
    b_train, b_val = load_splits(None, None, 0.1, "text")
    assert a_train and a_val
    assert a_train == b_train and a_val == b_val
    train_names = {n for n, _ in a_train}
    val_names = {n for n, _ in a_val}
    assert not train_names & val_names
    # independently: the non-empty top-level stdlib *.py files, split by crc32(name)
    root = sysconfig.get_paths()["stdlib"]
    expected = set()
    for n in os.listdir(root):
        if n.endswith(".py") and not n.startswith("."):
            with open(os.path.join(root, n), "rb") as fh:
                if fh.read().strip():
                    expected.add(n)
    assert train_names | val_names == expected
    exp_val = {n for n in expected if zlib.crc32(n.encode()) % 1000 < 100}
    assert val_names == exp_val
    assert all(d.strip() for _, d in a_train + a_val)


# =======================================================================================
# load_corpus and the token cache
# =======================================================================================


def _entries(cache):
    """The cache's prepared directories (one per corpus and settings)."""
    root = cache / "prepared"
    return sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def _files(entry):
    return sorted(p.name for p in entry.iterdir() if not p.name.startswith("."))


def test_load_corpus_byte_tokens_are_bytes_plus_eos(tmp_path):
    data = "Grüße, world ✓\n".encode() * 40 + b"\xff\xfe raw bytes\n"
    p = _write(tmp_path / "c.txt", data)
    cfg = _dcfg(tmp_path, path=str(p), val_fraction=0.2)
    corpus = load_corpus(cfg)
    cut = int(len(data) * (1 - 0.2))
    assert corpus.train.tolist() == list(data[:cut]) + [256]
    assert corpus.val.tolist() == list(data[cut:]) + [256]
    assert corpus.train_bytes == cut and corpus.val_bytes == len(data) - cut
    assert isinstance(corpus.tokenizer, ByteTokenizer)
    # only the tmp cache was written: one prepared directory with a train and a val shard
    (entry,) = _entries(tmp_path / "cache")
    assert _files(entry) == ["manifest.json", "train-00000.bin", "val-00000.bin"]


def test_load_corpus_byte_multiple_docs_joined_by_eos(tmp_path):
    d = tmp_path / "corpus"
    names = [f"doc{i:02d}.txt" for i in range(30)]
    for n in names:
        _write(d / n, f"text of {n}\n".encode())
    corpus = load_corpus(_dcfg(tmp_path, path=str(d), val_fraction=0.3))
    val = sorted(n for n in names if zlib.crc32(n.encode()) % 1000 < 300)
    train = sorted(set(names) - set(val))
    exp_train = [t for n in train for t in list(f"text of {n}\n".encode()) + [256]]
    exp_val = [t for n in val for t in list(f"text of {n}\n".encode()) + [256]]
    assert corpus.train.tolist() == exp_train
    assert corpus.val.tolist() == exp_val


def test_load_corpus_second_call_hits_cache(tmp_path):
    data = _text(400).encode()
    p = _write(tmp_path / "c.txt", data)
    cfg = _dcfg(tmp_path, path=str(p))
    cache = tmp_path / "cache"
    first = load_corpus(cfg)
    (entry,) = _entries(cache)
    files = _files(entry)
    stats = {f: os.stat(entry / f) for f in files}

    second = load_corpus(cfg)
    assert _entries(cache) == [entry] and _files(entry) == files
    for f in files:
        st = os.stat(entry / f)
        assert (st.st_ino, st.st_mtime_ns, st.st_size) == (
            stats[f].st_ino,
            stats[f].st_mtime_ns,
            stats[f].st_size,
        )
    np.testing.assert_array_equal(np.asarray(second.train), np.asarray(first.train))
    np.testing.assert_array_equal(np.asarray(second.val), np.asarray(first.val))

    # a cache file whose contents changed (same size) no longer matches its checksum: it is
    # prepared again, with a warning, and the right tokens come back (they used to be
    # returned silently)
    shard = entry / "train-00000.bin"
    shard.write_bytes(np.full(len(first.train), 7, np.uint16).tobytes())
    with pytest.warns(UserWarning, match="checksum"):
        third = load_corpus(cfg)
    assert np.asarray(third.train).tolist() == list(data[: int(len(data) * 0.9)]) + [256]


def test_load_corpus_content_change_changes_cache_name(tmp_path):
    p = _write(tmp_path / "c.txt", _text(300, seed=1).encode())
    cfg = _dcfg(tmp_path, path=str(p))
    cache = tmp_path / "cache"
    load_corpus(cfg)
    (before,) = _entries(cache)
    before_files = {f: os.stat(before / f).st_mtime_ns for f in _files(before)}
    new = _text(300, seed=2).encode()
    p.write_bytes(new)
    corpus = load_corpus(cfg)
    after = _entries(cache)
    assert len(after) == 2 and before in after  # a fresh entry; the old one untouched
    assert {f: os.stat(before / f).st_mtime_ns for f in _files(before)} == before_files
    cut = int(len(new) * 0.9)
    assert corpus.train.tolist() == list(new[:cut]) + [256]


def test_load_corpus_bpe_trains_caches_and_roundtrips(tmp_path):
    text = _text(1500, seed=3)
    data = text.encode()
    p = _write(tmp_path / "c.txt", data)
    cfg = _dcfg(tmp_path, path=str(p), tokenizer="bpe", bpe_vocab_size=300)
    cache = tmp_path / "cache"
    first = load_corpus(cfg)
    (entry,) = _entries(cache)
    tok_file = entry / "tokenizer.json"
    tok_stat = os.stat(tok_file)
    saved = json.loads(tok_file.read_text())
    eos = {t["content"]: t["id"] for t in saved["added_tokens"]}[EOS]
    assert len(saved["model"]["vocab"]) <= 300

    cut = int(len(data) * 0.9)
    train = np.asarray(first.train)
    assert int(train[-1]) == eos and eos not in train[:-1].tolist()
    assert len(train) < cut  # BPE compresses
    assert first.tokenizer.decode(train[:-1]) == data[:cut].decode()
    val = np.asarray(first.val)
    assert int(val[-1]) == eos
    assert first.tokenizer.decode(val[:-1]) == data[cut:].decode()
    assert first.train_bytes == cut and first.val_bytes == len(data) - cut

    second = load_corpus(cfg)
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    st = os.stat(tok_file)
    assert (st.st_ino, st.st_mtime_ns) == (tok_stat.st_ino, tok_stat.st_mtime_ns)
    assert _entries(cache) == [entry]
    np.testing.assert_array_equal(np.asarray(second.train), train)


def test_load_corpus_bpe_uses_given_tokenizer_path(tmp_path, bpe):
    bpe.save(str(tmp_path / "run"))
    p = _write(tmp_path / "c.txt", _text(300, seed=4).encode())
    cfg = _dcfg(tmp_path, path=str(p), tokenizer="bpe", bpe_vocab_size=300)
    corpus = load_corpus(cfg, tokenizer_path=str(tmp_path / "run" / "tokenizer.json"))
    assert corpus.tokenizer.fingerprint() == bpe.fingerprint()
    # no tokenizer was trained into the cache
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".json")]
    data = p.read_bytes()
    cut = int(len(data) * 0.9)
    assert np.asarray(corpus.train).tolist() == bpe.encode(data[:cut].decode()).tolist() + [bpe.eos_id]


def test_from_dict_data_config(tmp_path):
    p = _write(tmp_path / "c.txt", b"0123456789" * 10)
    cfg = from_dict(
        {"data": {"path": str(p), "val_fraction": 0.25, "cache_dir": str(tmp_path / "cache")}}
    ).data
    corpus = load_corpus(cfg)
    assert corpus.train.tolist() == list(b"0123456789" * 10)[:75] + [256]
    assert corpus.val.tolist() == list(b"0123456789" * 10)[75:] + [256]


# =======================================================================================
# Windows and train_dataset
# =======================================================================================


def test_windows_are_stride_seq_len_slices():
    tokens = np.arange(1000, 1103, dtype=np.uint16)  # 103 tokens
    w = Windows(tokens, 10)
    assert len(w) == 10  # (103 - 1) // 10
    for i in range(len(w)):
        win = w[i]
        assert win.dtype == np.int32 and win.shape == (11,)
        assert win.tolist() == tokens[i * 10 : i * 10 + 11].tolist()
        assert win[0] == 1000 + 10 * i
    # neighbouring windows share exactly one token (last target = next first input)
    assert w[0][-1] == w[1][0]
    assert len(Windows(np.arange(101), 10)) == 10
    assert len(Windows(np.arange(100), 10)) == 9
    assert len(Windows(np.arange(11), 10)) == 1


@pytest.mark.parametrize("n_tokens", [0, 1, 10])
def test_windows_too_short_is_data_error(n_tokens):
    with pytest.raises(DataError, match=r"train\.seq_len"):
        Windows(np.arange(n_tokens), 10)
    with pytest.raises(DataError, match=r"train\.seq_len"):
        train_dataset(np.arange(n_tokens), seq_len=10, batch_size=2, seed=0)
    with pytest.raises(DataError, match=r"train\.seq_len"):
        list(eval_batches(np.arange(n_tokens), seq_len=10, batch_size=2))


T, B, NWIN = 8, 4, 24
TOKENS = np.arange(NWIN * T + 1, dtype=np.uint16)  # exactly NWIN windows


def _take(it, k):
    return [np.asarray(next(it)) for _ in range(k)]


def _starts(batch):
    return [int(r[0]) for r in batch]


def test_train_dataset_batches_shape_dtype_and_rows_are_windows():
    ds = train_dataset(TOKENS, seq_len=T, batch_size=B, seed=0)
    for b in _take(iter(ds), 3):
        assert b.shape == (B, T + 1) and b.dtype == np.int32
        for row in b:
            s = int(row[0])
            assert s % T == 0
            assert row.tolist() == TOKENS[s : s + T + 1].tolist()


def test_train_dataset_seed_determinism():
    a = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=3)), 8)
    b = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=3)), 8)
    c = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=4)), 8)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_train_dataset_is_shuffled():
    first = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=0)), NWIN // B)
    starts = [s for b in first for s in _starts(b)]
    assert starts != list(range(0, NWIN * T, T))


def test_train_dataset_epoch_covers_every_window_once():
    per_epoch = NWIN // B
    it = iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=5))
    expected = list(range(0, NWIN * T, T))
    orders = []
    for _ in range(3):
        starts = [s for b in _take(it, per_epoch) for s in _starts(b)]
        assert sorted(starts) == expected
        orders.append(starts)
    # a new order each epoch
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_train_dataset_iterator_state_resumes():
    ds = train_dataset(TOKENS, seq_len=T, batch_size=B, seed=11)
    it = iter(ds)
    _take(it, 3)
    st = it.get_state()
    expected = _take(it, 4)
    it2 = iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=11))
    _take(it2, 1)  # a different position that set_state must overwrite
    it2.set_state(st)
    got = _take(it2, 4)
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    # and it is not simply the start of the stream
    fresh = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=11)), 4)
    assert not np.array_equal(np.stack(fresh), np.stack(expected))
    # the state survives a JSON round trip (checkpoints store it)
    it3 = iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=11))
    it3.set_state(json.loads(json.dumps(st)))
    np.testing.assert_array_equal(np.stack(_take(it3, 4)), np.stack(expected))


def test_train_dataset_sharding_union_is_global_batch():
    full = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=2)), 7)
    s0 = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=2, shard_index=0, shard_count=2)), 7)
    s1 = _take(iter(train_dataset(TOKENS, seq_len=T, batch_size=B, seed=2, shard_index=1, shard_count=2)), 7)
    for f, a, b in zip(full, s0, s1):
        assert a.shape == b.shape == (B // 2, T + 1)
        np.testing.assert_array_equal(np.concatenate([a, b]), f)


def test_train_dataset_batch_not_divisible_by_shards():
    with pytest.raises(DataError, match="batch_size"):
        train_dataset(TOKENS, seq_len=T, batch_size=5, seed=0, shard_count=2)


# =======================================================================================
# eval_batches
# =======================================================================================


def test_eval_batches_sequential_with_short_last_batch():
    tokens = np.arange(7 * 10 + 1, dtype=np.uint16)  # 7 windows of seq_len 10
    batches = list(eval_batches(tokens, seq_len=10, batch_size=3))
    assert [b.shape for b in batches] == [(3, 11), (3, 11), (1, 11)]
    assert all(b.dtype == np.int32 for b in batches)
    rows = np.concatenate(batches)
    expected = np.stack([tokens[i * 10 : i * 10 + 11] for i in range(7)]).astype(np.int32)
    np.testing.assert_array_equal(rows, expected)


@pytest.mark.parametrize(
    "max_batches,shapes",
    [
        (0, [(3, 11), (3, 11), (1, 11)]),
        (1, [(3, 11)]),
        (2, [(3, 11), (3, 11)]),
        (3, [(3, 11), (3, 11), (1, 11)]),
        (10, [(3, 11), (3, 11), (1, 11)]),
    ],
)
def test_eval_batches_max_batches(max_batches, shapes):
    tokens = np.arange(7 * 10 + 1, dtype=np.uint16)
    batches = list(eval_batches(tokens, seq_len=10, batch_size=3, max_batches=max_batches))
    assert [b.shape for b in batches] == shapes
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(rows)) * 10)


# =======================================================================================
# Regressions
# =======================================================================================


def test_directory_split_never_leaves_train_empty(tmp_path):
    names = ["f0.txt", "f1.txt", "f2.txt"]
    assert all(zlib.crc32(n.encode()) % 1000 < 950 for n in names)  # all fall in val
    d = tmp_path / "corpus"
    for n in names:
        _write(d / n, f"hello {n}\n".encode())
    try:
        corpus = load_corpus(_dcfg(tmp_path, path=str(d), val_fraction=0.95))
    except DataError:
        return  # a clear DataError is an acceptable fix
    assert len(corpus.train) > 1


def test_single_file_split_keeps_utf8_characters_whole():
    text = ("ab✓" * 100).encode()
    for f in (0.1, 0.25, 0.5, 0.33):
        train, val = split_documents([("x", text)], f)
        train_b, val_b = train[0][1], val[0][1]
        assert train_b + val_b == text
        train_b.decode("utf-8")  # raises if a character was cut
        val_b.decode("utf-8")
        assert abs(len(train_b) - int(len(text) * (1 - f))) <= 2
