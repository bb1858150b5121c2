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
"Multi-token prediction" in docs/architecture.md and :func:`_spec_programs`).
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


def _spec_cache(model, batch_size: int, max_len: int, *, absorbed: bool) -> dict:
    """:func:`init_cache` plus one cache per MTP depth (``'mtp'``, same layouts)."""
    cache = init_cache(model, batch_size, max_len, absorbed=absorbed)
    cache["mtp"] = model.init_cache_mtp(batch_size, max_len, model.dtype, absorbed=absorbed)
    return cache


@functools.lru_cache(maxsize=16)
def _spec_programs(graphdef, greedy: bool):
    """``(prefill, round)``: the jitted steps of self-speculative decoding with the D MTP
    modules of the models of ``graphdef`` (built once, as :func:`_programs`).

    State between rounds, per row b with c = ``cache['lengths'][b]`` (t_c is the newest
    token, sampled but not yet in the main cache):
      * main cache: slots < c;  hbuf [B, W, D]: h^0 (before the final norm) at positions
        c - W .. c - 1;  tbuf [B, W]: the tokens at positions c - W + 1 .. c;  W = 2D.
      * MTP depth k's cache: slot p holds h'^k_p = W_k[enorm(Emb(t_{p+k})); hnorm(h^{k-1}_p)],
        which is final once t_{p+k} is known.

    A round (``round``):
      1. draft: each depth k recomputes its slots c - W .. c - 1 (those written while
         t_{p+k} was still a draft are among them: c advanced by at most D + 1 since the
         last round, so p + k > c_prev gives p >= c - 2D), then its output at c - 1
         gives the draft d_k of t_{c+k} (argmax, or a draw from q_k);
      2. verify: the main model runs [t_c, d_1 .. d_D] at positions c .. c + D in one pass;
         its logits at c + j give p_j, the distribution of t_{c+j+1};
      3. accept: greedy keeps the longest prefix with d_{j+1} = argmax p_j and appends
         argmax p_a (a = drafts kept); sampling keeps d_{j+1} with probability
         min(1, p_j(d)/q_j(d)) and at the first rejection draws from
         norm(max(p_a - q_a, 0)), or from p_D when all D were kept (Leviathan et al. 2023,
         Chen et al. 2023): every emitted token is distributed as the main model's;
      4. c += a + 1 for active rows; the main cache's slots past c are simply overwritten
         by the next round (rolling back = not advancing the length).
    Positions before 0 (a window reaching past the start) go to slot S = max_len, which
    cache writes drop.
    """
    from mlalm.model.mtp import shift_tokens

    def head(model, x_BTD):
        return model.logits(model.final_norm(x_BTD))

    def sample_from(key, logits, knobs):
        """(token, its distribution [.., V] or None when greedy)."""
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
        temperature, top_k, top_p = knobs
        z = filter_logits(logits / temperature, top_k, top_p)
        return jax.random.categorical(key, z, axis=-1).astype(jnp.int32), jax.nn.softmax(z, axis=-1)

    @functools.partial(jax.jit, donate_argnums=1)
    def prefill(state, cache, tokens_BT, n_new_B, key, knobs):
        model = nnx.merge(graphdef, state)
        W = 2 * model.mtp_depth
        B, T = tokens_BT.shape
        rows = jnp.arange(B)
        positions_BT = cache["lengths"][:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        x_BTD, layers = model.forward_cached(tokens_BT, positions_BT, cache["layers"], pre_norm=True)
        logits_BV = head(model, x_BTD[rows, n_new_B - 1][:, None])[:, 0]
        first = sample(key, logits_BV, *knobs)  # what plain generate() draws first
        # the prompt with the first new token after it: the MTP depths read t_{p+k}
        ext = jnp.concatenate([tokens_BT, jnp.zeros((B, 1), jnp.int32)], axis=1).at[rows, n_new_B].set(first)
        h, mtp = x_BTD, []
        for k in range(1, model.mtp_depth + 1):  # slots with t_{p+k} unknown: redone by round 1
            h, c = model.mtp_cached(k, h, shift_tokens(ext, k)[:, :T], positions_BT, cache["mtp"][k - 1])
            mtp.append(c)
        idx = n_new_B[:, None] - W + jnp.arange(W)[None, :]  # h^0 at c - W .. c - 1
        hbuf = jnp.take_along_axis(x_BTD, jnp.clip(idx, 0, T - 1)[..., None], axis=1)
        tbuf = jnp.take_along_axis(ext, jnp.clip(idx + 1, 0, T), axis=1)
        new_cache = {"layers": layers, "mtp": mtp, "lengths": cache["lengths"] + n_new_B}
        return first, new_cache, hbuf, tbuf

    @functools.partial(jax.jit, donate_argnums=1)
    def round_(state, cache, hbuf, tbuf, last_B, active_B, key, knobs):
        model = nnx.merge(graphdef, state)
        D = model.mtp_depth
        W = 2 * D
        B = last_B.shape[0]
        S = cache["layers"][0][next(iter(cache["layers"][0]))].shape[1]
        c = cache["lengths"]
        keys = jax.random.split(key, D + 2)
        # 1. draft
        pos = c[:, None] - W + jnp.arange(W, dtype=jnp.int32)[None, :]
        pos = jnp.where(pos >= 0, pos, S)
        h, ext, mtp, qs = hbuf, tbuf, [], []
        for k in range(1, D + 1):
            h, mc = model.mtp_cached(k, h, ext[:, k - 1 : k - 1 + W], pos, cache["mtp"][k - 1])
            mtp.append(mc)
            d, q = sample_from(keys[k - 1], head(model, h[:, -1:])[:, 0], knobs)
            ext = jnp.concatenate([ext, d[:, None]], axis=1)
            qs.append(q)
        drafts_BD = ext[:, W:]
        # 2. verify
        v_tokens = jnp.concatenate([last_B[:, None], drafts_BD], axis=1)
        v_pos = c[:, None] + jnp.arange(D + 1, dtype=jnp.int32)[None, :]
        xv, layers = model.forward_cached(v_tokens, v_pos, cache["layers"], pre_norm=True)
        logits_BJV = head(model, xv)  # J = D + 1
        # 3. accept
        j = jnp.arange(D + 1)[None, :]
        if greedy:
            y = jnp.argmax(logits_BJV, axis=-1).astype(jnp.int32)
            a = jnp.sum(jnp.cumprod(drafts_BD == y[:, :D], axis=1), axis=1)
            new = y  # y_j = d_{j+1} for j < a, then the main model's own token
        else:
            temperature, top_k, top_p = knobs
            p = jax.nn.softmax(filter_logits(logits_BJV / temperature, top_k, top_p), axis=-1)
            q = jnp.stack(qs, axis=1)  # [B, D, V]
            pick = lambda dist: jnp.take_along_axis(dist, drafts_BD[..., None], axis=-1)[..., 0]  # noqa: E731
            u = jax.random.uniform(keys[D], (B, D))
            keep = u * pick(q) < pick(p[:, :D])  # probability min(1, p/q)
            a = jnp.sum(jnp.cumprod(keep, axis=1), axis=1)
            # at the first rejection: norm(max(p_a - q_a, 0)); after D kept: p_D (q_D := 0)
            q_a = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[jnp.arange(B), a]
            p_a = p[jnp.arange(B), a]
            r = jnp.maximum(p_a - q_a, 0.0)
            r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p_a)
            bonus = jax.random.categorical(keys[D + 1], jnp.log(r), axis=-1).astype(jnp.int32)
            d_pad = jnp.concatenate([drafts_BD, jnp.zeros((B, 1), jnp.int32)], axis=1)
            new = jnp.where(j < a[:, None], d_pad, bonus[:, None])
        # 4. advance the active rows by a + 1
        adv = jnp.where(active_B, a + 1, 0)
        take = adv[:, None] + jnp.arange(W)[None, :]
        hbuf = jnp.take_along_axis(jnp.concatenate([hbuf, xv], axis=1), take[..., None], axis=1)
        tbuf = jnp.take_along_axis(jnp.concatenate([tbuf, new], axis=1), take, axis=1)
        last_B = jnp.where(active_B, new[jnp.arange(B), a], last_B)
        new_cache = {"layers": layers, "mtp": mtp, "lengths": c + adv}
        return new, a, new_cache, hbuf, tbuf, last_B

    return prefill, round_


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


