"""mlalm.data.prepare and mlalm.data.shards: splits identical to the in-memory rule, shards,
worker-count independence, interruptions, verification, the command line.

Expected token streams are built here from Python bytes, zlib.crc32 over names and the
split rule written out by hand; never from the output of prepare itself.
"""

import gzip
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from mlalm.data import shards as shards_mod
from mlalm.data.prepare import prepare
from mlalm.data.shards import PreparedData, TokenStream, verify
from mlalm.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes_eos(docs) -> list[int]:
    return [t for d in docs for t in list(d) + [256]]


def _stream(out, split="train") -> list[int]:
    return PreparedData.open(out).split(split).tokens.tolist()


def _names_split(names, f):
    """The multi-document rule, by hand: crc32(name) % 1000 < f*1000 validates; none
    validating -> the last does; all validating -> the first trains."""
    val = [n for n in names if zlib.crc32(n.encode()) % 1000 < int(f * 1000)]
    if not val:
        val = [names[-1]]
    if len(val) == len(names):
        val = val[1:]
    return [n for n in names if n not in val], val


# =======================================================================================
# Splits: the same as today's in-memory rule
# =======================================================================================


@pytest.mark.parametrize("f", [0.1, 0.25, 0.5, 0.33])
def test_single_document_split_cuts_at_the_same_byte(tmp_path, f):
    text = ("ab✓é🎉\n" * 300).encode()
    p = tmp_path / "book.txt"
    p.write_bytes(text)
    prepare([p], tmp_path / "out", val_fraction=f)
    cut = int(len(text) * (1 - f))
    while (text[cut] & 0xC0) == 0x80:
        cut -= 1
    assert _stream(tmp_path / "out") == _bytes_eos([text[:cut]])
    assert _stream(tmp_path / "out", "val") == _bytes_eos([text[cut:]])
    m = PreparedData.open(tmp_path / "out").manifest
    assert (m["splits"]["train"]["text_bytes"], m["splits"]["val"]["text_bytes"]) == (cut, len(text) - cut)
    assert m["splits"]["train"]["documents"] == m["splits"]["val"]["documents"] == 1


def test_single_compressed_document_and_single_record(tmp_path):
    text = ("ünïcödé line\n" * 500).encode()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "book.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "gz" / "blank.txt").write_bytes(b"\n \n")  # dropped: still one document
    cut = int(len(text) * 0.9)
    while (text[cut] & 0xC0) == 0x80:
        cut -= 1
    prepare([tmp_path / "gz"], tmp_path / "o1")
    assert _stream(tmp_path / "o1") == _bytes_eos([text[:cut]])
    # one JSON record is one document too: found after a first pass, then cut by bytes
    rec = tmp_path / "one.jsonl"
    rec.write_text(json.dumps({"text": text.decode()}) + "\n\n")
    prepare([rec], tmp_path / "o2", workers=1)
    assert _stream(tmp_path / "o2") == _bytes_eos([text[:cut]])
    assert _stream(tmp_path / "o2", "val") == _bytes_eos([text[cut:]])


def test_many_text_files_split_by_name(tmp_path):
    names = [f"doc{i:02d}.txt" for i in range(40)]
    d = tmp_path / "c"
    d.mkdir()
    for n in reversed(names):
        (d / n).write_text(f"contents of {n}\n")
    train, val = _names_split(names, 0.3)
    assert train and val
    prepare([d], tmp_path / "out", val_fraction=0.3)
    assert _stream(tmp_path / "out") == _bytes_eos([f"contents of {n}\n".encode() for n in train])
    assert _stream(tmp_path / "out", "val") == _bytes_eos([f"contents of {n}\n".encode() for n in val])


