"""Evaluation of a checkpoint: perplexity, bits per byte, KV-cache footprint, decode speed.

Quality is measured over the WHOLE split (or the first ``max_batches`` batches):

* The split's token stream ``x_1 .. x_N`` (documents, each followed by the end-of-text
  token, exactly as the trainer tokenizes them) is preceded by one end-of-text token
  ``x_0`` -- the boundary the model saw before every document in training -- so that
  every token of the split, the first one included, is predicted exactly once.
* Windows of ``T + 1`` tokens (``T`` = the model's training length ``train.seq_len``)
  start every ``T`` tokens: window k holds ``x_{kT} .. x_{kT+T}`` and scores the targets
  ``x_{kT+1} .. x_{kT+T}``; consecutive windows share one token.  A target at offset j
  of its window is predicted from the j tokens before it in that window (no context
  is carried across windows).  The last window is shorter; it is padded and the padding
  is not scored.
* ``nll_sum = Σ_i -ln p(x_i | window context)`` over the N scored tokens (float32 per
  token and per batch, summed in float64), ``loss = nll_sum / N``,
  ``perplexity = exp(loss)``.
* ``bits_per_byte = nll_sum / ln 2 / bytes`` where ``bytes`` is the UTF-8 byte count of
  the text the scored tokens spell (end-of-text tokens spell nothing but are scored).
  For the whole split that is the split's byte count; it is checked against the raw
  files, so a tokenizer that does not reproduce the text byte for byte is an error.
* ``word_perplexity = exp(nll_sum / (words + lines))``: whitespace-separated words plus
  one end-of-line per line (a last line without ``\\n`` counts too), the WikiText
  convention (WikiText-2 valid: 217,646).  Computed for every text; it is the standard
  figure only for word-level corpora such as WikiText.

The KV cache is sized from the formula (``kv_cache_bytes_per_token_per_layer``) and
from the arrays ``init_cache`` actually allocates; the two must agree.

Models with multi-token prediction (``model.mtp_depth`` = D) get two more sections; the
figures above stay the main head's:

* ``mtp`` (:func:`mtp_quality`), per depth k, over the same windows: ``loss``, the mean
  NLL of t_{i+k+1} given by depth k at position i, over the positions whose target lies
  in the window (T - k per full window); and ``agreement``, the fraction of those
  positions where argmax of depth k's logits at i equals argmax of the main model's
  logits at i + k -- the main model's own prediction of the same token t_{i+k+1}, made
  from the true tokens up to i + k.  (Depth 1: MTP at i against main at i + 1.)
* ``speculative`` (with the decode timing): greedy decoding of prompts taken from the
  split, plain and self-speculative, at batch 1 and at the decode batch: tokens/s of
  each, the acceptance rate of the drafts, and whether the outputs are identical.
"""

from __future__ import annotations

import math
import os
import time
from typing import cast

import jax
import numpy as np
from flax import nnx

from mlalm.data.tokenizers import spelled_documents
from mlalm.errors import ConfigError, DataError
from mlalm.eval_report import kv_cache_report, speculative_report
from mlalm.sharding import to_host

WINDOW_SCHEME = (
    "one end-of-text token, then the split; windows of T+1 tokens every T tokens "
    "(consecutive windows share one token), so every token of the split is predicted "
    "exactly once, from the tokens before it in its window"
)


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def count_words_lines(data: bytes) -> tuple[int, int]:
    """(whitespace-separated words, lines) of ``data`` (the WikiText word-count convention)."""
    text = data.decode("utf-8", errors="replace")
    return len(text.split()), text.count("\n") + (1 if text and not text.endswith("\n") else 0)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def eval_split(cfg, tokenizer, split: str, data: str | None = None):
    """``(tokens, bytes, documents, description)`` to evaluate: ``data`` (text in any input
    format, or a prepared directory) when given, else the checkpoint config's validation or
    test split, prepared as the trainer prepared it (through the same cache, so a split the
    trainer used is not read again)."""
    import dataclasses

    from mlalm.data import load_corpus, tokenize_path
    from mlalm.data.cache import default_cache_dir

    d = cfg.data
    common = dict(cache_dir=d.cache_dir or default_cache_dir(), text_key=d.text_key)
    if data is not None:
        s = tokenize_path(data, tokenizer, key="--data", **common)
        return s.tokens, s.bytes, s.documents, data
    if split == "test":
        if not d.test_path:
            raise DataError(
                "the checkpoint's config has no data.test_path; give --data PATH to evaluate a test file"
            )
        s = tokenize_path(d.test_path, tokenizer, key="data.test_path", **common)
        return s.tokens, s.bytes, s.documents, d.test_path
    if split != "valid":
        raise ConfigError(f"--split={split!r}: expected 'valid' or 'test'")
    try:
        corpus = load_corpus(dataclasses.replace(d, test_path=None), tokenizer=tokenizer)
    except DataError as e:
        raise DataError(f"{e} (from the checkpoint's config; give --data PATH instead)") from None
    where = (
        d.val_path
        or f"validation part (data.val_fraction={d.val_fraction:g}) of {d.path or 'the built-in corpus'}"
    )
    return corpus.val, corpus.val_bytes, corpus.val_documents, where


