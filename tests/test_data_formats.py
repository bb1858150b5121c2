"""mlalm.data.formats and mlalm.data.tokenizers: every input format, every bad input, and
the tokenizers (byte, BPE, any tokenizer.json).

References are independent of the code under test: Python's gzip/zstandard/pyarrow/json
writers, plain UTF-8 bytes, hand-built vocabularies, and a naive re-statement of the
piece rule.
"""

import gzip
import json
import os
import random
import re
import threading

import numpy as np
import pytest

from mlalm.data import encode as enc
from mlalm.data.formats import expand_inputs
from mlalm.data.prepare import prepare
from mlalm.data.shards import PreparedData
from mlalm.data.tokenizers import EOS_NAMES, HFTokenizer, get_tokenizer, load_tokenizer, spelled_documents
from mlalm.errors import DataError

DOCS = [
    "first document: plain ASCII\nwith two lines\n",
    "zweites Dokument: ünïcödé ✓ 日本語\n",
    "third has an emoji 🎉 and\ttabs\n" * 3,
    "4th " * 50,
]


def _byte_reference(texts) -> list[int]:
    """Byte tokenizer: UTF-8 bytes of each document, then 256."""
    return [t for x in texts for t in list(x.encode("utf-8")) + [256]]


def _prepare_all(tmp_path, inputs, **kw):
    kw.setdefault("val_fraction", 0.0)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    prepare(inputs, out, **kw)
    return PreparedData.open(out)


def _write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    return path


def _zst(path, data: bytes):
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    return path


def _parquet(path, texts, column="text", row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({column: texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size
    )
    return path


# =======================================================================================
# Every format gives the documents it holds
# =======================================================================================


def test_text_files_gz_zst_give_the_same_tokens(tmp_path):
    for i, t in enumerate(DOCS):
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / f"d{i}.txt").write_bytes(t.encode())
        (tmp_path / "gz").mkdir(exist_ok=True)
        (tmp_path / "gz" / f"d{i}.txt.gz").write_bytes(gzip.compress(t.encode()))
        (tmp_path / "zst").mkdir(exist_ok=True)
        _zst(tmp_path / "zst" / f"d{i}.txt.zst", t.encode())
    for d in ("plain", "gz", "zst"):
        data = _prepare_all(tmp_path, [tmp_path / d])
        assert data.split("train").tokens.tolist() == _byte_reference(DOCS), d
        assert data.split("train").bytes == sum(len(t.encode()) for t in DOCS)
        assert data.split("train").documents == len(DOCS)


def test_record_formats_give_the_same_tokens(tmp_path):
    want = _byte_reference(DOCS)
    inputs = {
        "jsonl": _write_jsonl(tmp_path / "a.jsonl", DOCS),
        "ndjson": _write_jsonl(tmp_path / "a.ndjson", DOCS),
        "json lines": _write_jsonl(tmp_path / "lines.json", DOCS),
        "jsonl.gz": _write_jsonl(tmp_path / "a.jsonl.gz", DOCS, opener=gzip.open),
        "jsonl.zst": _zst(
            tmp_path / "b.jsonl.zst", "".join(json.dumps({"text": t}) + "\n" for t in DOCS).encode()
        ),
        "json array": tmp_path / "array.json",
        "parquet": _parquet(tmp_path / "a.parquet", DOCS),
    }
    inputs["json array"].write_text(json.dumps([{"text": t} for t in DOCS], indent=2))
    for what, path in inputs.items():
        data = _prepare_all(tmp_path, [path])
        assert data.split("train").tokens.tolist() == want, what


def test_parquet_large_string_and_binary_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(DOCS, pa.large_string())}), tmp_path / "l.parquet")
    pq.write_table(
        pa.table({"text": pa.array([t.encode() for t in DOCS], pa.binary())}), tmp_path / "b.parquet"
    )
    for name in ("l.parquet", "b.parquet"):
        assert _prepare_all(tmp_path, [tmp_path / name]).split("train").tokens.tolist() == _byte_reference(
            DOCS
        )


def test_empty_and_blank_documents_are_dropped(tmp_path):
    texts = ["kept one", "", "   \n\t", "kept two"]
    _write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n\n")  # blank lines
    data = _prepare_all(tmp_path, [tmp_path / "a.jsonl"])
    assert data.split("train").tokens.tolist() == _byte_reference(["kept one", "kept two"])
    assert data.split("train").documents == 2