def test_jsonl_records_split_by_file_and_line(tmp_path):
    p = tmp_path / "recs.jsonl"
    texts = [f"record number {i}" for i in range(60)]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    names = [f"recs.jsonl:{i + 1}" for i in range(60)]
    train, val = _names_split(names, 0.2)
    prepare([p], tmp_path / "out", val_fraction=0.2)
    by = dict(zip(names, texts))
    assert _stream(tmp_path / "out") == _bytes_eos([by[n].encode() for n in train])
    assert _stream(tmp_path / "out", "val") == _bytes_eos([by[n].encode() for n in val])
    # the compressed file splits the same way (its name without .gz)
    with gzip.open(tmp_path / "recs2.jsonl.gz", "wt") as g:
        g.write(p.read_text())
    os.makedirs(tmp_path / "z")
    os.replace(tmp_path / "recs2.jsonl.gz", tmp_path / "z" / "recs.jsonl.gz")
    prepare([tmp_path / "z"], tmp_path / "out2", val_fraction=0.2)
    assert _stream(tmp_path / "out2", "val") == _stream(tmp_path / "out", "val")


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_edge_cases_each_side_keeps_a_document(tmp_path, kind):
    # no document hashes into val at f=0.001 -> the last one validates
    names = ["a0", "a1", "a2"]
    assert all(
        zlib.crc32(n.encode()) % 1000 >= 1
        for n in [f"{x}.txt" for x in names] + [f"r.jsonl:{i}" for i in (1, 2, 3)]
    )
    # every document hashes into val at f=0.999 (none above 999 here) -> the first one trains
    assert all(
        zlib.crc32(n.encode()) % 1000 < 999
        for n in [f"{x}.txt" for x in names] + [f"r.jsonl:{i}" for i in (1, 2, 3)]
    )
    texts = [f"text {n}\n".encode() for n in names]
    if kind == "text":
        d = tmp_path / "c"
        d.mkdir()
        for n, t in zip(names, texts):
            (d / f"{n}.txt").write_bytes(t)
        inputs = [d]
    else:
        (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t.decode()}) + "\n" for t in texts))
        inputs = [tmp_path / "r.jsonl"]
    prepare(inputs, tmp_path / "lo", val_fraction=0.001)
    assert _stream(tmp_path / "lo") == _bytes_eos(texts[:2])
    assert _stream(tmp_path / "lo", "val") == _bytes_eos(texts[2:])
    prepare(inputs, tmp_path / "hi", val_fraction=0.999)
    assert _stream(tmp_path / "hi") == _bytes_eos(texts[:1])
    assert _stream(tmp_path / "hi", "val") == _bytes_eos(texts[1:])


def test_val_fraction_zero_puts_everything_in_train(tmp_path):
    (tmp_path / "a.txt").write_text("only one document")
    m = prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.0)
    assert _stream(tmp_path / "out") == _bytes_eos([b"only one document"])
    assert m["splits"]["val"] == {"documents": 0, "text_bytes": 0, "tokens": 0, "shards": []}


# =======================================================================================
# Shards, workers
# =======================================================================================


def _mixed_corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    d.mkdir()
    rng = np.random.default_rng(0)
    words = np.array("the of and to in is was for on that with as by at from ü ✓ 日本".split())
    for i in range(6):
        (d / f"t{i}.txt").write_text(" ".join(rng.choice(words, 300 + 50 * i)) + "\n")
    with open(d / "r.jsonl", "w") as f:
        for _ in range(50):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
    pq.write_table(
        pa.table({"text": [" ".join(rng.choice(words, 30)) for _ in range(40)]}),
        d / "p.parquet",
        row_group_size=7,
    )
    return d


