"""Attention: MHA/GQA/MQA (one module, K kv heads) and DeepSeek's MLA.

MLA (DeepSeek-V2/V3), per token h:
    q        = W_q h                              or W_qb RMSNorm(W_qa h)    (q LoRA)
    [q_nope; q_pe] per head, RoPE on q_pe
    [c; k_pe] = W_kva h,  c_kv = RMSNorm(c),  k_pe = RoPE(k_pe)   (ONE rope key, all heads)
             (attention.kv_latent_norm=false: c_kv = c, for models converted by mlalm.convert)
    [k_nope; v] = W_kvb c_kv  per head
    k = [k_nope; k_pe], q = [q_nope; q_pe]:  qk width d_n + d_r, value width d_v
    softmax scale (d_n + d_r)^-1/2
Each module's ``forward_cached`` is the prefill/decode path over a KV cache (MLA: the
latent cache with weight absorption, or the expanded per-head cache); ``mlalm.generate``
drives it.  The cache sizes are given by :func:`kv_cache_bytes_per_token_per_layer`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from mlalm.model.attention_core import (
    _mla_decode_splits,
    absorbed_mla_attention,
    attention_core,
    cache_write,
    cached_attention,
    core_attention,
)
from mlalm.model.layers import RMSNorm, apply_rope, linear, param

__all__ = [
    "MLAttention",
    "MultiHeadAttention",
    "absorbed_mla_attention",
    "attention_core",
    "cache_write",
    "cached_attention",
    "core_attention",
    "kv_cache_bytes_per_token_per_layer",
    "make_attention",
]


class MultiHeadAttention(nnx.Module):
    """MHA (K = N), GQA (1 < K < N) and MQA (K = 1) with RoPE on the whole head."""

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        std: float,
        out_std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        N, K, H, D = n_heads, n_kv_heads, head_dim, d_model
        pd = param_dtype
        G = H  # value head dim: equal to the query/key head dim here
        # roles (mlalm.optim): each projection is one whole matrix for Muon, the input
        # projections [D, N*H] and the output projection [N*G, D]
        proj_in = {"label": "hidden", "fan_in": (0,), "fan_out": (1, 2), "dtype": pd}
        self.wq_DNH = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std=std, **proj_in)
        self.wk_DKH = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std=std, **proj_in)
        self.wv_DKG = param(rngs, (D, K, G), ("embed", "kv_heads", "head_dim"), std=std, **proj_in)
        self.wo_NGD = param(
            rngs,
            (N, G, D),
            ("heads", "head_dim", "embed"),
            std=out_std,
            label="hidden",
            fan_in=(0, 1),
            fan_out=(2,),
            dtype=pd,
        )
        self.scale = H**-0.5
        self.dtype = dtype
        self.impl = impl

    def qkv(self, x_BTD, cos, sin):
        dt = self.dtype
        q = linear(x_BTD, self.wq_DNH[...].astype(dt))
        k = linear(x_BTD, self.wk_DKH[...].astype(dt))
        v = linear(x_BTD, self.wv_DKG[...].astype(dt))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o_BTNG):
        return linear(o_BTNG, self.wo_NGD[...].astype(self.dtype), 2)

    def __call__(self, x_BTD, cos, sin):
        """Returns (y_BTD, max_logit_N)."""
        q, k, v = self.qkv(x_BTD, cos, sin)
        o, max_logit = core_attention(self.impl, q, k, v, scale=self.scale)
        return self.out(o), max_logit

    def init_cache(self, batch: int, max_len: int, dtype, absorbed: bool = True) -> dict:
        """Zeroed cache: rotated keys and values per kv head, k/v [B, S, K, H] each
        (``absorbed`` only matters to MLA)."""
        _, K, H = self.wk_DKH.shape
        G = self.wv_DKG.shape[2]
        return {"k": jnp.zeros((batch, max_len, K, H), dtype), "v": jnp.zeros((batch, max_len, K, G), dtype)}

    def forward_cached(self, x_BTD, cos, sin, cache: dict, positions_BT):
        """Attention of T new tokens at ``positions_BT`` over the cache after writing them to it.

        Returns (y_BTD, new cache).
        """
        q, k, v = self.qkv(x_BTD, cos, sin)
        k_c = cache_write(cache["k"], k, positions_BT)
        v_c = cache_write(cache["v"], v, positions_BT)
        o = cached_attention(q, k_c, v_c, positions_BT, scale=self.scale)
        return self.out(o.astype(self.dtype)), {"k": k_c, "v": v_c}

    def clip_qk(self, gamma_N):
        """QK-clip: scale head n's query by sqrt(gamma_n) and each kv head's key by the
        sqrt of the smallest gamma of the query heads sharing it (so no head's logits grow)."""
        N, K = self.wq_DNH.shape[1], self.wk_DKH.shape[1]
        g = jnp.sqrt(gamma_N)
        self.wq_DNH.set_value(self.wq_DNH[...] * g[None, :, None].astype(self.wq_DNH.dtype))
        gk = jnp.min(g.reshape(K, N // K), axis=1)
        self.wk_DKH.set_value(self.wk_DKH[...] * gk[None, :, None].astype(self.wk_DKH.dtype))


class MLAttention(nnx.Module):
    """Multi-head Latent Attention with optional q LoRA and decoupled RoPE."""

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        q_lora_rank: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        norm_eps: float,
        std: float,
        out_std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        impl: str = "xla",
        kv_latent_norm: bool = True,
        rngs: nnx.Rngs,
    ):
        D, N, R, P = d_model, n_heads, kv_lora_rank, qk_rope_head_dim
        dn, dv = qk_nope_head_dim, v_head_dim
        pd = param_dtype
        self.n_heads, self.dn, self.dr, self.dv, self.R = N, dn, P, dv, R
        # roles (mlalm.optim): every weight is one whole matrix for Muon; the up-projections
        # W_qb [Q, N*(d_n+d_r)] and W_kvb [R, N*(d_n+d_v)] are not split per head
        matrix = {"label": "hidden", "fan_in": (0,), "fan_out": (1,), "dtype": pd}
        up = {"label": "hidden", "fan_in": (0,), "fan_out": (1, 2), "dtype": pd}
        if q_lora_rank:
            self.wq_a_DQ = param(rngs, (D, q_lora_rank), ("embed", "q_lora"), std=std, **matrix)
            self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps, dtype=dtype, param_dtype=pd, rngs=rngs)
            self.wq_b_QNH = param(
                rngs, (q_lora_rank, N, dn + P), ("q_lora", "heads", "head_dim"), std=std, **up
            )
        else:
            self.wq_DNH = param(rngs, (D, N, dn + P), ("embed", "heads", "head_dim"), std=std, **up)
        self.q_lora = bool(q_lora_rank)
        # one matrix produces the latent c (R) and the shared rope key (P): width J = R + P
        self.wkv_a_DJ = param(rngs, (D, R + P), ("embed", "kv_lora"), std=std, **matrix)
        # DeepSeek normalises the latent: c_kv = RMSNorm(c).  kv_latent_norm=False drops
        # the norm (and its parameter): c_kv = c, a linear function of h, which is what a
        # model converted from MHA/GQA/MQA needs to be exact (mlalm.convert), since no
        # linear map reproduces a division by the RMS.  transformers' DeepseekV3, vLLM,
        # SGLang and llama.cpp always apply kv_a_layernorm, so such a model cannot be
        # exported to their formats: no norm weight makes RMSNorm the identity.
        self.kv_latent_norm = kv_latent_norm
        if kv_latent_norm:
            self.kv_norm = RMSNorm(R, eps=norm_eps, dtype=dtype, param_dtype=pd, rngs=rngs)
        # per head k_nope then v: width U = d_n + d_v
        self.wkv_b_RNU = param(rngs, (R, N, dn + dv), ("kv_lora", "heads", "head_dim"), std=std, **up)
        self.wo_NGD = param(
            rngs,
            (N, dv, D),
            ("heads", "head_dim", "embed"),
            std=out_std,
            label="hidden",
            fan_in=(0, 1),
            fan_out=(2,),
            dtype=pd,
        )
        self.scale = (dn + P) ** -0.5
        self.dtype = dtype
        self.impl = impl

    def query(self, x_BTD, cos, sin):
        """q_nope [B,T,N,dn] and rotated q_pe [B,T,N,dr]."""
        dt = self.dtype
        if self.q_lora:
            cq = self.q_norm(linear(x_BTD, self.wq_a_DQ[...].astype(dt)))
            q = linear(cq, self.wq_b_QNH[...].astype(dt))
        else:
            q = linear(x_BTD, self.wq_DNH[...].astype(dt))
        return q[..., : self.dn], apply_rope(q[..., self.dn :], cos, sin)

    def latent(self, x_BTD, cos, sin):
        """What MLA caches per token: c_kv [B,T,R] (normalised unless kv_latent_norm is
        off) and rotated k_pe [B,T,P]."""
        ckv = linear(x_BTD, self.wkv_a_DJ[...].astype(self.dtype))
        c_kv = self.kv_norm(ckv[..., : self.R]) if self.kv_latent_norm else ckv[..., : self.R]
        k_pe = apply_rope(ckv[..., None, self.R :], cos, sin)[:, :, 0]
        return c_kv, k_pe

    def expand(self, c_kv_BSR, k_pe_BSP):
        """Per-head keys [B,S,N,dn+dr] and values [B,S,N,dv] from the latent (no absorption)."""
        kv = linear(c_kv_BSR, self.wkv_b_RNU[...].astype(self.dtype))
        k_nope, v = kv[..., : self.dn], kv[..., self.dn :]
        k_pe = jnp.broadcast_to(k_pe_BSP[:, :, None, :], k_nope.shape[:3] + (self.dr,))
        return jnp.concatenate([k_nope, k_pe], axis=-1), v

    def out(self, o_BTNG):
        return linear(o_BTNG, self.wo_NGD[...].astype(self.dtype), 2)

    def __call__(self, x_BTD, cos, sin):
        """Returns (y_BTD, max_logit_N)."""
        q_nope, q_pe = self.query(x_BTD, cos, sin)
        k, v = self.expand(*self.latent(x_BTD, cos, sin))
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        o, max_logit = core_attention(self.impl, q, k, v, scale=self.scale)
        return self.out(o), max_logit

    def init_cache(self, batch: int, max_len: int, dtype, absorbed: bool = True) -> dict:
        """Zeroed cache.  absorbed: the latent c_kv [B, S, R] and rope key k_pe [B, S, P];
        otherwise the expanded per-head keys [B, S, N, d_n + d_r] and values [B, S, N, d_v]."""
        B, S, N = batch, max_len, self.n_heads
        if absorbed:
            return {"c_kv": jnp.zeros((B, S, self.R), dtype), "k_pe": jnp.zeros((B, S, self.dr), dtype)}
        return {
            "k": jnp.zeros((B, S, N, self.dn + self.dr), dtype),
            "v": jnp.zeros((B, S, N, self.dv), dtype),
        }

    def forward_cached(self, x_BTD, cos, sin, cache: dict, positions_BT):
        """MLA of T new tokens at ``positions_BT`` over the cache after writing them to it.

        The cache's keys pick the path: {'c_kv', 'k_pe'} decodes with weight absorption
        (q_abs = q_nope · W_UK, attention over the latent, then W_UV and W_o); {'k', 'v'}
        expands each token once to per-head keys/values (no absorption).  With
        ``impl='pallas'`` a single absorbed decode step (T = 1) runs ``mla_decode``.

        Returns (y_BTD, new cache).
        """
        q_nope, q_pe = self.query(x_BTD, cos, sin)
        c_kv, k_pe = self.latent(x_BTD, cos, sin)
        if "k" in cache:  # naive: cache what the training path attends to
            k, v = self.expand(c_kv, k_pe)
            k_c = cache_write(cache["k"], k, positions_BT)
            v_c = cache_write(cache["v"], v, positions_BT)
            q = jnp.concatenate([q_nope, q_pe], axis=-1)
            o = cached_attention(q, k_c, v_c, positions_BT, scale=self.scale)
            return self.out(o.astype(self.dtype)), {"k": k_c, "v": v_c}

        c_c = cache_write(cache["c_kv"], c_kv, positions_BT)
        kp_c = cache_write(cache["k_pe"], k_pe, positions_BT)
        w_kvb = self.wkv_b_RNU[...].astype(self.dtype)
        w_uk_RNH, w_uv_RNG = w_kvb[..., : self.dn], w_kvb[..., self.dn :]
        # q_nope·k_nope = q_nope·(W_UK c) = (q_nope·W_UK)·c: fold W_UK into the query
        q_abs = jnp.einsum("BTNH,RNH->BTNR", q_nope, w_uk_RNH)
        B, T = positions_BT.shape
        if self.impl == "pallas" and T == 1:
            from mlalm.kernels import mla_decode

            S = c_c.shape[1]
            o_BNR = mla_decode(
                q_abs[:, 0],
                q_pe[:, 0],
                c_c,
                kp_c,
                positions_BT[:, 0] + 1,
                sm_scale=self.scale,
                num_splits=_mla_decode_splits(S, B),
            )
            o_lat = o_BNR[:, None]
        else:
            o_lat = absorbed_mla_attention(q_abs, q_pe, c_c, kp_c, positions_BT, scale=self.scale)
        # per head v = W_UV c, so Σ_s p_s v_s = W_UV (Σ_s p_s c_s): apply W_UV to the latent output
        o = jnp.einsum("BTNR,RNG->BTNG", o_lat.astype(self.dtype), w_uv_RNG)
        return self.out(o), {"c_kv": c_c, "k_pe": kp_c}

    def clip_qk(self, gamma_N):
        """QK-clip for MLA (Kimi K2): per head, q_nope and k_nope by sqrt(gamma), q_pe by
        gamma; the rope key is shared by all heads and stays untouched."""
        g, dn = jnp.sqrt(gamma_N), self.dn
        wq = self.wq_b_QNH if self.q_lora else self.wq_DNH
        q_scale = jnp.concatenate(
            [
                jnp.broadcast_to(g[:, None], (self.n_heads, dn)),
                jnp.broadcast_to(gamma_N[:, None], (self.n_heads, self.dr)),
            ],
            axis=1,
        )
        wq.set_value(wq[...] * q_scale[None].astype(wq.dtype))
        kv_scale = jnp.concatenate(
            [jnp.broadcast_to(g[:, None], (self.n_heads, dn)), jnp.ones((self.n_heads, self.dv), g.dtype)],
            axis=1,
        )
        self.wkv_b_RNU.set_value(self.wkv_b_RNU[...] * kv_scale[None].astype(self.wkv_b_RNU.dtype))


def make_attention(cfg, *, rngs: nnx.Rngs) -> MLAttention | MultiHeadAttention:
    """Build the attention module that ``cfg.attention.kind`` names."""
    from mlalm.model.layers import DTYPES

    a, m = cfg.attention, cfg.model
    common = dict(
        d_model=m.d_model,
        std=m.init_std,
        out_std=m.init_std / math.sqrt(2 * m.n_layers),
        dtype=DTYPES[m.dtype],
        param_dtype=DTYPES[m.param_dtype],
        impl=a.impl,
        rngs=rngs,
    )
    if a.kind == "mla":
        return MLAttention(
            n_heads=a.n_heads,
            q_lora_rank=a.q_lora_rank,
            kv_lora_rank=a.kv_lora_rank,
            qk_nope_head_dim=a.qk_nope_head_dim,
            qk_rope_head_dim=a.qk_rope_head_dim,
            v_head_dim=a.v_head_dim,
            norm_eps=m.norm_eps,
            kv_latent_norm=a.kv_latent_norm,
            **common,
        )
    return MultiHeadAttention(n_heads=a.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=a.head_dim, **common)


def kv_cache_bytes_per_token_per_layer(cfg, *, dtype_bytes: int | None = None, absorbed: bool = True) -> int:
    """KV-cache bytes one token occupies in one layer.

    MHA 2·n_h·d_h·b, GQA 2·n_kv·d_h·b, MQA 2·d_h·b, MLA latent (d_c + d_r)·b, and MLA
    without absorption (expanded keys and values, what transformers caches)
    n_h·(d_n + d_r + d_v)·b.  ``dtype_bytes`` defaults to the compute dtype's size.
    """
    b = dtype_bytes or (2 if cfg.model.dtype == "bfloat16" else 4)
    a = cfg.attention
    if a.kind == "mla":
        if absorbed:
            return (a.kv_lora_rank + a.qk_rope_head_dim) * b
        return a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * b
    return 2 * cfg.n_kv_heads * a.head_dim * b