def test_directory_walk_order_hidden_skipped_and_globs(tmp_path):
    d = tmp_path / "c"
    for rel in [
        "b.txt",
        "a.txt",
        "sub/z.txt",
        "sub/deeper/y.txt",
        "asub/x.txt",
        ".hidden.txt",
        ".git/config",
        "sub/.h/q.txt",
    ]:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(rel)
    got = [os.path.relpath(f.path, d) for f in expand_inputs([d])]
    # each directory's files (sorted), then its subdirectories (sorted), depth first
    assert got == ["a.txt", "b.txt", "asub/x.txt", "sub/z.txt", "sub/deeper/y.txt"]
    globbed = [os.path.relpath(f.path, d) for f in expand_inputs([str(d / "**" / "*.txt")])]
    assert sorted(globbed) == sorted(got)
    # a file named twice is read once
    assert len(expand_inputs([d / "a.txt", d / "a.txt", d])) == 5


# =======================================================================================
# Bad inputs: one-line DataErrors naming the file
# =======================================================================================


def _one_line_error(call, *needles):
    with pytest.raises(DataError) as ei:
        call()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_missing_input_and_empty_glob(tmp_path):
    _one_line_error(
        lambda: expand_inputs([tmp_path / "nope.txt"], key="data.path"), "data.path", tmp_path / "nope.txt"
    )
    _one_line_error(lambda: expand_inputs([str(tmp_path / "*.jsonl")]), "no file matches")


@pytest.mark.parametrize("name", ["a.tar", "b.txt.bz2", "c.xz", "d.parquet.gz", "e.zip"])
def test_unknown_format(tmp_path, name):
    (tmp_path / name).write_bytes(b"whatever")
    msg = _one_line_error(lambda: expand_inputs([tmp_path / name]), tmp_path / name)
    assert "unknown input format" in msg


