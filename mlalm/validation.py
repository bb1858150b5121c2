"""Validation of a Config: every value that cannot work, or cannot work with another,
is a ConfigError naming the key and what would be valid -- raised in milliseconds, never
after minutes of compilation.  ``mlalm.config.from_dict`` calls :func:`validate`."""

from __future__ import annotations

import math
import os

from mlalm.errors import ConfigError


def _positive(cfg, keys: list[str]):
    for key in keys:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v is not None and v <= 0:
            raise ConfigError(f"{key} must be positive, got {v}")


def validate(cfg) -> None:
    """Raise ConfigError for values that cannot work together."""
    m, a, e, o, t = cfg.model, cfg.attention, cfg.moe, cfg.optim, cfg.train
    _positive(
        cfg,
        [
            "model.vocab_size",
            "model.d_model",
            "model.n_layers",
            "model.ffn_dim",
            "model.max_seq_len",
            "model.norm_eps",
            "model.rope_theta",
            "attention.n_heads",
            "attention.head_dim",
            "train.steps",
            "train.batch_size",
            "train.seq_len",
            "train.grad_accum",
            "train.log_every",
            "train.eval_every",
            "optim.lr",
            "moe.expert_ffn_dim",
            "moe.n_group",
            "moe.topk_group",
            "moe.capacity_factor",
            "data.bpe_vocab_size",
        ],
    )
    if a.kind == "gqa":
        if a.n_kv_heads is None:
            raise ConfigError("attention.n_kv_heads must be set for attention.kind=gqa")
        if a.n_kv_heads <= 0 or a.n_heads % a.n_kv_heads:
            raise ConfigError(
                f"attention.n_heads ({a.n_heads}) must be divisible by attention.n_kv_heads "
                f"({a.n_kv_heads}); valid n_kv_heads: "
                f"{[d for d in range(1, a.n_heads + 1) if a.n_heads % d == 0]}"
            )
    elif a.n_kv_heads is not None and a.kind in ("mha", "mqa"):
        want = a.n_heads if a.kind == "mha" else 1
        if a.n_kv_heads != want:
            raise ConfigError(
                f"attention.n_kv_heads={a.n_kv_heads} contradicts attention.kind={a.kind} "
                f"(which has {want}); use kind=gqa or drop n_kv_heads"
            )
    if a.kind in ("mha", "gqa", "mqa") and a.head_dim % 2:
        raise ConfigError(f"attention.head_dim must be even for rotary embeddings, got {a.head_dim}")
    if a.kind == "mla":
        _positive(cfg, ["attention.kv_lora_rank", "attention.qk_rope_head_dim", "attention.v_head_dim"])
        if a.qk_nope_head_dim < 0 or a.q_lora_rank < 0:
            raise ConfigError("attention.qk_nope_head_dim and attention.q_lora_rank must be >= 0")
        if a.qk_rope_head_dim % 2:
            raise ConfigError(
                f"attention.qk_rope_head_dim must be even for rotary embeddings, got {a.qk_rope_head_dim}"
            )
    if e.n_routed_experts < 0 or e.n_shared_experts < 0:
        raise ConfigError("moe.n_routed_experts and moe.n_shared_experts must be >= 0")
    if e.n_routed_experts > 0:
        if not 1 <= e.top_k <= e.n_routed_experts:
            raise ConfigError(
                f"moe.top_k={e.top_k} must be between 1 and moe.n_routed_experts={e.n_routed_experts}"
            )
        if e.n_routed_experts % e.n_group:
            raise ConfigError(
                f"moe.n_routed_experts={e.n_routed_experts} must be divisible by moe.n_group={e.n_group}"
            )
        if e.topk_group > e.n_group:
            raise ConfigError(f"moe.topk_group={e.topk_group} must be <= moe.n_group={e.n_group}")
        per_group = e.n_routed_experts // e.n_group
        if e.n_group > 1 and per_group < 2:
            raise ConfigError(
                f"group-limited routing scores a group by its top-2 experts: moe.n_routed_experts/"
                f"moe.n_group must be >= 2, got {per_group}"
            )
        if e.top_k > e.topk_group * per_group:
            raise ConfigError(
                f"moe.top_k={e.top_k} exceeds the experts reachable in moe.topk_group="
                f"{e.topk_group} groups of {per_group}"
            )
        if e.scoring == "softmax" and e.n_group > 1:
            raise ConfigError("moe.n_group > 1 (group-limited routing) needs moe.scoring=sigmoid")
        if not 0 <= e.first_k_dense_replace <= m.n_layers:
            raise ConfigError(
                f"moe.first_k_dense_replace={e.first_k_dense_replace} must be in "
                f"[0, model.n_layers={m.n_layers}]"
            )
    if e.bias_update_rate < 0 or e.seq_aux_loss_coef < 0:
        raise ConfigError("moe.bias_update_rate and moe.seq_aux_loss_coef must be >= 0")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} is above model.max_seq_len={m.max_seq_len}; "
            f"lower train.seq_len or raise model.max_seq_len"
        )
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}"
        )
    if not 0 <= o.warmup_steps:
        raise ConfigError("optim.warmup_steps must be >= 0")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError("optim.b1 and optim.b2 must be in [0, 1)")
    if o.clip_norm < 0 or o.weight_decay < 0:
        raise ConfigError("optim.clip_norm and optim.weight_decay must be >= 0")
    _validate_muon(o)
    _validate_data(cfg)
    if o.eps <= 0:
        raise ConfigError(f"optim.eps must be positive (it keeps Adam's division finite), got {o.eps}")
    for key in ("eval_batches", "final_eval_batches"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0 (0: the whole split), got {getattr(t, key)}")
    if t.max_consecutive_skips < 1:
        raise ConfigError(f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
    if m.mtp_depth < 0:
        raise ConfigError(f"model.mtp_depth must be >= 0 (0: no multi-token prediction), got {m.mtp_depth}")
    if m.mtp_depth >= t.seq_len:
        raise ConfigError(
            f"model.mtp_depth={m.mtp_depth} leaves no position to predict in train.seq_len={t.seq_len} "
            f"tokens: depth k predicts the token k + 1 ahead, so it must be below train.seq_len"
        )
    if t.mtp_loss_weight < 0:
        raise ConfigError(f"train.mtp_loss_weight must be >= 0, got {t.mtp_loss_weight}")
    if t.loss_chunk < 0:
        raise ConfigError(f"train.loss_chunk must be >= 0 (0: plain logits), got {t.loss_chunk}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError(
            f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got "
            f"{cfg.checkpoint.every} and {cfg.checkpoint.keep}"
        )
    if not t.resume:
        raise ConfigError("train.resume must be 'auto', 'never' or a checkpoint path")
    mesh = cfg.mesh
    sizes = [mesh.data, mesh.fsdp, mesh.tensor, mesh.expert]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(
            f"mesh sizes must be positive with at most one -1 ('the rest'), got "
            f"data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor} expert={mesh.expert}"
        )


def _validate_data(cfg) -> None:
    d = cfg.data
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if d.tokenizer not in ("byte", "bpe") and not os.path.exists(d.tokenizer):
        raise ConfigError(
            f"data.tokenizer: {d.tokenizer!r} is not 'byte', 'bpe' or the path of an existing tokenizer.json"
        )
    if d.tokenizer == "bpe" and d.bpe_vocab_size < 260:
        raise ConfigError("data.bpe_vocab_size must be at least 260 (256 bytes + specials)")
    if d.eos_token is not None and not d.eos_token:
        raise ConfigError("data.eos_token must be a token name such as '</s>', or null")
    if not d.text_key:
        raise ConfigError("data.text_key must name a JSON field or parquet column, e.g. 'text'")
    for key in ("prepare_workers", "num_workers", "prefetch"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {getattr(d, key)}")
    if d.shard_mb < 1:
        raise ConfigError(f"data.shard_mb must be >= 1, got {d.shard_mb}")
    from mlalm.utils import parse_size  # no Grain or tokenizers import

    parse_size(d.max_memory, key="data.max_memory")
    if d.mix is not None:
        if d.path is not None:
            raise ConfigError("data.mix and data.path exclude each other: list every source in data.mix")
        if not d.mix:
            raise ConfigError("data.mix is empty; expected [{path: DIR, weight: w}, ...] or null")
        for i, entry in enumerate(d.mix):
            if not isinstance(entry, dict) or set(entry) != {"path", "weight"}:
                raise ConfigError(f"data.mix[{i}]: expected {{path: DIR, weight: w}}, got {entry!r}")
            if not isinstance(entry["path"], str) or not entry["path"]:
                raise ConfigError(f"data.mix[{i}].path: expected a path, got {entry['path']!r}")
            w = entry["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"data.mix[{i}].weight: expected a positive finite number, got {w!r}")


def _validate_muon(o) -> None:
    if o.ns_steps < 1:
        raise ConfigError(f"optim.ns_steps must be >= 1, got {o.ns_steps}")
    if not 0 <= o.muon_momentum < 1:
        raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
    if o.qk_clip_tau is not None and o.qk_clip_tau <= 0:
        raise ConfigError(f"optim.qk_clip_tau must be positive, got {o.qk_clip_tau}")
    if o.muon_lr <= 0:
        raise ConfigError(f"optim.muon_lr must be positive, got {o.muon_lr}")
    if not 0 <= o.normuon_beta2 < 1:
        raise ConfigError(f"optim.normuon_beta2 must be in [0, 1), got {o.normuon_beta2}")
    if o.muon_variant == "polar_express" and tuple(o.ns_coeffs) != (3.4445, -4.7750, 2.0315):
        raise ConfigError(
            "optim.ns_coeffs and optim.muon_variant=polar_express both choose the Newton-Schulz "
            "coefficients; set one of them"
        )
    if o.adam_lr is not None and o.adam_lr <= 0:
        raise ConfigError(f"optim.adam_lr must be positive, got {o.adam_lr}")
    coeffs = o.ns_coeffs
    sets = [coeffs] if coeffs and not isinstance(coeffs[0], (list, tuple)) else list(coeffs)
    if not sets:
        raise ConfigError("optim.ns_coeffs is empty; expected [a, b, c] or a list of such triples")
    for triple in sets:
        if len(triple) != 3 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in triple
        ):
            raise ConfigError(f"optim.ns_coeffs: {list(triple)} is not three finite numbers [a, b, c]")
        a, b, c = triple
        # The iteration must map singular values in (0, 1] to positive values, else it
        # flips signs instead of orthogonalising.
        worst = min(a * x + b * x**3 + c * x**5 for x in (i / 200 for i in range(1, 201)))
        if a <= 0 or worst <= 0:
            raise ConfigError(
                f"optim.ns_coeffs: {list(triple)} does not orthogonalise (p(x) = a x + b x^3 + c x^5 "
                f"must be positive on (0, 1]; e.g. the default [3.4445, -4.775, 2.0315])"
            )
    if len(sets) > 1 and len(sets) < o.ns_steps:
        raise ConfigError(f"optim.ns_coeffs has {len(sets)} triples, fewer than optim.ns_steps={o.ns_steps}")
