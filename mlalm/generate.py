"""Text generation with a KV cache: prefill, one-token decode steps, sampling, speed.

The cache is a pytree ``{'layers': [dict per layer], 'lengths': int32 [B]}``.  Row b's
token at position s lives in slot s of every layer array; ``lengths[b]`` counts the valid
slots.  Layouts per layer (``init_cache``):

    MHA/GQA/MQA      k, v      [B, S, K, H]          rotated keys, values per kv head
    MLA (absorbed)   c_kv      [B, S, R]             normalised latent
                     k_pe      [B, S, P]             rotated rope key shared by all heads
    MLA (naive)      k         [B, S, N, d_n + d_r]  expanded keys (what transformers caches)
                     v         [B, S, N, d_v]

Prompts of different lengths are right-padded into one [B, T] batch and prefilled at their
true positions 0..len_b-1; the padding is written to slots >= len_b, which the mask hides
and the decode steps overwrite before any query may see them.  Each decode step writes
row b's token to slot lengths[b] and attends slots <= lengths[b].

Every step is a ``jax.jit`` of a pure function of (state, cache, ...), built once per
model graphdef (``_programs``): one compilation per shape, shared by every call and by
every model of the same structure, the cache donated so the update is in place.

Self-speculative decoding (``generate(..., speculative=True)``, models with MTP modules):
each round the D MTP modules draft the next D tokens from the hidden state the main model
last produced, and the main model verifies them in one forward pass over its cache (see
"Multi-token prediction" in docs/architecture.md and ``mlalm.speculative``).  Sampling
is ``mlalm.sampling``; decode-speed measurements ``mlalm.decode_speed``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.errors import ConfigError, DataError
from mlalm.sampling import check_sampling, sample
from mlalm.utils import round_up

# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------


def init_cache(model, batch_size: int, max_len: int, *, absorbed: bool = True, dtype=None) -> dict:
    """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens.

    Args:
        model: a :class:`mlalm.model.Transformer`.
        absorbed: MLA only: cache the latent (c_kv, k_pe) and decode with weight
            absorption; False caches the expanded per-head keys and values.
        dtype: cache dtype, default the model's compute dtype.
    Returns:
        {'layers': [per-layer dict of zeros], 'lengths': zeros int32 [B]}.
    """
    if batch_size < 1 or max_len < 1:
        raise ConfigError(f"cache of batch_size={batch_size}, max_len={max_len}: both must be >= 1")
    dtype = model.dtype if dtype is None else dtype
    return {
        "layers": model.init_cache_layers(batch_size, max_len, dtype, absorbed=absorbed),
        "lengths": jnp.zeros((batch_size,), jnp.int32),
    }


def cache_bytes(cache: dict) -> int:
    """Bytes of the per-token arrays (keys, values, latents) of all layers; not lengths."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"])))


# ---------------------------------------------------------------------------------------
# Jitted steps
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _programs(graphdef):
    """``(prefill, decode)``: the jitted steps of every model whose graphdef (its
    structure and static attributes, hashable) equals ``graphdef``; built on first use,
    then one compilation per argument shape, reused by every later call and by every
    model of the same structure.

    Each is a pure function ``f(state, cache, ...)`` of the split model, the cache
    donated so the update is in place.  The graphdef is closed over rather than passed
    as a static argument: jax.jit would hash it on every call, i.e. every decode step
    (measured 0.15 ms for a 2-layer model on CPU).
    """

    @functools.partial(jax.jit, donate_argnums=1)
    def prefill(state, cache, tokens_BT, n_new_B):
        model = nnx.merge(graphdef, state)
        lengths = cache["lengths"]
        T = tokens_BT.shape[1]
        positions_BT = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        h_BTD, layers = model.forward_cached(tokens_BT, positions_BT, cache["layers"])
        h_BD = h_BTD[jnp.arange(h_BTD.shape[0]), n_new_B - 1]  # each row's last real token
        logits_BV = model.logits(h_BD[:, None])[:, 0]
        return logits_BV, {"layers": layers, "lengths": lengths + n_new_B}

    @functools.partial(jax.jit, donate_argnums=1)
    def decode(state, cache, tokens_B):
        model = nnx.merge(graphdef, state)
        lengths = cache["lengths"]
        h_B1D, layers = model.forward_cached(tokens_B[:, None], lengths[:, None], cache["layers"])
        return model.logits(h_B1D)[:, 0], {"layers": layers, "lengths": lengths + 1}

    return prefill, decode


