"""Model FLOPs per token and the machine's peak, for MFU.

Training FLOPs per token = 6 · (multiply-accumulates of one token's forward pass):
2 FLOPs per MAC, and the backward pass costs twice the forward.  Counted MACs per layer:

  attention projections   MLA: D·Q + Q·N·(dn+dr) (or D·N·(dn+dr) without q LoRA)
                               + D·(R+dr) + R·N·(dn+dv) + N·dv·D
                          MHA/GQA/MQA: D·N·H + 2·D·K·H + N·H·D
  attention products      N·(d_qk + d_v)·T   (QKᵀ and PV over all T keys, as XLA computes
                                             them; the causal mask halves the useful part)
  feed-forward            dense 3·D·F;  MoE: D·E (router) + (top_k + n_shared)·3·D·F_e
  LM head                 D·V (the embedding lookup is free)
Norms, RoPE, softmax and the optimizer are left out (the usual convention).
"""

from __future__ import annotations

import time


def flops_per_token(cfg, seq_len: int) -> float:
    m, a, e = cfg.model, cfg.attention, cfg.moe
    D, N = m.d_model, a.n_heads
    if a.kind == "mla":
        dn, dr, dv, R, Q = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank, a.q_lora_rank
        q = D * Q + Q * N * (dn + dr) if Q else D * N * (dn + dr)
        proj = q + D * (R + dr) + R * N * (dn + dv) + N * dv * D
        prod = N * (dn + dr + dv) * seq_len
    else:
        H, K = a.head_dim, cfg.n_kv_heads
        proj = D * N * H + 2 * D * K * H + N * H * D
        prod = N * 2 * H * seq_len
    macs = m.d_model * m.vocab_size
    for layer in range(m.n_layers):
        macs += proj + prod
        if cfg.is_moe_layer(layer):
            macs += D * e.n_routed_experts + (e.top_k + e.n_shared_experts) * 3 * D * e.expert_ffn_dim
        else:
            macs += 3 * D * m.ffn_dim
    return 6.0 * macs


# bf16 dense peaks (FLOP/s) of accelerators, by device_kind prefix
_GPU_PEAKS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6": 918e12}


def peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Device peak: a table for accelerators; on CPU the measured rate of an n×n f32 matmul."""
    import jax
    import jax.numpy as jnp
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        for prefix, peak in _GPU_PEAKS.items():
            if dev.device_kind.startswith(prefix):
                return peak
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