def _returns_within(fn, seconds=20):
    """Run ``fn`` in a thread; what it raised, asserting it did not hang."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "reading the input hung"
    return box.get("error")


def test_fifo_and_device_files_are_rejected(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        err = _returns_within(lambda: prepare([path], tmp_path / "out"))
        assert isinstance(err, DataError) and str(path) in str(err) and "not a regular file" in str(err)
    # inside a directory too
    err = _returns_within(lambda: prepare([tmp_path], tmp_path.parent / "out2"))
    assert isinstance(err, DataError) and "pipe.txt" in str(err)


def test_parquet_without_the_text_column_names_its_columns(tmp_path):
    p = _parquet(tmp_path / "t.parquet", DOCS, column="content")
    msg = _one_line_error(lambda: prepare([p], tmp_path / "out"), p, "'text'", "content, n")
    assert "--text-key" in msg
    # with the right key it reads
    data = _prepare_all(tmp_path, [p], text_key="content")
    assert data.split("train").tokens.tolist() == _byte_reference(DOCS)


def test_corrupt_or_truncated_gzip_names_file_and_offset(tmp_path):
    blob = gzip.compress(("line of text %d\n" * 1 % 0).encode() * 20000)
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    msg = _one_line_error(lambda: prepare([truncated], tmp_path / "o1"), truncated, "gzip", "byte")
    assert re.search(r"compressed byte [\d,]+", msg)
    garbage = tmp_path / "g.jsonl.gz"
    garbage.write_bytes(b"this is not gzip data at all")
    _one_line_error(lambda: prepare([garbage], tmp_path / "o2"), garbage, "gzip")


def test_corrupt_or_truncated_zstd_names_file(tmp_path):
    import zstandard

    blob = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(1000) * 300)
    truncated = tmp_path / "t.txt.zst"
    truncated.write_bytes(blob[: len(blob) // 2])
    _one_line_error(lambda: prepare([truncated], tmp_path / "o1"), truncated, "zstd", "compressed byte")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "b.txt.zst"
    bad.write_bytes(bytes(flipped))
    _one_line_error(lambda: prepare([bad], tmp_path / "o2"), bad, "zstd")


@pytest.mark.parametrize("workers", [0, 1])
def test_jsonl_bad_line_and_missing_key_name_the_line(tmp_path, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    _one_line_error(lambda: prepare([bad], tmp_path / "o1", workers=workers), f"{bad}:3", "not valid JSON")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "ok"}\n{"body": "b"}\n')
    _one_line_error(lambda: prepare([nokey], tmp_path / "o2", workers=workers), f"{nokey}:2", "'text'")
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 5}\n')
    _one_line_error(lambda: prepare([notstr], tmp_path / "o3", workers=workers), f"{notstr}:1")
    # nothing half-written is visible as complete
    assert not any((tmp_path / o / "manifest.json").exists() for o in ("o1", "o2", "o3"))


def test_empty_corpus_is_a_data_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "blank.txt").write_text("  \n\t ")
    _write_jsonl(tmp_path / "c" / "e.jsonl", ["", "  "])
    _one_line_error(
        lambda: prepare([tmp_path / "c"], tmp_path / "out", key="data.path"), "data.path", "contains no text"
    )


def test_unparsable_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    (tmp_path / "a.txt").write_text("text")
    _one_line_error(
        lambda: prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=str(bad)),
        bad,
        "not a readable tokenizer",
    )


def test_non_utf8_text_rule(tmp_path, bpe_file):
    raw = b"ok text\n" * 3 + b"bad \xff byte\n"
    p = tmp_path / "latin.txt"
    p.write_bytes(raw)
    (tmp_path / "other.txt").write_text("another document\n")
    # the byte tokenizer takes any bytes, and counts them
    data = _prepare_all(tmp_path, [p, tmp_path / "other.txt"])
    assert data.split("train").tokens.tolist()[: len(raw)] == list(raw)
    # other tokenizers read UTF-8 only: the file and the byte offset are named
    bad_at = raw.index(b"\xff")
    _one_line_error(
        lambda: prepare([p], tmp_path / "o", tokenizer=bpe_file, val_fraction=0.0),
        p,
        f"offset {bad_at}",
        "not UTF-8",
    )
    # in the validation part of a single document cut by bytes: still the document's offset
    big = ("line of text\n" * 20000).encode() + b"\xfe" + b"tail\n" * 10
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "one.txt").write_bytes(big)
    bad_at = big.index(b"\xfe")
    _one_line_error(
        lambda: prepare([tmp_path / "big"], tmp_path / "o2", tokenizer=bpe_file, val_fraction=0.5),
        "one.txt",
        f"offset {bad_at:,}",
    )


def test_binary_looking_file_warns_once(tmp_path):
    elf = tmp_path / "prog.bin"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(200) + b"text afterwards")
    (tmp_path / "t.txt").write_text("normal text")
    with pytest.warns(UserWarning, match="prog.bin: looks like binary") as rec:
        _prepare_all(tmp_path, [elf, tmp_path / "t.txt"])
    assert sum("looks like binary" in str(w.message) for w in rec) == 1


# =======================================================================================
# Pieces: the streaming rule equals the one-shot rule
# =======================================================================================


def _naive_pieces(data: bytes, size: int = enc.PIECE) -> list[bytes]:
    """The rule, restated: cut after the first newline at least ``size`` bytes on."""
    out, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start + size)
        end = len(data) if end < 0 else end + 1
        out.append(data[start:end])
        start = end
    return out


def test_chunker_pieces_do_not_depend_on_block_boundaries():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "ü", "日本", "\n", "\n\n", " "]
    data = "".join(rng.choice(words) for _ in range(120_000)).encode()
    want = _naive_pieces(data)
    assert len(want) > 3
    for _ in range(5):
        c = enc.Chunker()
        got, pos = [], 0
        while pos < len(data):
            n = rng.randrange(1, 200_000)
            got += c.feed(data[pos : pos + n])
            pos += n
        got += c.flush()
        assert got == want


def test_split_stream_cuts_at_the_utf8_boundary_as_split_documents():
    from mlalm.data.sources import split_documents

    rng = random.Random(1)
    for trial in range(60):
        data = "".join(rng.choice(["a", "é", "✓", "🎉", "\n"]) for _ in range(rng.randrange(1, 400))).encode()
        if trial % 3 == 0:
            data = bytes(rng.randrange(0x80, 0xC0) for _ in range(50)) + data  # continuation bytes
        f = rng.choice([0.1, 0.25, 0.5, 0.9])
        (tr,), (va,) = split_documents([("x", data)], f)
        pos, blocks = 0, []
        while pos < len(data):
            n = rng.randrange(1, 40)
            blocks.append(data[pos : pos + n])
            pos += n
        got = {enc.TRAIN: b"", enc.VAL: b""}
        for split, b in enc.split_stream(blocks, int(len(data) * (1 - f))):
            got[split] += b
        assert (got[enc.TRAIN], got[enc.VAL]) == (tr[1], va[1])


# =======================================================================================
# Tokenizers
# =======================================================================================


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    tok = get_tokenizer("bpe", train_texts=[" ".join(DOCS) * 20], vocab_size=300)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d))
    return str(d / "tokenizer.json")


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog"]


def _wordlevel(tmp_path, specials=("</s>",), n_extra=0):
    """A WordLevel tokenizer.json (whitespace pre-tokenizer) built by hand."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    for i in range(n_extra):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    path = tmp_path / "wl" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok.save(str(path))
    return str(path), vocab


