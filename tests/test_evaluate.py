"""mlalm.evaluate and eval.py against independent computations.

* Perplexity and bits per byte: a tiny model is trained for 10 steps on a small text file
  (byte tokenizer, validation split = a second file).  The reference scores the same
  token stream (end-of-text, the file's bytes, end-of-text) with its own loop over
  windows of T+1 tokens every T tokens (the last one short, not padded), a numpy
  float64 log-softmax over ``model(tokens)``'s logits, and counts bytes, words and lines
  from the raw file the way pytorch's word_language_model reads WikiText.
* KV-cache sizes and the budget's longest context: hand-written arithmetic.
* The command line: one JSON object on stdout; bad input exits 2 with one line.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mlalm.config import from_dict
from mlalm.data import tokenize_path
from mlalm.data.tokenizers import ByteTokenizer, get_tokenizer, spelled_documents
from mlalm.errors import ConfigError, DataError
from mlalm.eval_report import kv_cache_report, max_context, parse_bytes
from mlalm.evaluate import count_words_lines, evaluate_checkpoint
from mlalm.inference import load_for_inference
from mlalm.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
eval_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_cli)

T = 16  # train.seq_len
WORDS = "the of and to in a is that for it as was with be by on not café naïve".split()
REQUIRED = {
    "perplexity",
    "bits_per_byte",
    "tokens",
    "word_perplexity",
    "kv_cache",
    "decode",
    "split",
    "checkpoint",
    "step",
    "bytes",
    "words",
    "nll_sum",
}


def _text(n_lines: int, seed: int) -> str:
    """Word-level text with blank lines, tabs, runs of spaces and non-ASCII words."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_lines):
        k = int(rng.integers(0, 9)) if i % 5 else 0
        lines.append(rng.choice(["  ", " ", "\t "]).join(rng.choice(WORDS, k)))
    return "\n".join(lines)  # no newline after the last line: it still counts as a line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mlalm.train import train

    d = tmp_path_factory.mktemp("eval")
    (d / "train.txt").write_text(_text(300, 0), encoding="utf-8")
    (d / "valid.txt").write_text(_text(50, 1), encoding="utf-8")
    cfg = from_dict(
        {
            "model": dict(d_model=32, n_layers=2, ffn_dim=64, max_seq_len=64),
            "attention": dict(
                kind="mla", n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
            ),
            "moe": dict(n_routed_experts=4, expert_ffn_dim=16, first_k_dense_replace=1),
            "data": dict(
                path=str(d / "train.txt"), val_path=str(d / "valid.txt"), cache_dir=str(d / "cache")
            ),
            "train": dict(
                steps=10,
                batch_size=4,
                seq_len=T,
                eval_every=100,
                final_eval_batches=0,
                run_dir=str(d / "runs"),
                name="r",
                progress=False,
            ),
            "optim": dict(warmup_steps=2, lr=1e-2),
            "checkpoint": dict(async_save=False),
        }
    )
    train(cfg, log=lambda *a: None)
    return str(d / "runs" / "r"), str(d / "valid.txt")


@pytest.fixture(scope="module")
def reference(run):
    """Per-window NLL (nats) by an independent loop; the raw validation bytes."""
    run_dir, valid = run
    model, cfg, _ = load_for_inference(run_dir)
    assert cfg.train.seq_len == T
    raw = open(valid, "rb").read()
    stream = np.array([256, *raw, 256])  # end-of-text, the document, end-of-text
    windows = [(stream[s : s + T], stream[s + 1 : s + T + 1]) for s in range(0, len(stream) - 1, T)]
    assert len(windows[-1][1]) < T  # a short last window is exercised
    # one forward pass over all windows; the short last one is padded at its end, which
    # by causality leaves the logits of its real positions unchanged
    x_WT = np.zeros((len(windows), T), np.int32)
    for i, (_, y) in enumerate(windows):
        x_WT[i, : len(y)] = windows[i][0][: len(y)]
    graphdef, state = nnx.split(model)
    logits_WTV = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x_WT), np.float64)
    per_window = []
    for l_TV, (_, y) in zip(logits_WTV, windows):
        l_TV = l_TV[: len(y)]
        m = l_TV.max(-1)
        lse = m + np.log(np.exp(l_TV - m[:, None]).sum(-1))  # log Σ exp(logits)
        per_window.append(float((lse - l_TV[np.arange(len(y)), y]).sum()))
    return {"per_window": per_window, "nll": sum(per_window), "raw": raw, "N": len(stream) - 1}


