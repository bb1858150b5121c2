"""One attention layer, MHA/GQA/MQA -> MLA, in float64 numpy (see ``mlalm.convert``).

Source layer (``mlalm.model.attention.MultiHeadAttention``): N query heads, K kv heads
(query head n reads kv head g(n) = n // (N/K)), head width H, weights
``wq_DNH``, ``wk_DKH``, ``wv_DKG`` (G = H), ``wo_NGD``; RoPE in the half layout, so
frequency f (θ^(-2f/H), f < H/2) rotates the pair of features (f, f + H/2).

Target (``MLAttention``, no q LoRA, ``kv_latent_norm`` off): rope width P, latent rank R,
nope width d_n, value width G.

1. The shared rope key.  MLA has ONE rope key of width P for all heads, and its slot m
   (features m, m + P/2) turns with θ^(-2m/P) = the source's frequency m·c, c = H/P (so P
   must divide H: the slots can only carry the source frequencies 0, c, 2c, ...).  Slot m
   holds k_pe_m = Σ_a u_a k_a, a unit-vector combination of candidate 2-d key pairs a =
   (g, f).  Because every pair of one frequency turns by the same angle, and u mixes pairs
   with one real coefficient, for any orthogonal U with first row u the score of head n
   splits exactly (U's columns are orthonormal):

       Σ_f q_nf·k_gf = (Σ_f u_(g,f) q_nf)·k_pe + Σ_f q_nf·(k_gf - u_(g,f) k_pe)

   MLA turns the first term by RoPE (q_pe = Σ_f u_(g,f) q_nf, exact for the slot's own
   frequency) and leaves the second, the per-group residual key, unturned (the nope part).
   That is the whole approximation of step 1; it vanishes when the residual does.
   * method 'transmla' (TransMLA, arXiv 2502.07864 v5, the method's "RoRoPE" and "FreqFold"): the
     candidates are every kv head's pairs of the c frequencies [m·c, (m+1)·c) folded into
     slot m, and u is the principal direction of their keys (top eigenvector of the
     K·c x K·c key covariance, real and imaginary parts pooled: the PCA that commutes with
     RoPE), so the slot keeps the largest share of positional energy one key can keep.
   * method 'mha2mla' (MHA2MLA, arXiv 2502.14837, section 3.1, partial RoPE by the
     "2-norm" criterion): each slot keeps the kv head g whose pair at frequency m·c
     contributes most, ||k_g,f|| · Σ_{n in g} ||q_n,f||; every other frequency and head
     loses RoPE.  (MHA2MLA keeps r frequencies per head; one key shared by all heads can
     hold one head per frequency.)
   Norms and covariances are second moments E[x xᵀ] of the layer's input: the identity
   by default (the weights alone), or measured on calibration text (the papers use data).

2. The latent (MHA2MLA section 3.2, "SVD_joint"; TransMLA's balanced key-value "BKV"): the residual
   keys and the values of all kv heads are one map W = [k_nope_1, v_1, ..., k_nope_K, v_K]
   of h (D x K(d_n + G)).  Its rank is at most min(D, K·H - P + K·G) (the residual keys
   span K·H - P directions): the largest R the method allows; R = that is exact.  A rank-R
   factorisation W ≈ A B from the SVD of M^(1/2) W = U Σ Vᵀ: A = W V_R Σ_R^(-1/2),
   B = Σ_R^(1/2) V_Rᵀ (M = I: A = U_R Σ_R^(1/2), MHA2MLA's split), which keeps the fraction
   Σ_{r<R} σ_r² / Σ σ_r² of the energy.  'transmla' first scales the key columns so that
   keys and values have equal mean energy (BKV) and scales B's key rows back.

3. The query is scaled by sqrt((d_n + P) / H): MLA's softmax scale is (d_n + P)^-1/2, the
   source's H^-1/2.  The output projection is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("transmla", "mha2mla")


def max_rank(d_model: int, n_kv_heads: int, head_dim: int, rope_dim: int) -> int:
    """The largest kv_lora_rank a conversion can use: the rank bound of the joint map,
    min(D, K·H - P + K·G) with G = H."""
    return min(d_model, 2 * n_kv_heads * head_dim - rope_dim)


@dataclass(frozen=True)
class LayerResult:
    """The MLA weights of one layer (float64) and what the conversion kept.

    wq_DNH [D, N, d_n + P], wkv_a_DJ [D, R + P], wkv_b_RNU [R, N, d_n + G], wo_NGD [N, G, D].
    kv_energy: fraction of the joint key-residual/value energy the rank-R latent keeps.
    rope_energy: fraction of the key energy that keeps its rotation (in the rope key).
    """

    wq_DNH: np.ndarray
    wkv_a_DJ: np.ndarray
    wkv_b_RNU: np.ndarray
    wo_NGD: np.ndarray
    kv_energy: float
    rope_energy: float


def _gram(a_DX, b_DY, moment_DD):
    """E[(h·a)(h·b)] for the columns of a and b: aᵀ M b (M = I when None)."""
    return a_DX.T @ b_DY if moment_DD is None else a_DX.T @ moment_DD @ b_DY


@dataclass(frozen=True)
class RopePlan:
    """Step 1's choice for one layer: per slot m (candidate pairs [(g, f)], unit vector u
    over them), and per kv head the features whose residual key is not identically zero
    (a pair taken whole into the rope key, u = ±e_a, leaves k - k = 0)."""

    slots: tuple
    keep: tuple

    @property
    def nope_dim(self) -> int:
        """The nope width this layer needs: its widest kv head's residual."""
        return max(len(k) for k in self.keep)


