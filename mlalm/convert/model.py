"""A whole model MHA/GQA/MQA -> MLA: every block's attention by ``mlalm.convert.mla``, the
rest (embedding, norms, dense or MoE feed-forward, head, MTP modules) copied unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.config import Config, from_dict
from mlalm.convert.mla import METHODS, convert_layer, max_rank, rope_plan
from mlalm.errors import ConfigError


def check_request(cfg: Config, kv_lora_rank: int, rope_dim: int | None, method: str) -> int:
    """The rope width to use (default: the head width) for converting ``cfg``'s model;
    ConfigError (one line) when the source or the request cannot be converted."""
    a = cfg.attention
    if a.kind == "mla":
        raise ConfigError("the source model is already MLA (attention.kind=mla); nothing to convert")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    H, K, D = a.head_dim, cfg.n_kv_heads, cfg.model.d_model
    P = H if rope_dim is None else rope_dim
    if P <= 0 or P % 2 or P > H or H % P:
        raise ConfigError(
            f"--rope-dim {P}: must be even, at most the head dim {H} and divide it (the shared rope key "
            f"turns with the frequencies θ^(-2m/P), the source's frequencies m·H/P only when P divides H); "
            f"valid: {[p for p in range(2, H + 1, 2) if H % p == 0]}"
        )
    top = max_rank(D, K, H, P)
    if not 1 <= kv_lora_rank <= top:
        raise ConfigError(
            f"--kv-lora-rank {kv_lora_rank}: must be between 1 and {top} = min(d_model {D}, "
            f"2·n_kv_heads·head_dim - rope_dim = {2 * K * H - P}), the rank of the keys and values it factors"
        )
    return P


def mla_config(cfg: Config, *, kv_lora_rank: int, rope_dim: int, nope_dim: int) -> Config:
    """``cfg`` with MLA attention of the converted shapes: no q LoRA, value width = the
    source's head width, no latent norm (what an exact conversion needs)."""
    a = cfg.attention
    raw = {
        "attention": dict(
            kind="mla",
            n_heads=a.n_heads,
            n_kv_heads=None,
            q_lora_rank=0,
            kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=nope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=a.head_dim,
            kv_latent_norm=False,
        )
    }
    return from_dict(raw, base=cfg)


def _f64(var) -> np.ndarray:
    return np.asarray(jnp.asarray(var[...], jnp.float32), np.float64)


def convert_model(
    model,
    cfg: Config,
    *,
    kv_lora_rank: int,
    rope_dim: int | None = None,
    method: str = "transmla",
    moments: list | None = None,
    log=None,
):
    """Convert every attention layer of an MHA/GQA/MQA model (MTP blocks included) to MLA.

    Args:
        kv_lora_rank: R, the latent width; at most ``mlalm.convert.mla.max_rank``.
        rope_dim: P, the shared rope key's width (default the head width, every frequency).
        method: 'transmla' (RoRoPE + FreqFold + BKV) or 'mha2mla' (2-norm partial RoPE +
            joint SVD); see ``mlalm.convert.mla``.
        moments: per block (``model.all_blocks()`` order) the second moment [D, D] of its
            attention input, or None entries / None for the identity (:func:`input_moments`).
        log: called with one line per layer (e.g. ``print``).

    Returns:
        (model, cfg, report): the MLA model (parameters in the source's param_dtype), its
        config, and {'layers': [{'layer', 'kv_energy_kept', 'rope_energy_kept'}, ...]}.
    """
    from mlalm.model import Transformer

    P = check_request(cfg, kv_lora_rank, rope_dim, method)
    blocks = model.all_blocks()
    moments = moments or [None] * len(blocks)
    weights = [
        tuple(_f64(getattr(b.attn, k)) for k in ("wq_DNH", "wk_DKH", "wv_DKG", "wo_NGD")) for b in blocks
    ]
    plans = [rope_plan(w[0], w[1], P, method, m) for w, m in zip(weights, moments)]
    dn = max(p.nope_dim for p in plans)
    new_cfg = mla_config(cfg, kv_lora_rank=kv_lora_rank, rope_dim=P, nope_dim=dn)
    new = Transformer(new_cfg, rngs=nnx.Rngs(0))
    # everything but attention: copied by path (MoE biases and MTP modules included)
    src_flat = dict(nnx.to_flat_state(nnx.state(model)))
    dst_state = nnx.state(new)
    for path, var in nnx.to_flat_state(dst_state):
        if "attn" not in path:
            var.set_value(src_flat[path].get_value())
    nnx.update(new, dst_state)
    layers = []
    for i, (block, w, plan, m) in enumerate(zip(new.all_blocks(), weights, plans, moments)):
        res = convert_layer(*w, rank=kv_lora_rank, plan=plan, nope_dim=dn, method=method, moment_DD=m)
        for name in ("wq_DNH", "wkv_a_DJ", "wkv_b_RNU", "wo_NGD"):
            var = getattr(block.attn, name)
            var.set_value(jnp.asarray(getattr(res, name), var[...].dtype))
        layers.append({"layer": i, "kv_energy_kept": res.kv_energy, "rope_energy_kept": res.rope_energy})
        if log:
            log(
                f"layer {i}: kv energy kept {100 * res.kv_energy:.2f}% (rank {kv_lora_rank}), "
                f"key energy kept under RoPE {100 * res.rope_energy:.2f}%"
            )
    return new, new_cfg, {"layers": layers}


def input_moments(model, tokens_BT) -> list:
    """Per block of ``model.all_blocks()``, E[h hᵀ] [D, D] (float64) of its attention
    input h = attn_norm(x) over the tokens of ``tokens_BT`` (int [B, T]); None for the MTP
    blocks (their input needs the next tokens: the identity is used there)."""
    from mlalm.model.layers import rope_tables

    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_tables(positions, model.rope_dim, model.cfg.model.rope_theta)
    x = model.embed_VD[...].astype(model.dtype)[jnp.asarray(tokens_BT)]
    out = []
    for block in model.blocks:
        h = np.asarray(jnp.asarray(block.attn_norm(x), jnp.float32), np.float64).reshape(B * T, -1)
        out.append(h.T @ h / (B * T))
        x = jax.block_until_ready(block(x, cos, sin)[0])
    return out + [None] * model.mtp_depth
