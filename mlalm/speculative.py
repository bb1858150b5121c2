"""Self-speculative decoding with the multi-token prediction modules
(``generate(..., speculative=True)``; "Multi-token prediction" in docs/architecture.md).

The D MTP modules draft the next D tokens from the hidden state the main model last
produced; the main model verifies them in one forward pass over its cache; the longest
agreeing prefix is kept, plus the main model's own next token (:func:`spec_programs`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.generate import _append, init_cache
from mlalm.sampling import filter_logits, sample
from mlalm.utils import round_up


def spec_cache(model, batch_size: int, max_len: int, *, absorbed: bool) -> dict:
    """:func:`mlalm.generate.init_cache` plus one cache per MTP depth (``'mtp'``, same layouts)."""
    cache = init_cache(model, batch_size, max_len, absorbed=absorbed)
    cache["mtp"] = model.init_cache_mtp(batch_size, max_len, model.dtype, absorbed=absorbed)
    return cache


@functools.lru_cache(maxsize=16)
def spec_programs(graphdef, greedy: bool):
    """``(prefill, round)``: the jitted steps of self-speculative decoding with the D MTP
    modules of the models of ``graphdef`` (built once, as ``mlalm.generate._programs``).

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


def speculative_loop(model, tokens_BT, lengths, max_new_tokens, knobs, key, absorbed, eos_id, on_token, out):
    """:func:`mlalm.generate.generate`'s loop with speculative=True: the rounds of :func:`spec_programs`,
    each giving a live row its a + 1 new tokens (cut at eos_id and max_new_tokens)."""
    B, T = tokens_BT.shape
    D = model.mtp_depth
    # a live row has c <= T + max_new_tokens - 2 and verifies up to slot c + D
    cache = spec_cache(model, B, round_up(T + max_new_tokens + D, 64), absorbed=absorbed)
    graphdef, state = nnx.split(model)
    prefill_fn, round_fn = spec_programs(graphdef, bool(knobs[0] == 0))
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