def rope_plan(wq_DNH, wk_DKH, rope_dim: int, method: str = "transmla", moment_DD=None) -> RopePlan:
    """Which key pairs the shared rope key of width ``rope_dim`` holds (module docstring, 1)."""
    N, H, K, P = wq_DNH.shape[1], wq_DNH.shape[2], wk_DKH.shape[1], rope_dim
    c, half = H // P, H // 2
    group = np.arange(N) // (N // K)
    slots, gone = [], [set() for _ in range(K)]
    for m in range(P // 2):
        freqs = range(m * c, (m + 1) * c) if method == "transmla" else [m * c]
        cands = [(g, f) for f in freqs for g in range(K)]
        re = np.stack([wk_DKH[:, g, f] for g, f in cands], axis=1)  # [D, n]: the pair's two features
        im = np.stack([wk_DKH[:, g, f + half] for g, f in cands], axis=1)
        if method == "transmla":
            cov = _gram(re, re, moment_DD) + _gram(im, im, moment_DD)
            vals, vecs = np.linalg.eigh(cov)
            u = vecs[:, np.argmax(vals)]
            u = u * np.sign(u[np.argmax(np.abs(u))])  # a fixed sign: the conversion is deterministic
        else:
            k_norm = np.sqrt(np.diag(_gram(re, re, moment_DD)) + np.diag(_gram(im, im, moment_DD)))
            q_norm = np.zeros(K)
            for n in range(N):
                q = wq_DNH[:, n, [m * c, m * c + half]]
                q_norm[group[n]] += np.sqrt(np.trace(_gram(q, q, moment_DD)))
            u = np.zeros(len(cands))
            u[int(np.argmax(k_norm * q_norm))] = 1.0
        if np.count_nonzero(u) == 1:
            g, f = cands[int(np.flatnonzero(u)[0])]
            gone[g] |= {f, f + half}
        slots.append((tuple(cands), u))
    keep = tuple(tuple(d for d in range(H) if d not in gone[g]) for g in range(K))
    return RopePlan(tuple(slots), keep)


def _factor(w_DC, rank: int, moment_DD):
    """(A [D, R], B [R, C], kept energy fraction): the rank-R SVD factorisation of
    M^(1/2) W mapped back (A = W V_R Σ^(-1/2), B = Σ^(1/2) V_Rᵀ)."""
    if moment_DD is None:
        white = w_DC
    else:
        lam, Q = np.linalg.eigh(moment_DD)
        white = (np.sqrt(np.clip(lam, 0.0, None))[:, None] * Q.T) @ w_DC
    _, sigma, vt = np.linalg.svd(white, full_matrices=False)
    total = float(np.sum(sigma**2))
    kept = float(np.sum(sigma[:rank] ** 2)) / total if total > 0 else 1.0
    vt_R = np.zeros((rank, w_DC.shape[1]))
    vt_R[: min(rank, len(sigma))] = vt[:rank]
    s = np.ones(rank)
    s[: min(rank, len(sigma))] = np.sqrt(np.where(sigma[:rank] > 0, sigma[:rank], 1.0))
    return (w_DC @ vt_R.T) / s[None, :], s[:, None] * vt_R, kept


def convert_layer(
    wq_DNH,
    wk_DKH,
    wv_DKG,
    wo_NGD,
    *,
    rank: int,
    plan: RopePlan,
    nope_dim: int | None = None,
    method: str = "transmla",
    moment_DD=None,
) -> LayerResult:
    """One MHA/GQA/MQA layer as MLA (see the module docstring).  Arrays are float64 numpy;
    ``plan`` is the layer's :func:`rope_plan`; ``nope_dim`` (>= ``plan.nope_dim``, default
    it) is the model's d_n, the nope features past a kv head's own being zero;
    ``moment_DD`` is the second moment E[h hᵀ] of the layer's input (None: identity).
    The caller checks ``rank`` and the rope width (``mlalm.convert.check_request``)."""
    D, N, H = wq_DNH.shape
    K, G = wk_DKH.shape[1], wv_DKG.shape[2]
    P, dn = 2 * len(plan.slots), plan.nope_dim if nope_dim is None else nope_dim
    assert dn >= plan.nope_dim, (dn, plan.nope_dim)
    half, group = H // 2, np.arange(N) // (N // K)
    # -- 1. the shared rope key, the query's rope part and the residual keys ---------------
    wkpe_DP = np.zeros((D, P))
    wqpe_DNP = np.zeros((D, N, P))
    wres_DKH = wk_DKH.copy()
    for m, (cands, u) in enumerate(plan.slots):
        for slot, off in ((m, 0), (m + P // 2, half)):
            wkpe_DP[:, slot] = sum(u_a * wk_DKH[:, g, f + off] for u_a, (g, f) in zip(u, cands))
            for n in range(N):
                wqpe_DNP[:, n, slot] = sum(
                    u_a * wq_DNH[:, n, f + off] for u_a, (g, f) in zip(u, cands) if g == group[n]
                )
            for u_a, (g, f) in zip(u, cands):
                wres_DKH[:, g, f + off] -= u_a * wkpe_DP[:, slot]
    key_energy = float(np.trace(_gram(wk_DKH.reshape(D, -1), wk_DKH.reshape(D, -1), moment_DD)))
    rope_energy = float(np.trace(_gram(wkpe_DP, wkpe_DP, moment_DD))) / key_energy if key_energy > 0 else 1.0
    # the nope features: each kv head's non-vanishing residual, zero-padded to d_n
    wknope_DKd = np.zeros((D, K, dn))
    wqnope_DNd = np.zeros((D, N, dn))
    for g, keep in enumerate(plan.keep):
        wknope_DKd[:, g, : len(keep)] = wres_DKH[:, g, list(keep)]
    for n in range(N):
        keep = list(plan.keep[group[n]])
        wqnope_DNd[:, n, : len(keep)] = wq_DNH[:, n, keep]
    # -- 2. the joint low-rank latent -------------------------------------------------------
    joint_DKU = np.concatenate([wknope_DKd, wv_DKG], axis=2)  # per kv head: k_nope, then v
    ratio = 1.0
    if method == "transmla" and dn:  # BKV: equal mean energy per key and value feature
        k_e = np.trace(_gram(wknope_DKd.reshape(D, -1), wknope_DKd.reshape(D, -1), moment_DD))
        v_e = np.trace(_gram(wv_DKG.reshape(D, -1), wv_DKG.reshape(D, -1), moment_DD))
        n_k = sum(len(k) for k in plan.keep)  # the residual's features (not the zero padding)
        ratio = float(np.sqrt((k_e / n_k) / (v_e / (K * G)))) if k_e > 0 and v_e > 0 else 1.0
        joint_DKU[:, :, :dn] /= ratio
    a_DR, b_RC, kv_energy = _factor(joint_DKU.reshape(D, -1), rank, moment_DD)
    b_RKU = b_RC.reshape(rank, K, dn + G)
    b_RKU[:, :, :dn] *= ratio
    # -- 3. assemble: heads read their kv head's columns; the query absorbs the new scale ---
    scale = np.sqrt((dn + P) / H)
    return LayerResult(
        wq_DNH=scale * np.concatenate([wqnope_DNd, wqpe_DNP], axis=2),
        wkv_a_DJ=np.concatenate([a_DR, wkpe_DP], axis=1),
        wkv_b_RNU=b_RKU[:, group, :],
        wo_NGD=np.asarray(wo_NGD, np.float64),
        kv_energy=kv_energy,
        rope_energy=rope_energy,
    )