def test_shard_size_does_not_change_the_stream(tmp_path):
    d = _mixed_corpus(tmp_path)
    prepare([d], tmp_path / "one", shard_bytes=1 << 30)
    m = prepare([d], tmp_path / "tiny", shard_bytes=1000)
    one, tiny = PreparedData.open(tmp_path / "one"), PreparedData.open(tmp_path / "tiny")
    for split in ("train", "val"):
        a, b = one.split(split).tokens, tiny.split(split).tokens
        assert len(a.paths) == 1 and len(b.paths) == -(-len(a) * 2 // 1000)
        assert b.tolist() == a.tolist()
        # every shard but the last is exactly 1000 bytes; slices across boundaries agree
        assert [os.path.getsize(p) for p in b.paths[:-1]] == [1000] * (len(b.paths) - 1)
        ref = np.asarray(a)
        for lo, hi in [(0, 1), (499, 501), (123, 2345), (len(ref) - 3, len(ref)), (10, 10)]:
            np.testing.assert_array_equal(b[lo:hi], ref[lo:hi])
        assert int(b[-1]) == int(ref[-1]) == 256
    assert m["splits"]["train"]["tokens"] == len(one.split("train").tokens)


def test_output_does_not_depend_on_worker_count(tmp_path, monkeypatch):
    from mlalm.data import memory

    monkeypatch.setattr(memory, "MAX_BATCH", 1024)  # dozens of batches, several in flight
    d = _mixed_corpus(tmp_path)
    assert sum(os.path.getsize(d / f) for f in os.listdir(d)) > 20 * 1024
    for tok in ("byte", "bpe"):
        outs = []
        for w in (0, 1, 2):
            out = tmp_path / f"{tok}{w}"
            prepare([d], out, workers=w, tokenizer=tok, bpe_vocab_size=300, shard_bytes=4096)
            outs.append(out)
        ref = PreparedData.open(outs[0])
        for out in outs[1:]:
            other = PreparedData.open(out)
            assert other.manifest["splits"] == ref.manifest["splits"]
            assert other.fingerprint == ref.fingerprint


# =======================================================================================
# Interruptions, verification
# =======================================================================================


def test_interrupted_prepare_leaves_no_manifest_and_rerun_is_identical(tmp_path, monkeypatch):
    d = _mixed_corpus(tmp_path)
    prepare([d], tmp_path / "clean", shard_bytes=2000)
    calls = {"n": 0}
    original = shards_mod.ShardWriter.write

    def failing(self, ids):
        calls["n"] += 1
        if calls["n"] == 2:  # the val split's tokens, after the train shards were renamed
            raise KeyboardInterrupt
        return original(self, ids)

    monkeypatch.setattr(shards_mod.ShardWriter, "write", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([d], out, shard_bytes=2000, workers=0)
    monkeypatch.setattr(shards_mod.ShardWriter, "write", original)
    assert not (out / "manifest.json").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".bin") or n.endswith(".tmp")]
    with pytest.raises(DataError, match="no manifest.json"):
        PreparedData.open(out)
    # leftovers of a killed run (temporary and renamed shards) do not survive a rerun
    (out / "train-00007.bin").write_bytes(b"stale")
    (out / ".train-00000.bin.123-abc.tmp").write_bytes(b"stale")
    prepare([d], out, shard_bytes=2000)
    assert (
        PreparedData.open(out).manifest["splits"] == PreparedData.open(tmp_path / "clean").manifest["splits"]
    )
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "clean"))