@pytest.fixture(scope="module")
def cli_json(run):
    """eval.py --json on the run directory (in-process; stdout captured)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = eval_cli.main(
            [run[0], "--json", "--batch-size", "3", "--decode-batch", "2", "--decode-context", "24"]
        )
    return code, out.getvalue()


@pytest.mark.slow
def test_perplexity_and_bits_per_byte_match_an_independent_loop(cli_json, reference):
    code, stdout = cli_json
    assert code == 0
    r = json.loads(stdout)
    N, nll = reference["N"], reference["nll"]
    assert N == len(reference["raw"]) + 1  # every byte and the final end-of-text
    assert r["tokens"] == N and r["whole_split"]
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll / N), rel=1e-5)
    assert r["bytes"] == len(reference["raw"])
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(reference["raw"]), rel=1e-5)
    assert 1 < r["perplexity"] < 257  # trained a little: better than uniform


def test_summary_final_validation_equals_eval_py(run):
    """One evaluation path: the trainer's final validation and eval.py's give the same
    figures for the same checkpoint and split (here the model's own batch size)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # the step directory, so that the run directory's eval_valid.json stays as it was
        assert eval_cli.main([os.path.join(run[0], "checkpoints", "10"), "--json", "--no-decode"]) == 0
    r = json.loads(out.getvalue())
    with open(os.path.join(run[0], "summary.json")) as f:
        s = json.load(f)
    assert s["val_whole_split"] and s["val_tokens"] == r["tokens"]
    assert s["val_loss"] == pytest.approx(r["loss"], rel=1e-6, abs=0)
    assert s["val_bits_per_byte"] == pytest.approx(r["bits_per_byte"], rel=1e-6, abs=0)


def test_word_perplexity_uses_words_plus_one_eol_per_line(cli_json, reference):
    r = json.loads(cli_json[1])
    text = reference["raw"].decode("utf-8")
    count = sum(len(line.split()) + 1 for line in io.StringIO(text))  # pytorch's WikiText reader
    assert r["words"] + r["lines"] == count
    assert r["lines"] == 50
    assert r["word_perplexity"] == pytest.approx(math.exp(reference["nll"] / count), rel=1e-5)


def test_max_batches_scores_a_prefix_and_counts_its_bytes(run, reference):
    r = evaluate_checkpoint(run[0], batch_size=2, max_batches=1, decode=False)
    assert r["tokens"] == 2 * T and not r["whole_split"]
    assert r["nll_sum"] == pytest.approx(sum(reference["per_window"][:2]), rel=1e-5)
    prefix = reference["raw"][: 2 * T]  # the first 2T tokens are bytes of the file
    assert r["bytes"] == 2 * T
    assert r["words"] == len(prefix.decode("utf-8", errors="replace").split())


def test_cli_json_keys_and_run_dir_outputs(cli_json, run):
    code, stdout = cli_json
    r = json.loads(stdout)  # the whole of stdout is one JSON object
    assert REQUIRED <= set(r)
    assert {
        "bytes_per_token_per_layer",
        "bytes_per_token",
        "measured_bytes_per_token",
        "naive_bytes_per_token",
    } <= set(r["kv_cache"])
    assert r["decode"]["batch"] == 2 and r["decode"]["context"] == 24 and r["decode"]["tokens_per_s"] > 0
    assert r["split"] == "valid" and r["step"] == 10
    # MLA latent: (kv_lora_rank 16 + rope 4) float32 values per layer, 2 layers
    assert r["kv_cache"]["measured_bytes_per_token"] == (16 + 4) * 4 * 2
    assert r["kv_cache"]["naive_bytes_per_token"] == 2 * (8 + 4 + 8) * 4 * 2
    assert json.load(open(os.path.join(run[0], "eval_valid.json"))) == r
    events = [f for f in os.listdir(run[0]) if f.startswith("events.out.tfevents")]
    assert any(b"eval/valid/perplexity" in open(os.path.join(run[0], f), "rb").read() for f in events)


def _bad_checkpoint(run_dir, tmp_path):
    """A step directory whose config says d_model 48 while its arrays are 32 wide."""
    src = os.path.join(run_dir, "checkpoints", "10")
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    os.remove(os.path.join(bad, "manifest.json"))
    meta = os.path.join(bad, "meta", "metadata")
    m = json.load(open(meta))
    m["config"]["model"]["d_model"] = 48
    json.dump(m, open(meta, "w"))
    return bad


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no such run directory or checkpoint"),
        ("incompatible", "does not fit its config"),
        ("no_data", "--data: no such file or directory"),
        ("empty_data", "contains no text"),
        ("no_test_split", "no data.test_path"),
        ("budget", "--memory-budget='lots'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, case, message):
    run_dir = run[0]
    (tmp_path / "empty.txt").write_text("  \n")
    argv = {
        "missing": [str(tmp_path / "nothing")],
        "incompatible": [_bad_checkpoint(run_dir, tmp_path)],
        "no_data": [run_dir, "--data", str(tmp_path / "nothing.txt")],
        "empty_data": [run_dir, "--data", str(tmp_path / "empty.txt")],
        "no_test_split": [run_dir, "--split", "test"],
        "budget": [run_dir, "--memory-budget", "lots"],
    }[case]
    assert eval_cli.main(argv + ["--json", "--no-decode"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_command_line_exit_code(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"error: {tmp_path / 'none'}: no such run directory or checkpoint\n"


# -- KV cache ----------------------------------------------------------------------------


def _cfg(attention, dtype="float32"):
    return from_dict(
        {
            "model": dict(vocab_size=64, d_model=32, n_layers=2, ffn_dim=64, max_seq_len=64, dtype=dtype),
            "attention": attention,
            "train": {"seq_len": 16},
        }
    )


H = 16  # head dim
CASES = {  # attention config, hand-counted cache elements per token per layer, naive elements
    "mha": (dict(kind="mha", n_heads=4, head_dim=H), 2 * 4 * H, 2 * 4 * H),
    "gqa": (dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=H), 2 * 2 * H, 2 * 2 * H),
    "mqa": (dict(kind="mqa", n_heads=4, head_dim=H), 2 * H, 2 * H),
    # MLA with d_c = 4·d_h = 64 and d_r = d_h/2 = 8: 4.5·d_h = 72 elements; naive n_h·(d_n + d_r + d_v)
    "mla": (
        dict(kind="mla", n_heads=4, kv_lora_rank=64, qk_rope_head_dim=8, qk_nope_head_dim=H, v_head_dim=H),
        72,
        4 * (16 + 8 + 16),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,b", [("float32", 4), ("bfloat16", 2)])
def test_allocated_cache_equals_the_formula(name, dtype, b):
    attention, elements, naive = CASES[name]
    if name == "mla":
        assert 64 + 8 == 72 == 4.5 * H
    cfg = _cfg(attention, dtype)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    kv = kv_cache_report(model, cfg, batch=3, context=10, budget_bytes=2**30)
    assert kv["bytes_per_token_per_layer"] == elements * b
    assert kv["bytes_per_token"] == elements * b * 2
    assert kv["measured_bytes"] == elements * b * 2 * 3 * 10
    assert kv["measured_bytes_per_token"] == elements * b * 2 and kv["agrees"]
    assert kv["naive_bytes_per_token"] == kv["naive_measured_bytes_per_token"] == naive * b * 2
    assert kv["max_context_for_budget"] == 2**30 // (elements * b * 2)


def test_max_context_for_a_budget():
    assert parse_bytes("1GiB") == 1073741824
    assert parse_bytes("8GiB") == 8 * 1024**3
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512 MiB") == 536870912
    assert parse_bytes("1000") == 1000
    for bad in ("", "lots", "1 GiBs", "0", "-5GB"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)
    # MLA above, 2 layers, float32: 72 · 4 · 2 = 576 bytes per token; 2^30 = 576 · 1864135 + 64
    assert max_context(2**30, 576) == 1864135
    assert max_context(2**30, 576, batch=8) == 233016  # 576 · 8 · 233016 = 1073737728 <= 2^30
    assert 576 * 8 * 233017 > 2**30


# -- text accounting -----------------------------------------------------------------------


def test_bpe_tokens_spell_the_text_byte_for_byte():
    text = "naïve café — 日本語 text\n\tand   more 😀 words\n"
    tok = get_tokenizer("bpe", train_texts=[text * 20], vocab_size=300)
    ids = np.concatenate([tok.encode(text), [tok.eos_id], tok.encode("é")])
    assert spelled_documents(ids, tok) == [text.encode("utf-8"), "é".encode()]


def test_non_utf8_text_follows_one_rule_for_training_and_evaluation(tmp_path):
    """Before: BPE training read non-UTF-8 text (U+FFFD substituted, bits/byte counted
    against the raw bytes) while eval.py refused it.  Now the same code tokenizes both:
    BPE refuses naming the file, the byte tokenizer takes any bytes."""
    from mlalm.config import from_dict as cfg_from
    from mlalm.data import load_corpus

    text = "naïve café text\n" * 50
    tok = get_tokenizer("bpe", train_texts=[text], vocab_size=300)
    good, bad = tmp_path / "a.txt", tmp_path / "b.bin"
    good.write_text(text)
    bad.write_bytes(text.encode() + b"ok\xff\xfe")
    split = tokenize_path(str(good), tok, cache_dir=str(tmp_path / "cache"))
    assert spelled_documents(np.asarray(split.tokens), tok) == [text.encode()]
    with pytest.raises(DataError, match="b.bin") as at_eval:
        tokenize_path(str(bad), tok, cache_dir=str(tmp_path / "cache"))
    tok.save(str(tmp_path / "tok"))
    cfg = cfg_from(
        {
            "data": {
                "path": str(bad),
                "val_path": str(good),
                "cache_dir": str(tmp_path / "cache2"),
                "tokenizer": str(tmp_path / "tok" / "tokenizer.json"),
            }
        }
    )
    with pytest.raises(DataError, match="b.bin") as at_training:
        load_corpus(cfg.data)
    assert "UTF-8" in str(at_eval.value) and "UTF-8" in str(at_training.value)
    byte = tokenize_path(str(bad), ByteTokenizer(), cache_dir=str(tmp_path / "cache3"))
    assert len(byte.tokens) == len(bad.read_bytes()) + 1 and byte.bytes == len(bad.read_bytes())


def test_wikitext2_word_count_convention():
    path = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/wikitext-2/valid.txt is not present (shared corpora folder)")
    words, lines = count_words_lines(open(path, "rb").read())
    assert words + lines == 217_646  # the published WikiText-2 validation token count
