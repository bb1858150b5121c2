"""Sampling from logits (float32 throughout): top-k / top-p filtering, the jitted draw,
and the checks of the sampling arguments; used by ``mlalm.generate`` and
``mlalm.speculative``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlalm.errors import ConfigError


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
