"""Pre-norm decoder blocks and the language model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mlalm.config import Config, ConfigError
from mlalm.model.attention import make_attention
from mlalm.model.layers import DTYPES, RMSNorm, SwiGLU, linear, param, rope_tables
from mlalm.model.moe import MoE, balance_bias_update
from mlalm.model.mtp import MTPModule, shift_tokens


class Block(nnx.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense SwiGLU or MoE."""

    def __init__(self, cfg: Config, layer: int, *, rngs: nnx.Rngs):
        m, e = cfg.model, cfg.moe
        dt, pd = DTYPES[m.dtype], DTYPES[m.param_dtype]
        out_std = m.init_std / math.sqrt(2 * m.n_layers)
        self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.attn = make_attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoE(
                d_model=m.d_model,
                n_routed_experts=e.n_routed_experts,
                n_shared_experts=e.n_shared_experts,
                expert_ffn_dim=e.expert_ffn_dim,
                top_k=e.top_k,
                scoring=e.scoring,
                n_group=e.n_group,
                topk_group=e.topk_group,
                norm_topk_prob=e.norm_topk_prob,
                routed_scaling_factor=e.routed_scaling_factor,
                dispatch=e.dispatch,
                capacity_factor=e.capacity_factor,
                std=m.init_std,
                out_std=out_std,
                dtype=dt,
                param_dtype=pd,
                rngs=rngs,
            )
        else:
            self.ffn = SwiGLU(
                m.d_model, m.ffn_dim, std=m.init_std, out_std=out_std, dtype=dt, param_dtype=pd, rngs=rngs
            )

    def __call__(self, x_BTD, cos, sin):
        """Returns (x_BTD, max attention logit per head [N], MoE aux or None)."""
        with jax.named_scope("attention"):  # scopes name the ops in profiles (mlalm/profiling.py)
            y, max_logit = self.attn(self.attn_norm(x_BTD), cos, sin)
        x_BTD = x_BTD + y
        h = self.ffn_norm(x_BTD)
        if self.is_moe:
            with jax.named_scope("moe"):
                y, aux = self.ffn(h)
            return x_BTD + y, max_logit, aux
        with jax.named_scope("ffn"):
            return x_BTD + self.ffn(h), max_logit, None

    def forward_cached(self, x_BTD, cos, sin, cache: dict, positions_BT):
        """The block over a KV cache (see ``forward_cached`` of the attention modules).

        MoE layers route dropless here whatever ``moe.dispatch`` says: in generation a
        token's output must not depend on which other tokens (or padding) share its batch,
        which capacity dispatch cannot promise.  Returns (x_BTD, new cache).
        """
        y, cache = self.attn.forward_cached(self.attn_norm(x_BTD), cos, sin, cache, positions_BT)
        x_BTD = x_BTD + y
        h = self.ffn_norm(x_BTD)
        if not self.is_moe:
            return x_BTD + self.ffn(h), cache
        assert isinstance(self.ffn, MoE)  # is_moe: built as MoE in __init__
        y, _ = self.ffn(h, dispatch="dropless")
        return x_BTD + y, cache


