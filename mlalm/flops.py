"""Model FLOPs per token and the machine's peak, for MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B: 6·N + 12·L·H·Q·T, no causal halving).
Training FLOPs per token = 6 · (multiply-accumulates of one token's forward pass): 2 FLOPs
per MAC, and the backward pass costs twice the forward (grads of inputs and of weights).
Counted MACs per token (D d_model, N heads, L layers, T the sequence length):

  attention projections   MLA: D·Q + Q·N·(dn+dr)   (or D·N·(dn+dr) without q LoRA)
                               + D·(R+dr)          (W_kva: latent c and the shared rope key)
                               + R·N·(dn+dv)       (W_kvb: k_nope and v per head)
                               + N·dv·D            (W_o)
                          MHA/GQA/MQA (K kv heads, head dim H): D·N·H + 2·D·K·H + N·H·D
  attention products      N·(d_qk + d_v)·T: QKᵀ (width d_qk = dn + dr for MLA, H otherwise)
                          and PV (width d_v = dv for MLA, H otherwise) against all T keys.
                          Counted over the full T×T score matrix, as XLA computes it; the
                          causal mask makes half of it useless, which this convention ignores
                          (with d_qk = d_v = H this is PaLM's 12·L·N·H·T after the factor 6).
  feed-forward            dense SwiGLU 3·D·F;  MoE layer: D·E (router) + (top_k + n_shared)·3·D·F_e
                          (only the experts a token is routed to, plus the shared ones)
  LM head                 D·V (the embedding lookup is a gather: free)

So ``flops_per_token = 6·(P_active + L·N·(d_qk + d_v)·T)`` where P_active is the number of
weight-matrix entries one token multiplies with: ``count_params(model, active=True)`` less
the embedding table and the norm scales (plus D·V again when the head is tied to the
embedding).  Norms, RoPE, softmax, activations, the router's top-k and the optimizer are
left out (the usual convention); so is the extra work of a dispatch that pads experts
(capacity factor) or computes every expert for every token (ragged_dot's CPU fallback):
model FLOPs count useful work only, which is what makes MFU comparable across
implementations.
"""

from __future__ import annotations

import math
import statistics
import time


def macs_per_token(cfg, seq_len: int) -> dict:
    """Forward multiply-accumulates per token, by part (see the module docstring).

    Returns:
        {'attn_proj', 'attn_products', 'ffn' (dense FFNs and the routed/shared experts a
        token uses), 'router', 'head'} summed over layers, and 'total'.
    """
    m, a, e = cfg.model, cfg.attention, cfg.moe
    D, N, T = m.d_model, a.n_heads, seq_len
    if a.kind == "mla":
        dn, dr, dv, R, Q = (
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
            a.q_lora_rank,
        )
        q = D * Q + Q * N * (dn + dr) if Q else D * N * (dn + dr)
        proj = q + D * (R + dr) + R * N * (dn + dv) + N * dv * D
        d_qk, d_v = dn + dr, dv
    else:
        H, K = a.head_dim, cfg.n_kv_heads
        proj = D * N * H + 2 * D * K * H + N * H * D
        d_qk = d_v = H
    parts = {"attn_proj": 0, "attn_products": 0, "ffn": 0, "router": 0, "head": D * m.vocab_size}
    for layer in range(m.n_layers):
        parts["attn_proj"] += proj
        parts["attn_products"] += N * (d_qk + d_v) * T
        if cfg.is_moe_layer(layer):
            parts["router"] += D * e.n_routed_experts
            parts["ffn"] += (e.top_k + e.n_shared_experts) * 3 * D * e.expert_ffn_dim
        else:
            parts["ffn"] += 3 * D * m.ffn_dim
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 · forward MACs (:func:`macs_per_token`)."""
    return 6.0 * macs_per_token(cfg, seq_len)["total"]


def traced_matmul_flops(fn, *args, **kwargs) -> int:
    """FLOPs of every matmul (``dot_general``, ``ragged_dot_general``) that ``fn`` traces to.

    An independent count of what a function actually multiplies: 2·(output size)·(contracted
    size) per dot, walked through nested jaxprs (jit, custom_vjp, remat; a scan's body times
    its length).  A ragged dot counts its useful rows only (not the E× of a dense fallback).
    """
    import jax

    def prod(xs):
        return math.prod(int(x) for x in xs)

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * prod(eqn.outvars[0].aval.shape) * prod(lhs[d] for d in lc)
            elif name == "ragged_dot_general":
                rdn = eqn.params["ragged_dot_dimension_numbers"]
                (lc, _), _ = rdn.dot_dimension_numbers
                lhs = eqn.invars[0].aval.shape
                flops = 2 * prod(eqn.outvars[0].aval.shape) * prod(lhs[d] for d in lc)
                if any(d in lc for d in rdn.lhs_ragged_dimensions):
                    # ragged contracting dimension (the weight gradient of a grouped
                    # matmul, [M, D] x [M, F] -> [G, D, F]): each of the M rows feeds
                    # one group's output only, so the G output blocks share the M rows
                    flops //= int(eqn.invars[2].aval.shape[-1])
                total += flops
            sub = []
            for v in eqn.params.values():
                for x in v if isinstance(v, (list, tuple)) else [v]:
                    inner = getattr(x, "jaxpr", x)
                    if hasattr(inner, "eqns"):
                        sub.append(walk(inner))
            if name == "cond":
                total += max(sub, default=0)
            else:
                total += sum(sub) * (eqn.params.get("length", 1) if name == "scan" else 1)
        return total

    return walk(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


# bf16 dense peaks (FLOP/s, no sparsity) of accelerators, by device_kind prefix; the first
# matching prefix wins (so the PCIe H100 comes before the SXM one)
# longer prefixes first: the first prefix that matches wins
_ACCEL_PEAKS = {
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
}


def accelerator_peak(device_kind: str) -> float | None:
    """Data-sheet bf16 dense peak of an accelerator, or None when it is not in the table."""
    for prefix, peak in _ACCEL_PEAKS.items():
        if device_kind.startswith(prefix):
            return peak
    return None


def matmul_rate(n: int = 4096, repeats: int = 5, dtype: str = "float32") -> dict:
    """Measured rate of a jitted n×n @ n×n matmul on the default device.

    Returns:
        {'median', 'best'} in FLOP/s (2·n³ per product), 'n', 'repeats', 'dtype',
        'seconds' (each timed call).
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    flops = 2.0 * n**3
    return {
        "median": flops / statistics.median(times),
        "best": flops / min(times),
        "n": n,
        "repeats": repeats,
        "dtype": dtype,
        "seconds": times,
    }


def peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Device peak in FLOP/s: the data-sheet bf16 figure for known accelerators; elsewhere
    (CPU) the median measured rate of an n×n float32 matmul (scripts/bench.py uses n=4096)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        peak = accelerator_peak(dev.device_kind)
        if peak is not None:
            return peak
    return matmul_rate(n, repeats)["median"]
