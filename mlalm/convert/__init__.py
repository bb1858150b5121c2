"""Converting MHA/GQA/MQA models to MLA (TransMLA, arXiv 2502.07864; MHA2MLA, arXiv 2502.14837).

``convert(SRC, OUT, kv_lora_rank=R)`` (``scripts/convert_to_mla.py``) reads any checkpoint
``mlalm.inference.load_for_inference`` accepts, or a Llama/Mistral transformers directory
(``mlalm.llama``), replaces every attention layer by MLA with latent rank R and a shared
rope key of width P (``mlalm.convert.mla`` has the maths), and writes a params export that
eval.py, scripts/generate.py, scripts/export.py and ``train.init_from`` read.  The
converted model has ``attention.kv_latent_norm=false``: DeepSeek's RMSNorm on the latent
is no linear map, so a conversion that must reproduce the source cannot have it.

Exact and approximate (KV cache per token per layer, docs/architecture.md section 4):
  * MQA (one kv head of width H) -> MLA with P = H, R = H is exact: the shared rope key is
    MQA's key (d_n = 0) and the latent factors MQA's value.  The cache stays 2H elements
    (R + P = H + H, MQA's 2·H): exactness keeps its size; R < H (an SVD of W_v) or P < H
    shrink it to R + P and approximate.
  * GQA/MHA (K > 1 kv heads) -> MLA caches R + P instead of 2·K·H.  The latent is exact at
    the largest rank (``mla.max_rank``, min(D, 2KH - P)); the one shared rope key cannot
    turn every head's key by its own RoPE, so the key parts left out of it lose their
    rotation: exact only where that residual vanishes (MQA, or kv heads whose keys are
    all proportional), else an approximation a short fine-tune (``train.init_from=OUT``)
    recovers (the papers: well under 1% of the pretraining tokens).

Each layer's kept energy (the latent's share of the keys' and values' squared singular
values, and the share of the keys' energy that keeps its rotation) is printed and stored
in the export's ``mlalm_params.json`` under ``conversion``.
"""

from __future__ import annotations

import os

import numpy as np

from mlalm.convert.mla import METHODS, LayerResult, RopePlan, convert_layer, max_rank, rope_plan
from mlalm.convert.model import check_request, convert_model, input_moments, mla_config
from mlalm.errors import CheckpointError, ConfigError

__all__ = [
    "METHODS",
    "LayerResult",
    "RopePlan",
    "check_request",
    "convert",
    "convert_layer",
    "convert_model",
    "input_moments",
    "max_rank",
    "mla_config",
    "rope_plan",
]


def convert(
    src: str,
    out: str,
    *,
    kv_lora_rank: int,
    rope_dim: int | None = None,
    method: str = "transmla",
    dtype: str = "float32",
    calibration: str | None = None,
    calibration_tokens: int = 8192,
    log=print,
) -> dict:
    """Convert the model at ``src`` to MLA and write a params export to ``out``.

    Args:
        src: a run directory, checkpoint step directory, params export, or Llama/Mistral
            transformers directory (with its tokenizer.json).
        out: a new (or empty) directory.
        kv_lora_rank, rope_dim, method: see :func:`convert_model`.
        dtype: the export's parameter dtype ('float32' or 'bfloat16').
        calibration: a text file whose first ``calibration_tokens`` tokens (in windows of
            ``train.seq_len``) give each layer's input second moment (None: the identity,
            the weights alone).
        log: called with the progress and per-layer lines.

    Returns:
        the ``conversion`` record stored in the export's mlalm_params.json.

    Raises:
        ConfigError, CheckpointError, DataError: one line, before anything is written
        (an unconvertible source or request, a non-empty ``out``).
    """
    from mlalm.convert.files import calibration_batch, load_source, source_config, write_export
    from mlalm.model import kv_cache_bytes_per_token_per_layer

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r} is not float32 or bfloat16")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new directory")
    P = check_request(source_config(src), kv_lora_rank, rope_dim, method)  # before the weights are read
    model, cfg, tokenizer = load_source(src)
    a = cfg.attention
    log(
        f"source: {a.kind}, {a.n_heads} heads, {cfg.n_kv_heads} kv heads of width {a.head_dim}, "
        f"{cfg.model.n_layers} layers; method {method}, kv_lora_rank {kv_lora_rank}, rope dim {P}"
    )
    moments = None
    if calibration is not None:
        seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
        tokens = calibration_batch(calibration, tokenizer, n_tokens=calibration_tokens, seq_len=seq_len)
        log(f"calibration: {tokens.size} tokens of {calibration}")
        # damped by 1% of the mean diagonal, as TransMLA's PCA: directions the calibration
        # text never excites still count a little
        moments = [
            m + 0.01 * np.mean(np.diag(m)) * np.eye(len(m)) if m is not None else None
            for m in input_moments(model, tokens)
        ]
    new, new_cfg, report = convert_model(
        model, cfg, kv_lora_rank=kv_lora_rank, rope_dim=P, method=method, moments=moments, log=log
    )
    elements = {  # KV cache elements per token per layer (docs/architecture.md section 4)
        "source": kv_cache_bytes_per_token_per_layer(cfg, dtype_bytes=1),
        "mla": kv_cache_bytes_per_token_per_layer(new_cfg, dtype_bytes=1),
    }
    record = {
        "conversion": {
            "method": method,
            "kv_lora_rank": kv_lora_rank,
            "rope_dim": P,
            "qk_nope_head_dim": new_cfg.attention.qk_nope_head_dim,
            "calibration": os.path.abspath(calibration) if calibration else None,
            "source_attention": {
                "kind": a.kind,
                "n_heads": a.n_heads,
                "n_kv_heads": cfg.n_kv_heads,
                "head_dim": a.head_dim,
            },
            "kv_cache_elements_per_token_per_layer": elements,
            **report,
        }
    }
    log(
        f"KV cache per token per layer: {elements['source']} -> {elements['mla']} elements "
        f"({elements['mla'] / elements['source']:.1%})"
    )
    write_export(out, new, new_cfg, tokenizer, dtype=dtype, source=src, meta=record)
    log(f"wrote {out}")
    return record["conversion"]