# ---------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------


def window_batches(stream: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int = 0):
    """Batches over ``stream`` (x_0 .. x_N) in the scheme of the module docstring.

    Yields:
        (inputs_BT int32, targets_BT int32, weights_BT float32: 1 where scored), each
        [batch_size, seq_len]; rows past the last window are all padding.
    """
    T, N = seq_len, len(stream) - 1
    starts = list(range(0, N, T))
    if max_batches:
        starts = starts[: max_batches * batch_size]
    for i in range(0, len(starts), batch_size):
        x = np.zeros((batch_size, T), np.int32)
        y = np.zeros((batch_size, T), np.int32)
        w = np.zeros((batch_size, T), np.float32)
        for r, s in enumerate(starts[i : i + batch_size]):
            n = min(T, N - s)  # targets x_{s+1} .. x_{s+n}
            x[r, :n] = stream[s : s + n]
            y[r, :n] = stream[s + 1 : s + n + 1]
            w[r, :n] = 1.0
        yield x, y, w


def score(
    eval_step,
    params,
    rest,
    tokens: np.ndarray,
    *,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    max_batches: int = 0,
    placement=None,
    progress=None,
    stop=None,
) -> tuple[float, int]:
    """(Σ NLL in nats, number of scored tokens) of ``tokens`` (a split, 1-D) preceded by
    ``eos_id``, in the window scheme of the module docstring.  The one scoring path: the
    trainer's validation and ``eval.py`` both call it.

    Args:
        eval_step: ``mlalm.train.step.make_eval_step(cfg, placement)``.
        placement: ``mlalm.sharding.Placement`` of a sharded run (None: one device).
        progress: ``progress(done, total)`` after each batch.
        stop: ``stop() -> bool`` checked between batches; True ends scoring early
            (the figures then cover a prefix, which the caller must say).
    """
    stream = np.empty(len(tokens) + 1, np.int32)
    stream[0] = eos_id
    stream[1:] = tokens
    n_windows = -(-(len(stream) - 1) // seq_len)
    total = -(-n_windows // batch_size)
    if max_batches:
        total = min(total, max_batches)
    nll, scored = 0.0, 0
    for i, (x, y, w) in enumerate(
        window_batches(stream, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    ):
        scored += int(w.sum())
        if placement is not None:
            x, y, w = (placement.global_rows(a) for a in (x, y, w))
        nll += float(to_host(eval_step(params, rest, x, y, w)))
        if progress:
            progress(i + 1, total)
        if stop is not None and stop():
            break
    return nll, scored


def scored_bytes(tokens: np.ndarray, n: int, tokenizer, split_bytes: int) -> int:
    """UTF-8 bytes the first ``n`` tokens of a split spell: the split's byte count when
    all were scored, else counted from the tokens."""
    if n >= len(tokens):
        return split_bytes
    return sum(len(p) for p in spelled_documents(tokens[:n], tokenizer))


def quality(
    model,
    cfg,
    tokenizer,
    tokens,
    n_bytes: int,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int = 0,
    progress=None,
) -> dict:
    """Perplexity, bits per byte and word perplexity of a split (``tokens`` 1-D, the UTF-8
    ``n_bytes`` of its text)."""
    from mlalm.train.state import split_model
    from mlalm.train.step import make_eval_step

    _, params, rest = split_model(model)
    nll, n = score(
        make_eval_step(cfg),
        params,
        rest,
        tokens,
        eos_id=tokenizer.eos_id,
        seq_len=seq_len,
        batch_size=batch_size,
        max_batches=max_batches,
        progress=progress,
    )
    pieces = spelled_documents(tokens[:n], tokenizer)  # the text the scored tokens spell
    spelled = sum(len(p) for p in pieces)
    if n == len(tokens) and spelled != n_bytes:
        raise DataError(
            f"the tokenizer does not reproduce the text byte for byte ({spelled} bytes "
            f"from its tokens, {n_bytes} in the files): bits per byte would be wrong"
        )
    words = lines = 0
    for p in pieces:
        w, l = count_words_lines(p)
        words, lines = words + w, lines + l
    return {
        "tokens": n,
        "split_tokens": int(len(tokens)),
        "whole_split": n == len(tokens),
        "nll_sum": nll,
        "loss": nll / n,
        "perplexity": math.exp(min(nll / n, 700)),
        "bytes": spelled,
        "bits_per_byte": nll / math.log(2) / max(spelled, 1),
        "words": words,
        "lines": lines,
        "word_perplexity": math.exp(min(nll / max(words + lines, 1), 700)),
        "seq_len": seq_len,
        "windows": -(-n // seq_len),
        "window_scheme": WINDOW_SCHEME,
    }


def mtp_quality(
    model, cfg, tokens, *, eos_id: int, seq_len: int, batch_size: int, max_batches: int = 0
) -> list[dict]:
    """Each MTP depth's loss and agreement with the main model (module docstring) over
    the windows of :func:`score`; MoE routing dropless.  One dict per depth:
    {'depth', 'loss', 'agreement', 'positions'}."""
    import jax.numpy as jnp
    import optax

    from mlalm.model import Transformer
    from mlalm.model.mtp import shift_tokens
    from mlalm.train.state import split_model
    from mlalm.train.step import eval_graphdef

    graphdef = eval_graphdef(cfg)
    _, params, rest = split_model(model)

    @jax.jit
    def step(params, rest, x_BT, y_BT, w_BT):
        m = cast(Transformer, nnx.merge(graphdef, params, rest))
        h, mtp_h, _ = m.hidden_mtp(x_BT)
        main_next = jnp.argmax(m.logits(h), axis=-1)  # at i: the main model's t_{i+1}
        sums = []
        for k, hk in enumerate(mtp_h, start=1):
            logits = m.logits(hk)  # at i: depth k's t_{i+k+1}
            w = shift_tokens(w_BT, k)  # target y[i + k] scored (0 past the window)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, shift_tokens(y_BT, k))
            agree = jnp.argmax(logits, axis=-1) == shift_tokens(main_next, k)
            sums.append(jnp.stack([jnp.sum(nll * w), jnp.sum(agree * w), jnp.sum(w)]))
        return jnp.stack(sums)

    stream = np.empty(len(tokens) + 1, np.int32)
    stream[0] = eos_id
    stream[1:] = tokens
    total = np.zeros((cfg.model.mtp_depth, 3))
    for x, y, w in window_batches(stream, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches):
        total += np.asarray(to_host(step(params, rest, x, y, w)), np.float64)
    return [
        {"depth": k + 1, "loss": nll / max(n, 1), "agreement": agree / max(n, 1), "positions": int(n)}
        for k, (nll, agree, n) in enumerate(total)
    ]


# ---------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------


def _step_of(ckpt_dir: str):
    from mlalm.checkpoint import read_meta

    return read_meta(ckpt_dir).get("step")


def evaluate_checkpoint(
    path: str,
    *,
    data: str | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    max_batches: int = 0,
    decode_batch: int = 8,
    decode_context: int | None = None,
    memory_budget: int = 2**30,
    decode: bool = True,
    speculative_tokens: int = 64,
    log=None,
) -> dict:
    """Everything ``eval.py`` reports, as one JSON-ready dict (see the module docstring).

    Args:
        path: a run directory, step directory or params export (``load_for_inference``).
        data: a text file or directory to evaluate instead of the config's split.
        split: 'valid' or 'test' (the config's); with ``data``, only a label (default 'data').
        batch_size: windows per batch (default train.batch_size); max_batches: 0 = all.
        decode_batch, decode_context: where the cache is measured and decode timed
            (context default min(1024, model.max_seq_len)).
        memory_budget: bytes for the longest-context figure (batch 1, cache only).
        speculative_tokens: new tokens per prompt of the speculative decoding timing
            (models with MTP, when ``decode``).
        log: ``log(str)`` for progress (stderr in the command line).
    Raises:
        CheckpointError, DataError, ConfigError: with a one-line message.
    """
    from mlalm.checkpoint import find_checkpoint
    from mlalm.errors import CheckpointError
    from mlalm.inference import load_for_inference

    log = log or (lambda text, transient=False: None)
    for name, v in (
        ("--batch-size", batch_size),
        ("--decode-batch", decode_batch),
        ("--decode-context", decode_context),
    ):
        if v is not None and v < 1:
            raise ConfigError(f"{name}={v}: must be >= 1")
    if max_batches < 0:
        raise ConfigError(f"--max-batches={max_batches}: must be >= 0 (0: the whole split)")
    if speculative_tokens < 1:
        raise ConfigError(f"--speculative-tokens={speculative_tokens}: must be >= 1")
    ckpt_dir = find_checkpoint(path)
    model, cfg, tokenizer = load_for_inference(ckpt_dir)  # dropless MoE routing
    assert cfg.model.vocab_size is not None  # the model was built, so its vocab_size is set
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(
            f"{ckpt_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the "
            f"model's model.vocab_size is {cfg.model.vocab_size}"
        )
    label = split or ("data" if data else "valid")
    tokens, n_bytes, documents, where = eval_split(cfg, tokenizer, split or "valid", data)
    T, B = cfg.train.seq_len, batch_size or cfg.train.batch_size
    t0 = time.perf_counter()

    def progress(done, total):
        log(f"eval {label}: batch {done}/{total} ({time.perf_counter() - t0:.0f}s)", transient=done < total)

    report = {
        "checkpoint": os.path.abspath(ckpt_dir),
        "step": _step_of(ckpt_dir),
        "split": label,
        "data": where,
        "documents": documents,
        "tokenizer": tokenizer.name,
        "batch_size": B,
    }
    report.update(
        quality(
            model,
            cfg,
            tokenizer,
            tokens,
            n_bytes,
            seq_len=T,
            batch_size=B,
            max_batches=max_batches,
            progress=progress,
        )
    )
    report["mtp"] = None
    if cfg.model.mtp_depth:
        log(f"eval {label}: multi-token prediction, {cfg.model.mtp_depth} depth(s) ...")
        report["mtp"] = mtp_quality(
            model, cfg, tokens, eos_id=tokenizer.eos_id, seq_len=T, batch_size=B, max_batches=max_batches
        )
    report["eval_seconds"] = time.perf_counter() - t0
    N = decode_context or min(1024, cfg.model.max_seq_len)
    report["kv_cache"] = kv_cache_report(
        model, cfg, batch=decode_batch, context=N, budget_bytes=memory_budget
    )
    if not report["kv_cache"]["agrees"]:
        log(
            f"warning: the allocated KV cache ({report['kv_cache']['measured_bytes_per_token']:g} "
            f"bytes/token) differs from the formula ({report['kv_cache']['bytes_per_token']} bytes/token)"
        )
    report["decode"] = None
    if decode:
        log(f"decode: batch {decode_batch}, context {N} ...")
        from mlalm.decode_speed import measure_decode

        d = measure_decode(model, batch=decode_batch, context=N)
        report["decode"] = {
            k: d[k] for k in ("tokens_per_s", "ms_per_step", "batch", "context", "new_tokens", "absorbed")
        }
    report["speculative"] = None
    if decode and cfg.model.mtp_depth:
        prompt_len = max(1, min(64, cfg.model.max_seq_len // 4))
        n_new = max(1, min(speculative_tokens, cfg.model.max_seq_len - prompt_len))
        batches = sorted({1, decode_batch})
        log(f"speculative decoding: batch {' and '.join(map(str, batches))}, {n_new} new tokens ...")
        report["speculative"] = speculative_report(
            model, tokens, batches=batches, prompt_len=prompt_len, new_tokens=n_new
        )
    return report