class Transformer(nnx.Module):
    """The language model: embedding, blocks, final RMSNorm, float32 logits.

    ``Transformer(cfg, rngs=nnx.Rngs(0))(tokens_BT)`` returns logits [B, T, V] (float32).
    With ``return_aux=True`` it returns ``(logits, aux)`` where aux holds the MoE layers'
    per-expert token counts ``expert_load`` [L_moe, E] and the summed sequence-wise
    ``balance_loss`` (zeros when the model has no MoE layer), and each layer's largest
    attention logit per head ``attn_max_logit`` [L, N].

    With ``model.mtp_depth`` = D > 0 the model also holds D multi-token prediction
    modules (``mlalm.model.mtp``), run by :meth:`hidden_mtp` (training) and
    :meth:`mtp_cached` (speculative decoding); the plain forward pass never runs them.
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        if m.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (the trainer takes it from the tokenizer)")
        self.cfg = cfg
        dt, pd = DTYPES[m.dtype], DTYPES[m.param_dtype]
        # a row lookup = a one-hot [V] input times [V, D]
        self.embed_VD = param(
            rngs,
            (m.vocab_size, m.d_model),
            ("vocab", "embed"),
            label="embedding",
            fan_in=(0,),
            fan_out=(1,),
            std=m.init_std,
            dtype=pd,
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(m.n_layers)])
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        if not m.tie_embeddings:
            self.head_DV = param(
                rngs,
                (m.d_model, m.vocab_size),
                ("embed", "vocab"),
                label="head",
                fan_in=(0,),
                fan_out=(1,),
                std=m.init_std,
                dtype=pd,
            )
        self.dtype = dt
        a = cfg.attention
        self.rope_dim = a.qk_rope_head_dim if a.kind == "mla" else a.head_dim
        # built last, so that a model's main weights are the same with and without MTP
        # for a given seed
        self.mtp_depth = m.mtp_depth
        if m.mtp_depth:
            self.mtp = nnx.List(
                [
                    MTPModule(
                        m.d_model,
                        Block(cfg, m.n_layers + k, rngs=rngs),
                        eps=m.norm_eps,
                        std=m.init_std,
                        dtype=dt,
                        param_dtype=pd,
                        rngs=rngs,
                    )
                    for k in range(m.mtp_depth)
                ]
            )

    def __call__(self, tokens_BT, *, positions_BT=None, return_aux: bool = False):
        h, aux = self.hidden(tokens_BT, positions_BT=positions_BT)
        logits = self.logits(h)
        return (logits, aux) if return_aux else logits

    def hidden(self, tokens_BT, *, positions_BT=None):
        """(h_BTD after the final norm, aux) -- what :meth:`logits` or the fused loss
        (``mlalm.model.loss``) turn into logits.  The MTP modules are not run."""
        x, aux, _ = self._trunk(tokens_BT, positions_BT, self.blocks)
        return self.final_norm(x), aux

    def hidden_mtp(self, tokens_BT, *, positions_BT=None):
        """The main model and the MTP modules (``mlalm.model.mtp``).

        Returns:
            (h_BTD after the final norm, [h^k_BTD after the final norm for k = 1..D], aux)
            where depth k's position i predicts t_{i+k+1} (valid for i < T - k) and aux
            covers the blocks of both: ``expert_load`` [L_moe + D_moe, E], the summed
            ``balance_loss``, ``attn_max_logit`` [L + D, N] (the MTP blocks last).
        """
        x, aux, (cos, sin) = self._trunk(tokens_BT, positions_BT, self.blocks)
        embed = self.embed_VD[...].astype(self.dtype)
        h, out, extra = x, [], []
        for k, module in enumerate(self.mtp_modules(), start=1):
            h, max_logit, moe_aux = module(h, embed[shift_tokens(tokens_BT, k)], cos, sin)
            out.append(self.final_norm(h))
            extra.append((max_logit, moe_aux))
        return self.final_norm(x), out, _merge_aux(aux, extra, self.cfg)

    def _trunk(self, tokens_BT, positions_BT, blocks):
        """Embedding and ``blocks``: (x_BTD before the final norm, aux, (cos, sin))."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope_tables(positions_BT, self.rope_dim, self.cfg.model.rope_theta)
        with jax.named_scope("embed"):
            x = self.embed_VD[...].astype(self.dtype)[tokens_BT]
        extra = []
        for block in blocks:
            x, max_logit, aux = block(x, cos, sin)
            extra.append((max_logit, aux))
        return x, _merge_aux(None, extra, self.cfg), (cos, sin)

    def mtp_modules(self) -> list:
        """The D MTP modules (empty without MTP)."""
        return list(self.mtp) if self.mtp_depth else []

    def init_cache_layers(self, batch: int, max_len: int, dtype, *, absorbed: bool = True) -> list:
        """One zeroed cache dict per layer (layouts in ``mlalm.model.attention``)."""
        return [b.attn.init_cache(batch, max_len, dtype, absorbed) for b in self.blocks]

    def forward_cached(self, tokens_BT, positions_BT, caches: list, *, pre_norm: bool = False):
        """Run T new tokens per row at their true positions over the per-layer caches.

        Args:
            tokens_BT: int tokens; positions_BT: their positions (RoPE angles and cache
                slots); query (b, t) attends the slots s <= positions_BT[b, t].
            caches: per-layer cache dicts from :meth:`init_cache_layers`.
            pre_norm: return h before the final norm (the MTP modules' input h^0).
        Returns:
            (h_BTD after the final norm; apply :meth:`logits`), the updated caches.
        """
        cos, sin = rope_tables(positions_BT, self.rope_dim, self.cfg.model.rope_theta)
        x = self.embed_VD[...].astype(self.dtype)[tokens_BT]
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.forward_cached(x, cos, sin, cache, positions_BT)
            new.append(cache)
        return (x if pre_norm else self.final_norm(x)), new

    def init_cache_mtp(self, batch: int, max_len: int, dtype, *, absorbed: bool = True) -> list:
        """One zeroed cache dict per MTP depth (the layouts of :meth:`init_cache_layers`)."""
        return [m.block.attn.init_cache(batch, max_len, dtype, absorbed) for m in self.mtp_modules()]

    def mtp_cached(self, k: int, h_prev_BTD, tokens_BT, positions_BT, cache: dict):
        """MTP depth k (1-based) over its cache: h_prev = h^{k-1} at ``positions_BT``,
        ``tokens_BT`` = t_{p+k} there.  Returns (h^k_BTD before the final norm, new cache)."""
        cos, sin = rope_tables(positions_BT, self.rope_dim, self.cfg.model.rope_theta)
        emb = self.embed_VD[...].astype(self.dtype)[tokens_BT]
        return self.mtp_modules()[k - 1].forward_cached(h_prev_BTD, emb, cos, sin, cache, positions_BT)

    def head_weight(self):
        """The LM head w_DV in the compute dtype (tied: the embedding's transpose)."""
        if self.cfg.model.tie_embeddings:
            return self.embed_VD[...].astype(self.dtype).T
        return self.head_DV[...].astype(self.dtype)

    def logits(self, h_BTD):
        """LM head in float32 accumulation."""
        with jax.named_scope("lm_head_loss"):
            return linear(h_BTD, self.head_weight(), preferred_element_type=jnp.float32)

    def apply_qk_clip(self, max_logit_LN, tau: float) -> None:
        """QK-clip (MuonClip, Kimi K2): where a head's largest logit exceeds tau, shrink its
        query/key weights by gamma = tau / max_logit so that its logits come back to tau."""
        gamma = jnp.minimum(1.0, tau / jnp.maximum(max_logit_LN, 1e-6))
        for i, block in enumerate(self.all_blocks()):  # rows: the L blocks, then the D MTP blocks
            block.attn.clip_qk(gamma[i])

    def all_blocks(self) -> list:
        """The main model's blocks, then the MTP modules' (the order of ``attn_max_logit``)."""
        return list(self.blocks) + [m.block for m in self.mtp_modules()]

    def moe_layers(self) -> list:
        """MoE FFNs of :meth:`all_blocks` (the rows of ``expert_load``)."""
        return [b.ffn for b in self.all_blocks() if b.is_moe]

    def update_balance_biases(self, expert_load_LE, rate: float) -> None:
        """Apply :func:`balance_bias_update` to every MoE layer (in place)."""
        for i, moe in enumerate(self.moe_layers()):
            moe.bias_E.set_value(balance_bias_update(moe.bias_E[...], expert_load_LE[i], rate))