def test_eos_found_by_name_explicit_and_error(tmp_path):
    path, vocab = _wordlevel(tmp_path, specials=("<pad>", "</s>"))
    tok = load_tokenizer(path)
    assert tok.eos_token == "</s>" and tok.eos_id == len(vocab) + 1
    assert tok.vocab_size == len(vocab) + 2
    assert load_tokenizer(path, eos_token="<pad>").eos_id == len(vocab)
    _one_line_error(lambda: load_tokenizer(path, eos_token="<nope>"), path, "'<nope>'")
    (tmp_path / "x").mkdir()
    none_path, _ = _wordlevel(tmp_path / "x", specials=("<pad>",))
    msg = _one_line_error(lambda: load_tokenizer(none_path), none_path, "data.eos_token")
    for name in EOS_NAMES:
        assert name in msg


def test_eos_from_tokenizer_config_json(tmp_path):
    path, vocab = _wordlevel(tmp_path, specials=("</s>", "<|im_end|>"))
    with open(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": {"content": "<|im_end|>"}}, f)
    assert load_tokenizer(path).eos_token == "<|im_end|>"


def test_pretrained_tokenizer_end_to_end(tmp_path):
    path, vocab = _wordlevel(tmp_path)
    texts = ["the cat sat on the mat", "a dog sat", "the unknownword cat"]
    _write_jsonl(tmp_path / "d.jsonl", texts)
    out = tmp_path / "prepared"
    m = prepare([tmp_path / "d.jsonl"], out, tokenizer=path, val_fraction=0.0)
    eos = len(vocab)  # the first token added after the vocabulary
    want = [t for x in texts for t in [vocab.get(w, 0) for w in x.split()] + [eos]]
    assert m["tokenizer"]["name"] == "pretrained" and m["tokenizer"]["eos_token"] == "</s>"
    assert m["tokenizer"]["eos_id"] == eos and m["dtype"] == "uint16"
    data = PreparedData.open(out)
    assert data.split("train").tokens.tolist() == want
    # the tokenizer travels with the data
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == vocab
    assert data.tokenizer.fingerprint() == load_tokenizer(path).fingerprint()
    # a WordLevel tokenizer drops the spaces: its tokens do not spell the text
    _one_line_error(lambda: data.tokenizer.token_bytes(), "cannot be mapped to bytes")


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    path, vocab = _wordlevel(tmp_path, n_extra=70_000)
    (tmp_path / "t.txt").write_text("w69999 the w65536 cat")
    m = prepare([tmp_path / "t.txt"], tmp_path / "out", tokenizer=path, val_fraction=0.0)
    assert m["dtype"] == "uint32"
    ids = PreparedData.open(tmp_path / "out").split("train").tokens
    assert ids.dtype == np.dtype("<u4")
    assert ids.tolist() == [vocab["w69999"], vocab["the"], vocab["w65536"], vocab["cat"], len(vocab)]
    assert os.path.getsize(tmp_path / "out" / "train-00000.bin") == 5 * 4


def test_byte_level_bpe_token_bytes_spell_the_text(bpe_file):
    tok = load_tokenizer(bpe_file)
    text = "ünïcödé ✓ 日本語 🎉 and words the model never saw\n"
    ids = tok.encode(text)
    table = tok.token_bytes()
    assert b"".join(table[i] for i in ids.tolist()) == text.encode()
    assert table[tok.eos_id] == b""
    assert spelled_documents(np.concatenate([ids, [tok.eos_id], ids]), tok) == [text.encode()] * 2
    # a document's literal end-of-text string is text, not a boundary
    lit = tok.encode("a <|endoftext|> b")
    assert tok.eos_id not in lit.tolist() and b"".join(table[i] for i in lit.tolist()) == b"a <|endoftext|> b"


def test_sentencepiece_style_with_byte_fallback(tmp_path):
    """Llama-2 layout: Prepend('▁') + Replace(' ', '▁') normalizer, byte-fallback BPE,
    decoder Replace('▁', ' ') + ByteFallback + Fuse + Strip."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ["▁", "t", "h", "e", "▁t", "he", "▁the", "c", "a", "▁c", "at", "▁cat"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t"), ("▁c", "at")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = load_tokenizer(str(path))
    assert t.eos_token == "</s>" and t.prefix_space
    text = "the cat é"
    ids = t.encode(text).tolist()
    assert [t.tok.id_to_token(i) for i in ids][-2:] == ["<0xC3>", "<0xA9>"]  # é by byte fallback
    table = t.token_bytes()
    assert b"".join(table[i] for i in ids) == b" " + text.encode()  # the prepended space
    assert spelled_documents(ids + [t.eos_id] + ids, t) == [text.encode()] * 2


def test_get_tokenizer_names():
    assert get_tokenizer("byte").vocab_size == 257
    from mlalm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        get_tokenizer("wordpiece")
    assert issubclass(type(get_tokenizer("bpe", train_texts=["a b c"] * 10, vocab_size=270)), HFTokenizer)