def _split(model):
    """(prefill, decode, state) for ``model``."""
    graphdef, state = nnx.split(model)
    return *_programs(graphdef), state


def prefill(model, cache: dict, tokens_BT, lengths_B):
    """Append right-padded prompts to the cache (jitted; compiles once per shape).

    Args:
        cache: from :func:`init_cache` (donated: use the returned cache afterwards).
        tokens_BT: int32 prompts, row b's real tokens in [:lengths_B[b]], then padding.
        lengths_B: int32 prompt lengths, each >= 1.
    Returns:
        (logits_BV float32 at each row's last prompt token, the updated cache).
    """
    run, _, state = _split(model)
    return run(state, cache, jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(lengths_B, jnp.int32))


def decode_step(model, cache: dict, tokens_B):
    """Append one token per row at slot ``cache['lengths'][b]`` (jitted).

    The cache must have room (lengths < max_len): writes past the end are dropped.
    Returns:
        (logits_BV float32 for the next token, the updated cache; the input is donated).
    """
    _, run, state = _split(model)
    return run(state, cache, jnp.asarray(tokens_B, jnp.int32))


def check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    """ConfigError unless a prompt of ``prompt_len`` tokens and ``max_new_tokens`` new ones
    fit in the model's context, ``model.cfg.model.max_seq_len`` positions."""
    limit = model.cfg.model.max_seq_len
    if prompt_len + max_new_tokens > limit:
        room = f"use max_new_tokens <= {limit - prompt_len}" if prompt_len < limit else "shorten the prompt"
        raise ConfigError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the model's max_seq_len={limit}: "
            f"{room}"
        )


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    absorbed: bool = True,
    eos_id: int | None = None,
    on_token: Callable[[int, np.ndarray], None] | None = None,
    speculative: bool = False,
    stats: dict | None = None,
) -> list[list[int]]:
    """Token ids in, token ids out: sample up to ``max_new_tokens`` ids after each prompt,
    all prompts in one batch.  For text use :func:`generate_text`, which encodes,
    calls this and decodes.

    Every prompt must fit with its new tokens in the model's context:
    ``len(prompt) + max_new_tokens <= model.cfg.model.max_seq_len`` (positions past it
    were never trained, and the model would produce garbage there), else ConfigError.

    Args:
        prompts: token ids per prompt (lengths may differ, each >= 1).
        max_new_tokens: the most ids to sample per prompt (fewer if a row emits eos_id).
        temperature: 0 is greedy; top_k (0: off) and top_p (1: off) filter before sampling.
        seed: of the jax PRNG key (step i draws with fold_in(key, i)).
        absorbed: MLA only: latent cache with weight absorption, or the expanded cache.
        eos_id: a row stops after emitting it (the eos token is included in its output).
            None (the default) never stops early; generate_text passes the tokenizer's.
        on_token: called as ``on_token(step, tokens_B)`` with int numpy tokens after each
            step, -1 for rows that had already stopped (for streaming).  Speculative
            rounds give each row a different number of tokens: it is called once per
            token of the row that got the most, -1 for rows that got fewer.
        speculative: self-speculative decoding with the model's MTP modules (ConfigError
            without them): drafts verified by the main model, several tokens per forward
            pass.  Greedy output is the same as without; sampled output has the same
            distribution (not the same draws).  See ``mlalm.speculative``.
        stats: a dict to fill with figures of the call: ``new_tokens``, ``seconds``
            (the whole call, compilation included), ``tokens_per_s``, ``steps`` (main-model
            decode passes after the prefill); speculative: ``drafted`` and ``accepted``
            drafts of active rows (``accepted_by_row``), ``acceptance_rate`` = accepted / drafted,
            ``tokens_per_step`` (mean new tokens of a row per verification pass).
    Returns:
        the new token ids of each prompt (lists of int, eos_id included when emitted).
    """
    t0 = time.perf_counter()
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    V = model.cfg.model.vocab_size
    if speculative and not model.mtp_depth:
        raise ConfigError(
            "speculative decoding drafts with the model's multi-token prediction modules, and "
            "this model has none (model.mtp_depth=0); train with model.mtp_depth >= 1 or decode "
            "without speculative"
        )
    if not prompts:
        raise DataError("generate: no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DataError(f"prompt {i} is empty: give at least one token")
        if min(p) < 0 or max(p) >= V:
            raise DataError(f"prompt {i} has token ids outside [0, {V}) (the model's vocab_size)")
    check_length(model, max(len(p) for p in prompts), max_new_tokens)
    B, lengths = len(prompts), [len(p) for p in prompts]
    T = round_up(max(lengths), 8)  # shape buckets: fewer recompilations across calls
    tokens_BT = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, : len(p)] = p
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    if speculative:
        from mlalm.speculative import speculative_loop as run
    else:
        run = _plain_loop
    figures = run(model, tokens_BT, lengths, max_new_tokens, knobs, key, absorbed, eos_id, on_token, out)
    if stats is not None:
        seconds = time.perf_counter() - t0
        n = sum(len(o) for o in out)
        stats.update(figures, new_tokens=n, seconds=seconds, tokens_per_s=n / max(seconds, 1e-9))
    return out


