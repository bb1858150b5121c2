"""DeepSeekMoE: fine-grained routed experts + always-on shared experts.

Router (DeepSeek-V3): s = sigmoid(x W_g) in float32 (V2: softmax).  Experts are *chosen*
by s + b, where b is the auxiliary-loss-free balancing bias, optionally restricted to the
topk_group best of n_group groups (a group scores the sum of its two best experts).  The
gate weights are the *unbiased* s of the chosen experts, normalised to sum 1 when
norm_topk_prob, times routed_scaling_factor.  After each step the train loop moves the
bias with :func:`balance_bias_update`; it has no gradient and no optimizer.

Dispatch runs every expert as one batched matmul:
  * ``dropless``: sort the N·k (token, expert) pairs by expert; no token is ever dropped.
    On accelerators a grouped matmul (``jax.lax.ragged_dot``).  On CPU, where ragged_dot's
    fallback runs every expert on every row (E times the FLOPs), each expert's rows are
    padded to a multiple of a small block and a loop over the *used* blocks runs one
    [b, D] x [D, F] matmul per block (:func:`grouped_swiglu`, the grouped-matmul idea of
    MegaBlocks, arXiv 2211.15841, in plain XLA): about N·k + E·b/2 rows of work, against
    capacity's cf·N·k.
  * ``capacity``: gather each expert's first C = ceil(cf·N·k/E) tokens into [E, C, D] and
    run plain batched einsums; pairs past an expert's capacity are dropped (the residual
    and the shared experts still carry those tokens).  With C >= N·k it equals dropless.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mlalm.model.layers import BalanceBias, SwiGLU, param


def balance_bias_update(bias_E, load_E, rate: float):
    """Auxiliary-loss-free balancing step: b_i += γ·sign(mean(load) − load_i).

    Args:
        bias_E: current bias [E] (float32).
        load_E: tokens routed to each expert over the global batch [E].
        rate: γ (DeepSeek-V3 uses 1e-3).
    """
    load = load_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(jnp.mean(load) - load)


@dataclasses.dataclass(frozen=True)
class Routing:
    """The routing options of :func:`route` (``route(x, w, b, **dataclasses.asdict(r))``).

    Frozen, hence hashable: a module keeps it as a static attribute, and the model's
    graphdef stays hashable (``mlalm.generate`` keys its compiled programs on it).
    """

    top_k: int
    scoring: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def route(
    x_ND,
    w_DE,
    bias_E,
    *,
    top_k: int,
    scoring: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
):
    """Choose top-k experts per token.

    Returns:
        idx_Nk (int32), gate weights w_Nk (float32), all scores s_NE (float32).
    """
    logits = jnp.einsum("ND,DE->NE", x_ND.astype(jnp.float32), w_DE.astype(jnp.float32))
    s = jax.nn.sigmoid(logits) if scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = s + bias_E.astype(jnp.float32)
    N, E = choice.shape
    if n_group > 1:
        grouped = choice.reshape(N, n_group, E // n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, n_group]
        _, keep = jax.lax.top_k(group_score, topk_group)
        group_mask = jnp.zeros((N, n_group), bool).at[jnp.arange(N)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, E // n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, top_k)
    w = jnp.take_along_axis(s, idx, axis=-1)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), w * routed_scaling_factor, s


def _expert_ffn_ragged(x_MD, group_sizes_E, w_gate, w_up, w_down):
    g = jax.lax.ragged_dot(x_MD, w_gate, group_sizes_E)
    u = jax.lax.ragged_dot(x_MD, w_up, group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(g) * u, w_down, group_sizes_E)


def resolve_dispatch(dispatch: str) -> str:
    """``moe.dispatch=auto`` is dropless on every backend (a CPU run trains the same model
    as a GPU run of the same config); ``capacity`` only when a config asks for it."""
    return "dropless" if dispatch == "auto" else dispatch


def dispatch_dropless(x_ND, idx_Nk, w_Nk, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every (token, expert) pair, none dropped: :func:`dispatch_blocked` on CPU,
    :func:`dispatch_ragged` elsewhere (the backend of the arrays' default device)."""
    fn = dispatch_blocked if jax.default_backend() == "cpu" else dispatch_ragged
    return fn(x_ND, idx_Nk, w_Nk, w_gate_EDF, w_up_EDF, w_down_EFD)


