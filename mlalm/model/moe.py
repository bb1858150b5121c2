"""DeepSeekMoE: fine-grained routed experts + always-on shared experts.

Router (DeepSeek-V3): s = sigmoid(x W_g) in float32 (V2: softmax).  Experts are *chosen*
by s + b, where b is the auxiliary-loss-free balancing bias, optionally restricted to the
topk_group best of n_group groups (a group scores the sum of its two best experts).  The
gate weights are the *unbiased* s of the chosen experts, normalised to sum 1 when
norm_topk_prob, times routed_scaling_factor.  After each step the train loop moves the
bias with :func:`balance_bias_update`; it has no gradient and no optimizer.

Dispatch runs every expert as one batched matmul:
  * ``dropless``: sort the N·k (token, expert) pairs by expert and run a grouped matmul
    (``jax.lax.ragged_dot``); no token is ever dropped.
  * ``capacity``: gather each expert's first C = ceil(cf·N·k/E) tokens into [E, C, D] and
    run plain batched einsums; pairs past an expert's capacity are dropped (the residual
    and the shared experts still carry those tokens).  With C >= N·k it equals dropless.
"""

from __future__ import annotations

import dataclasses
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
    """``moe.dispatch=auto``: capacity dispatch on CPU, where jax.lax.ragged_dot's fallback
    costs E times the FLOPs; dropless (sort + ragged_dot) on accelerators."""
    if dispatch == "auto":
        return "capacity" if jax.default_backend() == "cpu" else "dropless"
    return dispatch


def dispatch_dropless(x_ND, idx_Nk, w_Nk, w_gate_EDF, w_up_EDF, w_down_EFD):
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
