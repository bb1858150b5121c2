"""eval.py's figures besides quality (``mlalm.evaluate``): the KV-cache footprint, the
speculative-decoding comparison, and the report's outputs (terminal table,
``eval_<split>.json``, TensorBoard scalars)."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from flax import nnx

from mlalm.utils import parse_size


def parse_bytes(text: str, *, key: str = "--memory-budget") -> int:
    """``'8GiB'`` -> 8·2^30, ``'1.5GB'`` -> 1.5·10^9, ``'1000'`` -> 1000 (bytes); ConfigError
    naming ``key`` otherwise (``mlalm.utils.parse_size``)."""
    return parse_size(str(text), key=key)


def max_context(budget_bytes: int, bytes_per_token: int, batch: int = 1) -> int:
    """Longest context whose KV cache (all layers, ``batch`` rows) fits ``budget_bytes``."""
    return int(budget_bytes // (bytes_per_token * batch))


def speculative_report(model, tokens, *, batches, prompt_len: int, new_tokens: int) -> list[dict]:
    """:func:`mlalm.decode_speed.measure_speculative` at each batch size of ``batches``, the
    prompts being ``prompt_len``-token pieces of ``tokens`` spread over the split."""
    from mlalm.decode_speed import measure_speculative

    out = []
    for B in batches:
        stride = max(prompt_len, (len(tokens) - prompt_len) // max(B, 1))
        starts = [(i * stride) % max(len(tokens) - prompt_len, 1) for i in range(B)]
        prompts = [[int(t) for t in tokens[s : s + prompt_len]] for s in starts]
        out.append(measure_speculative(model, prompts, new_tokens))
    return out


def kv_cache_report(
    model, cfg, *, batch: int, context: int, budget_bytes: int, budget_batch: int = 1
) -> dict:
    """Formula and allocated KV-cache sizes, and the longest context a budget holds.

    ``measured_bytes_per_token`` is ``cache_bytes(init_cache(model, batch, context))``
    / (batch·context); ``agrees`` says whether it equals the formula's all-layer figure.
    The budget covers the cache only (parameters and activations not subtracted).
    """
    from mlalm.generate import cache_bytes, init_cache
    from mlalm.model import kv_cache_bytes_per_token_per_layer

    L = cfg.model.n_layers
    per_layer = kv_cache_bytes_per_token_per_layer(cfg)
    naive_per_layer = kv_cache_bytes_per_token_per_layer(cfg, absorbed=False)
    measured = cache_bytes(init_cache(model, batch, context))
    naive = cache_bytes(jax.eval_shape(lambda: init_cache(model, batch, context, absorbed=False)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "kind": cfg.attention.kind,
        "dtype": cfg.model.dtype,
        "n_layers": L,
        "bytes_per_token_per_layer": per_layer,
        "bytes_per_token": per_layer * L,
        "measured_bytes": measured,
        "measured_batch": batch,
        "measured_context": context,
        "measured_bytes_per_token": measured / (batch * context),
        "agrees": measured == per_layer * L * batch * context,
        "naive_bytes_per_token": naive_per_layer * L,
        "naive_measured_bytes_per_token": naive / (batch * context),
        "memory_budget": budget_bytes,
        "budget_batch": budget_batch,
        "max_context_for_budget": max_context(budget_bytes, per_layer * L, budget_batch),
        "budget_counts": "KV cache only (parameters and activations not subtracted)",
        "params": int(n_params),
        "param_bytes": int(param_bytes),
    }


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def write_run_outputs(run_dir: str, report: dict) -> str:
    """``eval_<split>.json`` and TensorBoard scalars ``eval/<split>/...`` at the checkpoint's
    step in ``run_dir``; returns the JSON's path."""
    from tensorboardX import SummaryWriter

    split, step = report["split"], report["step"] or 0
    path = os.path.join(run_dir, f"eval_{split}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    scalars = {k: report[k] for k in ("loss", "perplexity", "bits_per_byte", "word_perplexity")}
    scalars["kv_bytes_per_token"] = report["kv_cache"]["measured_bytes_per_token"]
    if report["decode"]:
        scalars["decode_tokens_per_s"] = report["decode"]["tokens_per_s"]
    for d in report.get("mtp") or []:
        scalars[f"mtp_loss/depth{d['depth']}"] = d["loss"]
        scalars[f"mtp_agreement/depth{d['depth']}"] = d["agreement"]
    for sp in report.get("speculative") or []:
        scalars[f"speculative/batch{sp['batch']}/acceptance_rate"] = sp["acceptance_rate"]
        scalars[f"speculative/batch{sp['batch']}/speedup"] = sp["speedup"]
    with SummaryWriter(run_dir) as tb:
        for k, v in scalars.items():
            tb.add_scalar(f"eval/{split}/{k}", v, step)
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} TiB"