def dispatch_ragged(x_ND, idx_Nk, w_Nk, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Sort (token, expert) pairs by expert, grouped matmul, weighted scatter-add back."""
    N, k = idx_Nk.shape
    E = w_gate_EDF.shape[0]
    flat = idx_Nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    y = _expert_ffn_ragged(x_ND[token], sizes, w_gate_EDF, w_up_EDF, w_down_EFD)
    y = y * w_Nk.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(x_ND).at[token].add(y)


def block_size(n_pairs: int, n_experts: int) -> int:
    """Rows per block of :func:`dispatch_blocked`: the balanced rows per expert, as a
    power of two in [8, 128] -- small enough that padding (E·b/2 rows on average) stays a
    few percent of the N·k rows, large enough for an efficient matmul per block."""
    per_expert = max(1, n_pairs // n_experts)
    return int(min(128, max(8, 1 << (per_expert.bit_length() - 1))))


def dispatch_blocked(x_ND, idx_Nk, w_Nk, w_gate_EDF, w_up_EDF, w_down_EFD, *, block: int | None = None):
    """Dropless dispatch for CPU: each expert's pairs (sorted by expert, in token order)
    padded to a multiple of ``block`` rows, then :func:`grouped_swiglu` over the used blocks.

    The static row count R = G·b with G = (N·k + E·(b-1)) // b bounds every routing (each
    expert pads fewer than b rows); the loop runs only the used blocks, sum_e ceil(n_e/b).
    """
    N, k = idx_Nk.shape
    E, D = w_gate_EDF.shape[0], x_ND.shape[1]
    M = N * k
    b = block or block_size(M, E)
    G = (M + E * (b - 1)) // b
    flat = idx_Nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pair ids sorted by expert, token order kept
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    blocks = (sizes + b - 1) // b
    block_end = jnp.cumsum(blocks)  # inclusive: expert e owns blocks [end[e-1], end[e])
    start = jnp.cumsum(sizes) - sizes  # first sorted position of each expert
    e_sorted = flat[order]
    row_sorted = (block_end - blocks)[e_sorted] * b + jnp.arange(M, dtype=jnp.int32) - start[e_sorted]
    row_of_pair = jnp.zeros((M,), jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
    token_of_row = jnp.full((G * b,), N, jnp.int32).at[row_sorted].set((order // k).astype(jnp.int32))
    block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(G), side="right"), E - 1)
    x_pad = jnp.concatenate([x_ND, jnp.zeros((1, D), x_ND.dtype)], axis=0)
    y_RD = grouped_swiglu(
        x_pad[token_of_row], block_expert.astype(jnp.int32), block_end[-1], w_gate_EDF, w_up_EDF, w_down_EFD
    )
    y = (y_RD[row_of_pair] * w_Nk.reshape(-1)[:, None].astype(y_RD.dtype)).reshape(N, k, D)
    out = y[:, 0]  # the k slots added one by one (see dispatch_capacity)
    for j in range(1, k):
        out = out + y[:, j]
    return out


def _block_loop(n_used, body, init):
    return jax.lax.fori_loop(0, n_used, body, init)


@jax.custom_vjp
def grouped_swiglu(x_RD, block_expert_G, n_used, w_gate_EDF, w_up_EDF, w_down_EFD):
    """SwiGLU of each block of b = R/G rows with its expert's weights: rows [g·b, (g+1)·b)
    use expert ``block_expert_G[g]``; blocks from ``n_used`` on are skipped (their rows
    give zeros).  One [b, D] x [D, F] matmul per block and weight, in a loop whose trip
    count is the number of used blocks; the backward pass (below) is a second such loop."""
    return _grouped_fwd(x_RD, block_expert_G, n_used, w_gate_EDF, w_up_EDF, w_down_EFD)[0]


def _grouped_fwd(x_RD, block_expert_G, n_used, w_gate_EDF, w_up_EDF, w_down_EFD):
    R, D = x_RD.shape
    G, F = block_expert_G.shape[0], w_gate_EDF.shape[2]
    b = R // G

    def body(g, carry):
        y, gate, up = carry
        e = block_expert_G[g]
        xb = jax.lax.dynamic_slice_in_dim(x_RD, g * b, b)
        gb, ub = xb @ w_gate_EDF[e], xb @ w_up_EDF[e]
        yb = (jax.nn.silu(gb) * ub) @ w_down_EFD[e]
        put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=g * b, axis=0)
        return put(y, yb), put(gate, gb), put(up, ub)

    dt = x_RD.dtype
    init = (jnp.zeros((R, D), dt), jnp.zeros((R, F), dt), jnp.zeros((R, F), dt))
    y, gate, up = _block_loop(n_used, body, init)
    return y, (x_RD, block_expert_G, n_used, w_gate_EDF, w_up_EDF, w_down_EFD, gate, up)


def _grouped_bwd(res, dy_RD):
    x_RD, block_expert_G, n_used, w_gate, w_up, w_down, gate, up = res
    R, D = x_RD.shape
    G = block_expert_G.shape[0]
    b = R // G
    f32 = jnp.float32

    def body(g, carry):
        dx, dwg, dwu, dwd = carry
        e = block_expert_G[g]
        rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=g * b, slice_size=b)
        xb, gb, ub, dyb = rows(x_RD), rows(gate), rows(up), rows(dy_RD)
        sig = jax.nn.sigmoid(gb)
        a = gb * sig  # silu(g)
        dh = dyb @ w_down[e].T
        du = dh * a
        dg = dh * ub * (sig * (1 + gb * (1 - sig)))  # silu'(g)
        dxb = dg @ w_gate[e].T + du @ w_up[e].T

        def acc(dw, inc):
            return jax.lax.dynamic_update_index_in_dim(dw, dw[e] + inc.astype(f32), e, 0)

        dwd = acc(dwd, (a * ub).T @ dyb)
        dwg = acc(dwg, xb.T @ dg)
        dwu = acc(dwu, xb.T @ du)
        return jax.lax.dynamic_update_slice_in_dim(dx, dxb, g * b, 0), dwg, dwu, dwd

    init = (
        jnp.zeros_like(x_RD),
        jnp.zeros(w_gate.shape, f32),
        jnp.zeros(w_up.shape, f32),
        jnp.zeros(w_down.shape, f32),
    )
    dx, dwg, dwu, dwd = _block_loop(n_used, body, init)
    return dx, None, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


grouped_swiglu.defvjp(_grouped_fwd, _grouped_bwd)


def dispatch_capacity(x_ND, idx_Nk, w_Nk, w_gate_EDF, w_up_EDF, w_down_EFD, *, capacity: int):
    """Gather each expert's first ``capacity`` pairs into [E, C, D]; drop the rest."""
    N, k = idx_Nk.shape
    E, D = w_gate_EDF.shape[0], x_ND.shape[1]
    flat = idx_Nk.reshape(-1)  # pair p = n*k + j, token-major: earlier tokens win
    onehot = jax.nn.one_hot(flat, E, dtype=jnp.int32)
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    keep = pos < capacity
    slot = jnp.where(keep, flat * capacity + pos, E * capacity)  # E*C: the discard slot
    token_of_slot = (
        jnp.full((E * capacity + 1,), N, jnp.int32).at[slot].set(jnp.arange(N * k, dtype=jnp.int32) // k)[:-1]
    )
    x_pad = jnp.concatenate([x_ND, jnp.zeros((1, D), x_ND.dtype)], axis=0)
    x_ECD = x_pad[token_of_slot].reshape(E, capacity, D)
    g = jnp.einsum("ECD,EDF->ECF", x_ECD, w_gate_EDF)
    u = jnp.einsum("ECD,EDF->ECF", x_ECD, w_up_EDF)
    y_ECD = jnp.einsum("ECF,EFD->ECD", jax.nn.silu(g) * u, w_down_EFD)
    y_pad = jnp.concatenate([y_ECD.reshape(E * capacity, D), jnp.zeros((1, D), y_ECD.dtype)])
    w = jnp.where(keep, w_Nk.reshape(-1), 0.0).astype(y_ECD.dtype)
    y = (y_pad[slot] * w[:, None]).reshape(N, k, D)
    # the k slots added one by one: a reduce over an axis of size k ran at a fraction of
    # the speed of the elementwise adds on CPU (measured 4 ms vs <1 ms per layer)
    out = y[:, 0]
    for j in range(1, k):
        out = out + y[:, j]
    return out


def sequence_balance_loss(s_BTE, idx_BTk, n_experts: int):
    """DeepSeek-V3's complementary sequence-wise balance loss (before its α).

    f_i = E/(k·T) · #{t: i in topk(t)},  P_i = mean_t s_{t,i}/Σ_j s_{t,j},
    L = Σ_i f_i P_i, averaged over sequences.  Equals 1 when perfectly balanced.
    """
    B, T, k = idx_BTk.shape
    counts = jax.nn.one_hot(idx_BTk, n_experts, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
    f = counts * n_experts / (k * T)
    p = (s_BTE / s_BTE.sum(-1, keepdims=True)).mean(axis=1)
    return jnp.mean(jnp.sum(f * p, axis=-1))


class MoE(nnx.Module):
    """Routed experts (stacked [E, ...] weights) + shared experts as one SwiGLU."""

    def __init__(
        self,
        *,
        d_model: int,
        n_routed_experts: int,
        n_shared_experts: int,
        expert_ffn_dim: int,
        top_k: int,
        scoring: str,
        n_group: int,
        topk_group: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
        dispatch: str,
        capacity_factor: float,
        std: float,
        out_std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        D, E, F = d_model, n_routed_experts, expert_ffn_dim
        pd = param_dtype
        self.w_router_DE = param(
            rngs,
            (D, E),
            ("embed", None),
            label="router",
            fan_in=(0,),
            fan_out=(1,),
            std=std,
            dtype=jnp.float32,
        )
        self.bias_E = BalanceBias(jnp.zeros((E,), jnp.float32), axes=(None,))
        # roles (mlalm.optim): E stacked matrices, orthogonalised by Muon one expert at a time
        expert = {"label": "hidden", "batch": (0,), "fan_in": (1,), "fan_out": (2,), "dtype": pd}
        self.w_gate_EDF = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), std=std, **expert)
        self.w_up_EDF = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), std=std, **expert)
        self.w_down_EFD = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), std=out_std, **expert)
        self.shared = (
            SwiGLU(D, F * n_shared_experts, std=std, out_std=out_std, dtype=dtype, param_dtype=pd, rngs=rngs)
            if n_shared_experts
            else None
        )
        self.n_experts, self.top_k = E, top_k
        self.routing = Routing(
            top_k=top_k,
            scoring=scoring,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=routed_scaling_factor,
        )
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.dtype = dtype

    def __call__(self, x_BTD, *, dispatch: str | None = None):
        """Returns (y_BTD, aux) with aux = {'load': tokens per expert [E], 'balance_loss'}.

        ``dispatch`` overrides ``moe.dispatch`` (generation passes 'dropless').
        """
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        with jax.named_scope("router"):
            idx, w, s = route(
                x_ND, self.w_router_DE[...], self.bias_E[...], **dataclasses.asdict(self.routing)
            )
        dt = self.dtype
        weights = (
            self.w_gate_EDF[...].astype(dt),
            self.w_up_EDF[...].astype(dt),
            self.w_down_EFD[...].astype(dt),
        )
        dispatch = resolve_dispatch(dispatch or self.dispatch)
        with jax.named_scope("experts"):
            if dispatch == "dropless":
                y = dispatch_dropless(x_ND, idx, w, *weights)
            else:
                capacity = max(1, math.ceil(self.capacity_factor * B * T * self.top_k / self.n_experts))
                y = dispatch_capacity(x_ND, idx, w, *weights, capacity=capacity)
        y = y.reshape(B, T, D)
        if self.shared is not None:
            with jax.named_scope("shared"):
                y = y + self.shared(x_BTD)
        aux = {
            "load": jnp.bincount(idx.reshape(-1), length=self.n_experts).astype(jnp.float32),
            "balance_loss": sequence_balance_loss(s.reshape(B, T, -1), idx.reshape(B, T, -1), self.n_experts),
        }
        return y, aux
