"""Multi-token prediction (DeepSeek-V3 technical report, arXiv 2412.19437, section 2.2).

D sequential modules; module k (1..D) predicts the token k + 1 positions ahead.  With
h^0_i the main model's last hidden state at position i BEFORE its final norm:

    h'^k_i = W_k [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h^{k-1}_i)]       W_k: 2d -> d
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                    one causal block
    P^k_{i+k+1} = softmax(head(final_norm(h^k_i)))                       predicts t_{i+k+1}

Emb, the final norm and the head are the main model's (shared).  TRM_k is a block of the
main model's kind (its attention, and MoE when the model has MoE layers).  Position i of
depth k sees t_{<=i+k} and nothing later, so the chain stays causal.  The concatenation
order [embedding; hidden] is the one DeepSeek's released MTP weights are read with (see
``mlalm.hf``); the report's equation (21) writes the halves the other way round.

Training (``mtp_losses``): the sequences keep their length T at every depth; depth k's
input at i >= T - k (whose target lies past the window) is a padding token, and those
positions are left out of its loss.  Causality makes them harmless to the others.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlalm.model.layers import RMSNorm, linear, param
from mlalm.model.loss import lm_head_cross_entropy


class MTPModule(nnx.Module):
    """One depth: the two input norms, the projection W_k and its transformer block.

    Args:
        block: the depth's ``mlalm.model.transformer.Block`` (built by the caller, which
            gives it the layer index ``n_layers + k - 1`` that DeepSeek's checkpoints use).
    """

    def __init__(self, d_model: int, block, *, eps: float, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        D = d_model
        self.enorm = RMSNorm(D, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hnorm = RMSNorm(D, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # [embedding half, hidden half] x D_in x D_out; to Muon one [2D, D] matrix, as the
        # single Linear(2d, d) of DeepSeek's checkpoints
        self.eh_proj_2DD = param(
            rngs,
            (2, D, D),
            (None, "embed", "embed"),
            label="hidden",
            fan_in=(0, 1),
            fan_out=(2,),
            std=std,
            dtype=param_dtype,
        )
        self.block = block
        self.dtype = dtype

    def project(self, h_prev_BTD, emb_BTD):
        """h' = W [enorm(emb); hnorm(h_prev)] (one matmul over the stacked halves)."""
        x_BT2D = jnp.stack([self.enorm(emb_BTD), self.hnorm(h_prev_BTD.astype(self.dtype))], axis=2)
        return linear(x_BT2D, self.eh_proj_2DD[...].astype(self.dtype), 2)

    def __call__(self, h_prev_BTD, emb_BTD, cos, sin):
        """Returns (h^k_BTD before the final norm, max attention logit per head, MoE aux or None)."""
        with jax.named_scope("mtp"):
            return self.block(self.project(h_prev_BTD, emb_BTD), cos, sin)

    def forward_cached(self, h_prev_BTD, emb_BTD, cos, sin, cache: dict, positions_BT):
        """The depth over its own KV cache (``Block.forward_cached``): (h^k_BTD, new cache)."""
        return self.block.forward_cached(self.project(h_prev_BTD, emb_BTD), cos, sin, cache, positions_BT)


def shift_tokens(tokens_BT, k: int, pad: int = 0):
    """tokens[:, i + k] at position i, ``pad`` where i + k >= T: depth k's input tokens."""
    B, T = tokens_BT.shape
    if k >= T:
        return jnp.full((B, T), pad, tokens_BT.dtype)
    return jnp.concatenate([tokens_BT[:, k:], jnp.full((B, k), pad, tokens_BT.dtype)], axis=1)


def mtp_cross_entropy(h_BTD, w_DV, labels_BT, k: int, *, chunk_tokens: int = 0):
    """Depth k's mean NLL over its B·(T - k) positions with a target in the window.

    Args:
        h_BTD: depth k's hidden states after the final norm; w_DV: the shared head.
        labels_BT: the main model's labels (t_{i+1} at i); depth k's at i is labels[i + k].
        chunk_tokens: > 0: the fused chunked head + loss (``mlalm.model.loss``); 0: plain logits.

    The fused loss averages over all B·T rows, so the k rows past the window are set to
    h = 0: their logits are exactly 0, their NLL exactly ln V, and they add nothing to the
    head's gradient (0ᵀ·dlogits) nor, through the mask, to h's.  Then
        Σ_valid NLL = B·T·mean_all − B·k·ln V.
    """
    B, T, _ = h_BTD.shape
    V = w_DV.shape[1]
    valid_T = jnp.arange(T) < T - k
    labels = shift_tokens(labels_BT, k)
    n_valid = B * (T - k)
    if not chunk_tokens:
        logits = linear(h_BTD, w_DV, preferred_element_type=jnp.float32)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(jnp.where(valid_T[None], nll_BT, 0.0)) / n_valid
    h = jnp.where(valid_T[None, :, None], h_BTD, jnp.zeros((), h_BTD.dtype))
    mean_all = lm_head_cross_entropy(h, w_DV, labels, chunk_tokens=chunk_tokens)
    return (mean_all * (B * T) - (B * k) * jnp.float32(math.log(V))) / n_valid