def _merge_aux(aux, extra, cfg: Config) -> dict:
    """aux of blocks (``extra``: (max_logit, MoE aux or None) each) appended to ``aux``."""
    loads = [a["load"] for _, a in extra if a is not None]
    balance = sum((a["balance_loss"] for _, a in extra if a is not None), jnp.zeros((), jnp.float32))
    E = max(cfg.moe.n_routed_experts, 1)
    load = jnp.stack(loads) if loads else jnp.zeros((0, E), jnp.float32)
    max_logit = jnp.stack([m for m, _ in extra]) if extra else jnp.zeros((0, cfg.attention.n_heads))
    if aux is None:
        return {"expert_load": load, "balance_loss": balance, "attn_max_logit": max_logit}
    return {
        "expert_load": jnp.concatenate([aux["expert_load"], load]),
        "balance_loss": aux["balance_loss"] + balance,
        "attn_max_logit": jnp.concatenate([aux["attn_max_logit"], max_logit]),
    }


def count_params(model: Transformer, *, active: bool = False) -> int:
    """Number of trainable parameters; ``active``: count only top-k of the routed experts."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not active:
        return int(total)
    cfg = model.cfg
    for moe in model.moe_layers():
        per_expert = (
            sum(math.prod(w.get_value().shape) for w in (moe.w_gate_EDF, moe.w_up_EDF, moe.w_down_EFD))
            // moe.n_experts
        )
        total -= per_expert * (moe.n_experts - cfg.moe.top_k)
    return int(total)