# ---------------------------------------------------------------------------------------
# Sampling (float32 throughout)
# ---------------------------------------------------------------------------------------


def filter_logits(logits_V, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top-k and outside the nucleus.

    top-k keeps the k largest (top_k <= 0: all).  The nucleus (top-p, Holtzman et al.
    2019) is the smallest set of most probable tokens whose probability reaches top_p:
    in descending order token i is kept iff Σ_{j<i} p_j < top_p, with p the softmax
    over the tokens top-k kept (as transformers applies them: top-k, then top-p).  The
    most probable token is always kept; tokens tied with the last kept one are kept too.

    Args:
        logits_V: [..., V] (already divided by the temperature).
        top_k, top_p: python numbers or scalar arrays (traceable).
    Returns:
        float32 logits of the same shape, -inf outside the kept set.
    """
    x = jnp.asarray(logits_V, jnp.float32)
    V = x.shape[-1]
    x_sorted = -jnp.sort(-x, axis=-1)  # descending
    rank = jnp.arange(V)
    keep_sorted = rank < jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    p_sorted = jax.nn.softmax(jnp.where(keep_sorted, x_sorted, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    # both conditions keep a prefix of the sorted order: keep down to its last logit
    n_keep = jnp.maximum(jnp.sum(keep_sorted & (mass_before < top_p), axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(x_sorted, n_keep - 1, axis=-1)
    return jnp.where(x >= threshold, x, -jnp.inf)


@jax.jit
def sample(key, logits_BV, temperature, top_k, top_p):
    """Next tokens int32 [B]: argmax when temperature == 0, else a draw from
    softmax(filter_logits(logits / temperature, top_k, top_p)).

    A ``lax.cond``, so that greedy decoding skips the filter's sort over the vocabulary
    (measured on a 2-core CPU at V = 8192: 4.4 ms per call at batch 1 and 16.5 ms at
    batch 8 when both were computed, more than the model's decode step).
    """
    logits = logits_BV.astype(jnp.float32)

    def draw(logits):
        t = jnp.where(temperature > 0, temperature, 1.0)
        return jax.random.categorical(key, filter_logits(logits / t, top_k, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    """Raise ConfigError naming the first sampling argument that cannot work."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k}: must be >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: must be in (0, 1] (1 disables it)")


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
            distribution (not the same draws).  See :func:`_spec_programs`.
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
    run = _speculative_loop if speculative else _plain_loop
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


def _speculative_loop(model, tokens_BT, lengths, max_new_tokens, knobs, key, absorbed, eos_id, on_token, out):
    """:func:`generate`'s loop with speculative=True: the rounds of :func:`_spec_programs`,
    each giving a live row its a + 1 new tokens (cut at eos_id and max_new_tokens)."""
    B, T = tokens_BT.shape
    D = model.mtp_depth
    # a live row has c <= T + max_new_tokens - 2 and verifies up to slot c + D
    cache = _spec_cache(model, B, round_up(T + max_new_tokens + D, 64), absorbed=absorbed)
    graphdef, state = nnx.split(model)
    prefill_fn, round_fn = _spec_programs(graphdef, bool(knobs[0] == 0))
    first, cache, hbuf, tbuf = prefill_fn(
        state,
        cache,
        jnp.asarray(tokens_BT),
        jnp.asarray(lengths, jnp.int32),
        jax.random.fold_in(key, 0),  # the key plain decoding draws its first token with
        knobs,
    )
    done = np.zeros(B, bool)
    tok_B = np.asarray(first).astype(np.int64)
    _append(out, done, tok_B, eos_id, max_new_tokens)
    step = 0
    if on_token is not None:
        on_token(step, tok_B)
    last, rounds, row_rounds = first, 0, 0
    accepted_B = np.zeros(B, np.int64)
    while not done.all():
        active = ~done
        rounds += 1
        new, a, cache, hbuf, tbuf, last = round_fn(
            state, cache, hbuf, tbuf, last, jnp.asarray(active), jax.random.fold_in(key, rounds), knobs
        )
        new_BJ, a_B = (np.asarray(x).astype(np.int64) for x in jax.device_get((new, a)))
        row_rounds += int(active.sum())
        accepted_B += np.where(active, a_B, 0)
        for j in range(D + 1):
            tok_B = np.where(~done & (j <= a_B), new_BJ[:, j], -1)
            if (tok_B < 0).all():
                break
            _append(out, done, tok_B, eos_id, max_new_tokens)
            if on_token is not None:
                step += 1
                on_token(step, tok_B)
    accepted = int(accepted_B.sum())
    return {
        "speculative": True,
        "steps": rounds,
        "drafted": D * row_rounds,
        "accepted": accepted,
        "accepted_by_row": accepted_B.tolist(),
        "acceptance_rate": accepted / max(D * row_rounds, 1),
        "tokens_per_step": 1 + accepted / max(row_rounds, 1),
    }


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


# ---------------------------------------------------------------------------------------
# Decode speed
# ---------------------------------------------------------------------------------------


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
