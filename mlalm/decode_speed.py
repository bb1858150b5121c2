"""Decode-speed measurements: plain decoding at a given cached context
(:func:`measure_decode`, for eval.py and the benchmarks) and self-speculative decoding
against plain greedy (:func:`measure_speculative`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mlalm.errors import ConfigError
from mlalm.generate import _split, cache_bytes, generate, init_cache
from mlalm.sampling import sample
from mlalm.utils import round_up


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pattern(shape, dtype, salt):
    """Deterministic stand-in cache contents in [-1, 1] that vary along every axis
    (decode time does not depend on the values; jax.random would cost seconds of
    compilation on CPU)."""
    x = sum(
        jax.lax.broadcasted_iota(jnp.float32, shape, d) * c
        for d, c in zip(range(len(shape)), (0.61, 1.37, 2.03, 0.29, 0.83))
    )
    return jnp.sin(x + salt).astype(dtype)


def measure_decode(model, *, batch: int, context: int, new_tokens: int = 32, absorbed: bool = True) -> dict:
    """Decode throughput with ``context`` tokens already cached in every row.

    The cache arrays are filled with made-up values (the speed does not depend on them)
    and ``lengths`` set to ``context``; after one warm-up step (compilation) ``new_tokens``
    jitted greedy decode steps are timed.  ``context`` may exceed ``model.max_seq_len``
    (RoPE is computed from positions).  The cache holds ``max_len`` = context +
    new_tokens + 1 rounded up to a multiple of 64 slots.

    Returns:
        {'tokens_per_s': batch·new_tokens/seconds, 'ms_per_step', 'seconds', 'batch',
         'context', 'new_tokens', 'max_len', 'absorbed', 'kind', 'impl', 'dtype',
         'cache_bytes' (allocated), 'bytes_per_token' (all layers),
         'bytes_per_token_per_layer'}.
    """
    if batch < 1 or context < 1 or new_tokens < 1:
        raise ConfigError(
            f"measure_decode: batch={batch}, context={context}, new_tokens={new_tokens}: each must be >= 1"
        )
    max_len = round_up(context + new_tokens + 1, 64)
    cache = init_cache(model, batch, max_len, absorbed=absorbed)
    for i, layer in enumerate(cache["layers"]):  # made-up contents, replaced one at a time
        cache["layers"][i] = {
            name: _pattern(x.shape, x.dtype, 7 * i + j) for j, (name, x) in enumerate(sorted(layer.items()))
        }
    cache["lengths"] = jnp.full((batch,), context, jnp.int32)
    key = jax.random.key(0)
    n_bytes = cache_bytes(cache)

    _, decode_fn, state = _split(model)
    greedy = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))

    def step(tok, cache):  # what generate() runs per token: decode, then sample
        logits, cache = decode_fn(state, cache, tok)
        return sample(key, logits, *greedy), cache

    tok, cache = step(jnp.zeros((batch,), jnp.int32), cache)  # compile + warm up
    jax.block_until_ready((tok, cache))
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok, cache = step(tok, cache)
    jax.block_until_ready((tok, cache))
    seconds = time.perf_counter() - t0
    cfg = model.cfg
    return {
        "tokens_per_s": batch * new_tokens / seconds,
        "ms_per_step": 1e3 * seconds / new_tokens,
        "seconds": seconds,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "max_len": max_len,
        "absorbed": bool(absorbed and cfg.attention.kind == "mla"),
        "kind": cfg.attention.kind,
        "impl": cfg.attention.impl,
        "dtype": cfg.model.dtype,
        "cache_bytes": n_bytes,
        "bytes_per_token": n_bytes / (batch * max_len),
        "bytes_per_token_per_layer": n_bytes / (batch * max_len * cfg.model.n_layers),
    }


def measure_speculative(
    model, prompts: Sequence[Sequence[int]], new_tokens: int, *, absorbed: bool = True
) -> dict:
    """Greedy decoding of ``prompts`` (one batch) without and with speculation.

    Each mode runs twice and the second run is timed (the first compiles); its time covers
    the whole :func:`generate` call, prefill included.  ``identical`` says whether the
    two produced the same tokens (they must; see :func:`generate`).

    Returns:
        {'batch', 'prompt_tokens' (the longest prompt), 'new_tokens', 'mtp_depth',
         'plain_tokens_per_s', 'speculative_tokens_per_s', 'speedup', 'acceptance_rate',
         'tokens_per_step', 'identical'}.
    """
    outs, figures = [], []
    for speculative in (False, True):
        generate(model, prompts, new_tokens, absorbed=absorbed, speculative=speculative)
        stats: dict = {}
        outs.append(
            generate(model, prompts, new_tokens, absorbed=absorbed, speculative=speculative, stats=stats)
        )
        figures.append(stats)
    plain, spec = figures
    return {
        "batch": len(prompts),
        "prompt_tokens": max(len(p) for p in prompts),
        "new_tokens": new_tokens,
        "mtp_depth": model.mtp_depth,
        "plain_tokens_per_s": plain["tokens_per_s"],
        "speculative_tokens_per_s": spec["tokens_per_s"],
        "speedup": spec["tokens_per_s"] / plain["tokens_per_s"],
        "acceptance_rate": spec["acceptance_rate"],
        "tokens_per_step": spec["tokens_per_step"],
        "identical": outs[0] == outs[1],
    }