def test_killed_prepare_process_leaves_no_manifest(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    for i in range(30):
        (d / f"f{i}.txt").write_bytes(os.urandom(1 << 20).hex().encode()[: 1 << 20])
    code = (
        "import os, sys; sys.path.insert(0, {!r})\n"
        "from mlalm.data import shards\n"
        "orig = shards.ShardWriter._close\n"
        "def close(self):\n"
        "    orig(self)\n"
        "    if len(self.shards) == 2: os.kill(os.getpid(), 9)\n"
        "shards.ShardWriter._close = close\n"
        "from mlalm.data.prepare import prepare\n"
        "prepare([{!r}], {!r}, shard_bytes=1 << 20, workers=0)\n".format(ROOT, str(d), str(tmp_path / "out"))
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -9
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert len(list((tmp_path / "out").glob("train-*.bin"))) == 2  # complete shards, no manifest
    with pytest.raises(DataError):
        PreparedData.open(tmp_path / "out")


def test_truncated_missing_or_edited_shard_is_a_data_error(tmp_path, monkeypatch):
    d = _mixed_corpus(tmp_path)
    out = tmp_path / "out"
    prepare([d], out, shard_bytes=1000)
    shard = out / "train-00001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(DataError, match=r"train-00001\.bin: 998 bytes, the manifest says 1,000"):
        PreparedData.open(out)
    shard.write_bytes(bytes(reversed(good)))  # same size, other contents
    with pytest.raises(DataError, match=r"train-00001\.bin: contents differ"):
        PreparedData.open(out)  # small directory: checksums verified on open
    monkeypatch.setattr(shards_mod, "AUTO_VERIFY_BYTES", 0)
    PreparedData.open(out)  # a large one is only size-checked on open ...
    with pytest.raises(DataError, match="contents differ"):
        verify(out)  # ... and fully by --verify
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00001\.bin: missing"):
        PreparedData.open(out)


def test_rerun_returns_at_once_and_force_rewrites(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 100)
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt"], out)
    before = os.stat(out / "manifest.json").st_mtime_ns
    prepare([tmp_path / "a.txt"], out)
    assert os.stat(out / "manifest.json").st_mtime_ns == before
    prepare([tmp_path / "a.txt"], out, force=True)
    assert os.stat(out / "manifest.json").st_mtime_ns != before
    # other settings: prepared again
    m = prepare([tmp_path / "a.txt"], out, val_fraction=0.5)
    assert m["split"]["val_fraction"] == 0.5


def test_manifest_records_sources_and_counts(tmp_path):
    d = _mixed_corpus(tmp_path)
    m = prepare([d], tmp_path / "out", shard_bytes=3000)
    files = sorted(os.listdir(d))
    assert sorted(os.path.basename(s["path"]) for s in m["sources"]) == files
    for s in m["sources"]:
        assert s["size"] == os.path.getsize(s["path"]) and s["mtime_ns"] == os.stat(s["path"]).st_mtime_ns
    for split in ("train", "val"):
        sp = m["splits"][split]
        assert sp["tokens"] == sum(x["tokens"] for x in sp["shards"])
        for x in sp["shards"]:
            data = (tmp_path / "out" / x["file"]).read_bytes()
            assert len(data) == x["bytes"] == 2 * x["tokens"]
            assert x["crc32"] == f"{zlib.crc32(data):08x}"
        # byte tokenizer: tokens = text bytes + one end-of-text per document
        assert sp["tokens"] == sp["text_bytes"] + sp["documents"]
    total = sum(os.path.getsize(d / f) for f in files if f.endswith(".txt"))
    assert m["tokenizer"] == {
        "name": "byte",
        "fingerprint": "byte-v1",
        "file": None,
        "vocab_size": 257,
        "eos_id": 256,
        "eos_token": "<|endoftext|>",
    }
    assert total > 0 and m["dtype"] == "uint16" and m["checksum"] == "crc32"


def test_token_stream_indexing_matches_numpy(tmp_path):
    ref = np.arange(0, 3000, dtype=np.uint16)
    paths, counts, pos = [], [], 0
    for i, n in enumerate([7, 1, 1000, 992, 1000]):
        p = tmp_path / f"s{i}.bin"
        p.write_bytes(ref[pos : pos + n].astype("<u2").tobytes())
        paths.append(p)
        counts.append(n)
        pos += n
    s = TokenStream(paths, counts, "<u2")
    assert len(s) == 3000 and s.shape == (3000,)
    for key in [
        slice(0, 7),
        slice(5, 9),
        slice(6, 1010),
        slice(None),
        slice(-5, None),
        slice(2990, 5000),
        slice(100, 50),
        slice(0, 3000, 7),
    ]:
        np.testing.assert_array_equal(s[key], ref[key])
    assert int(s[8]) == 8 and int(s[-1]) == 2999
    with pytest.raises(IndexError):
        s[3000]
    np.testing.assert_array_equal(np.asarray(s, np.int64), ref.astype(np.int64))


def test_memory_budget_too_small_is_a_config_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="max_memory"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", max_memory="10MB", workers=2)
    with pytest.raises(ConfigError, match="max_memory"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", max_memory="lots")


# =======================================================================================
# Command line
# =======================================================================================


def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "prepare.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_prepare_verify_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    (tmp_path / "b.txt").write_text("second document\n" * 20)
    r = _cli(tmp_path / "a.txt", tmp_path / "b.txt", "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and (tmp_path / "out" / "manifest.json").is_file()
    r = _cli("--verify", tmp_path / "out")
    assert r.returncode == 0 and "matches" in r.stdout
    (tmp_path / "out" / "val-00000.bin").write_bytes(b"\0\0")
    r = _cli("--verify", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "val-00000.bin" in r.stderr
    r = _cli(tmp_path / "missing.txt", "--out", tmp_path / "o2")
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: INPUT: no such file or directory: {tmp_path / 'missing.txt'}"
    )
    assert not (tmp_path / "o2").exists()