def _append(out, done, tok_B, eos_id, max_new_tokens) -> None:
    """Append row b's token where tok_B[b] >= 0 (in place), marking the row done when it
    is eos_id or the row has max_new_tokens."""
    for b in np.flatnonzero(tok_B >= 0):
        out[b].append(int(tok_B[b]))
        done[b] = (eos_id is not None and tok_B[b] == eos_id) or len(out[b]) >= max_new_tokens


def _plain_loop(model, tokens_BT, lengths, max_new_tokens, knobs, key, absorbed, eos_id, on_token, out):
    """:func:`generate`'s loop: one decode step per token."""
    B, T = tokens_BT.shape
    cache = init_cache(model, B, round_up(T + max_new_tokens, 64), absorbed=absorbed)
    prefill_fn, decode_fn, state = _split(model)
    logits, cache = prefill_fn(state, cache, jnp.asarray(tokens_BT), jnp.asarray(lengths, jnp.int32))
    tok = sample(jax.random.fold_in(key, 0), logits, *knobs)
    done = np.zeros(B, bool)
    steps = 0
    for step in range(max_new_tokens):
        if step:
            logits, cache = decode_fn(state, cache, tok)
            tok = sample(jax.random.fold_in(key, step), logits, *knobs)
            steps += 1
        tok_B = np.asarray(tok).astype(np.int64)
        tok_B[done] = -1
        _append(out, done, tok_B, eos_id, max_new_tokens)
        if on_token is not None:
            on_token(step, tok_B)
        if done.all():
            break
    return {"speculative": False, "steps": steps}


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stream: Callable[[str], None] | None = None,
    **kw,
) -> list[str]:
    """Strings in, strings out: encode each prompt with ``tokenizer``, :func:`generate`
    (which works on token ids), and decode the new ids; stops a row at ``tokenizer.eos_id``.

    The length limit of :func:`generate` applies to the encoded prompts (ConfigError
    when ``len(encode(prompt)) + max_new_tokens > model.cfg.model.max_seq_len``).

    Args:
        tokenizer: ``encode(str) -> ids``, ``decode(ids) -> str`` and ``eos_id``
            (mlalm.data.tokenizers).
        prompts: the prompt texts.
        stream: called with each new piece of the FIRST prompt's completion as its tokens
            arrive; a piece is held back while it ends inside a multi-byte character.
        kw: passed to :func:`generate` (temperature, top_k, top_p, seed, absorbed).
    Returns:
        the decoded completion of each prompt (the prompt not included, eos removed).
    """
    ids = [[int(t) for t in tokenizer.encode(p)] for p in prompts]
    eos = getattr(tokenizer, "eos_id", None)
    first: list[int] = []
    shown = [0]

    def on_token(step, tokens_B):
        assert stream is not None  # on_token is passed to generate only with a stream
        t = int(tokens_B[0])
        if t < 0 or t == eos:
            return
        first.append(t)
        text = tokenizer.decode(first)
        if not text.endswith("\ufffd") and len(text) > shown[0]:  # not mid-character
            stream(text[shown[0] :])
            shown[0] = len(text)

    new = generate(
        model, ids, max_new_tokens, eos_id=eos, on_token=on_token if stream is not None else None, **kw
    )
    if stream is not None:  # flush what was held back (an incomplete last character)
        text = tokenizer.decode(first)
        if len(text) > shown[0]:
            stream(text[shown[0] :])
    return [tokenizer.decode([t for t in n if t != eos]) for n in new]