def format_table(r: dict) -> str:
    """The report as a two-column table for the terminal."""
    kv, d = r["kv_cache"], r["decode"]
    kind = "MLA latent (c_kv + k_pe, absorbed)" if kv["kind"] == "mla" else kv["kind"].upper()
    cover = "whole split" if r["whole_split"] else f"first {r['tokens']:,} of {r['split_tokens']:,} tokens"
    rows = [
        ("checkpoint", f"{r['checkpoint']} (step {r['step'] if r['step'] is not None else '?'})"),
        (
            "data",
            f"{r['split']}: {r['data']} ({r['documents']} document{'s' * (r['documents'] != 1)}, "
            f"{r['tokenizer']} tokenizer)",
        ),
        (
            "windows",
            f"{r['windows']:,} of T+1 = {r['seq_len'] + 1} tokens every T = {r['seq_len']} "
            f"after one end-of-text token: each token predicted once, from its window",
        ),
        ("tokens scored", f"{r['tokens']:,} ({cover})"),
        ("loss", f"{r['loss']:.4f} nats/token (NLL sum {r['nll_sum']:,.1f})"),
        ("perplexity", f"{r['perplexity']:.3f} (per token)"),
        ("bits per byte", f"{r['bits_per_byte']:.4f} ({r['bytes']:,} UTF-8 bytes)"),
        (
            "word perplexity",
            f"{r['word_perplexity']:.2f} ({r['words']:,} words + {r['lines']:,} "
            f"end-of-lines; the standard figure for word-level text such as WikiText)",
        ),
        (
            "KV cache",
            f"{kind}, {kv['dtype']}: {kv['bytes_per_token_per_layer']:,} B/token/layer, "
            f"{kv['bytes_per_token']:,} B/token ({kv['n_layers']} layers, formula)",
        ),
        (
            "  allocated",
            f"{_size(kv['measured_bytes'])} at batch {kv['measured_batch']} x context "
            f"{kv['measured_context']:,} = {kv['measured_bytes_per_token']:,.0f} B/token "
            f"({'agrees with the formula' if kv['agrees'] else 'DIFFERS FROM THE FORMULA'})",
        ),
    ]
    if kv["kind"] == "mla":
        rows.append(
            (
                "  naive (expanded)",
                f"{kv['naive_bytes_per_token']:,} B/token without absorption "
                f"({kv['naive_bytes_per_token'] / kv['bytes_per_token']:.1f}x the latent)",
            )
        )
    rows.append(
        (
            f"  fits {_size(kv['memory_budget'])}",
            f"{kv['max_context_for_budget']:,} tokens of context at batch {kv['budget_batch']} "
            f"(KV cache only; parameters ({_size(kv['param_bytes'])}) and activations "
            f"not subtracted)",
        )
    )
    if d:
        rows.append(
            (
                "decode",
                f"{d['tokens_per_s']:,.1f} tokens/s at batch {d['batch']}, context "
                f"{d['context']:,} ({d['ms_per_step']:.2f} ms/step, {d['new_tokens']} steps)",
            )
        )
    for m in r.get("mtp") or []:
        rows.append(
            (
                f"MTP depth {m['depth']}",
                f"loss {m['loss']:.4f} (predicting t+{m['depth'] + 1}), top-1 agreement with the "
                f"main model {100 * m['agreement']:.1f}% ({m['positions']:,} positions)",
            )
        )
    for sp in r.get("speculative") or []:
        rows.append(
            (
                f"speculative, batch {sp['batch']}",
                f"{sp['speculative_tokens_per_s']:,.1f} vs {sp['plain_tokens_per_s']:,.1f} tokens/s "
                f"plain ({sp['speedup']:.2f}x), {100 * sp['acceptance_rate']:.1f}% of drafts accepted, "
                f"{sp['tokens_per_step']:.2f} tokens per pass; greedy, {sp['prompt_tokens']}-token "
                f"prompts + {sp['new_tokens']} tokens, "
                f"{'output identical' if sp['identical'] else 'OUTPUT DIFFERS FROM PLAIN DECODING'}",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def stderr_progress():
    """``log(text, transient=False)`` on stderr; transient lines (progress) rewrite one
    line on a terminal and are printed at most every 10 s otherwise."""
    tty, last = sys.stderr.isatty(), [-1e9]

    def log(text, transient=False):
        now = time.perf_counter()
        if tty:
            sys.stderr.write("\r" + text.ljust(79) + ("" if transient else "\n"))
        elif not transient or now - last[0] >= 10:
            sys.stderr.write(text + "\n")
            last[0] = now
        sys.stderr.flush()

    return log
