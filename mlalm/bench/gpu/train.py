"""Stages ``train_dense`` and ``train_moe``: the training step of the GPU bench models
(``configs/bench_gpu_dense.yaml``: ~130M parameters; ``configs/bench_gpu.yaml``: MLA +
MoE with the same ~130M active parameters; bf16 compute, float32 parameters, AdamW,
batch 32 x 1024) with ``attention.impl=xla`` and ``pallas``, each in its own process so
that ``peak_bytes_in_use`` is its own.  Timing: ``mlalm.bench.train_step.measure`` (the
step train.py runs, median of the timed steps after warm-up).

MFU = model FLOPs per token (``mlalm.flops``: 6 x active matmul parameters + attention
products over the full T x T scores, PaLM's convention, as scripts/bench.py reports it)
x tokens/s / peak, the peak being the data-sheet dense bf16 figure (H100 SXM and H200:
989 TFLOP/s); a bf16 8192^3 matmul measured in the same process gives the attainable
rate beside it.  ``mfu_causal`` counts the attention products once over the causal half.
"""

from __future__ import annotations

import os
from typing import Any

from mlalm.bench.gpu.common import log

PARTS = ("xla", "pallas")
CONFIGS = {"train_dense": "bench_gpu_dense.yaml", "train_moe": "bench_gpu.yaml"}

# The dry run: the same config files shrunk to a one-layer model XLA's CPU backend
# compiles in seconds, in float32 (it compiles bfloat16 programs about twice as slowly;
# bfloat16 training on CPU is the bf16_convergence stage's and tests/test_bf16.py's job).
_DRY = [
    "model.vocab_size=256",
    "model.d_model=32",
    "model.n_layers=1",
    "model.ffn_dim=64",
    "model.max_seq_len=64",
    "model.dtype=float32",
    "attention.n_heads=2",
    "attention.q_lora_rank=16",
    "attention.kv_lora_rank=16",
    "attention.qk_nope_head_dim=8",
    "attention.qk_rope_head_dim=8",
    "attention.v_head_dim=8",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.loss_chunk=64",
]
_DRY_MOE = ["moe.n_routed_experts=4", "moe.expert_ffn_dim=16", "moe.first_k_dense_replace=0"]


def config_path(name: str) -> str:
    """``configs/NAME`` of the repository this package was imported from."""
    import mlalm

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mlalm.__file__))), "configs", name)


def spec(dry: bool, stage: str) -> dict:
    overrides = (_DRY + (_DRY_MOE if stage == "train_moe" else [])) if dry else []
    return {
        "config": config_path(CONFIGS[stage]),
        "overrides": overrides,
        "steps": 2 if dry else 20,
        "warmup": 1 if dry else 3,
        "matmul_n": 256 if dry else 8192,
        "matmul_repeats": 3 if dry else 10,
    }


def causal_flops_per_token(cfg, seq_len: int) -> float:
    """``flops_per_token`` with the attention products counted over the causal half."""
    from mlalm.flops import macs_per_token

    m = macs_per_token(cfg, seq_len)
    return 6.0 * (m["total"] - m["attn_products"] / 2)


def run(part: str, spec: dict, out) -> None:
    from mlalm.bench import peak as peak_bench
    from mlalm.bench import train_step
    from mlalm.config import load_config

    cfg = load_config(spec["config"], list(spec["overrides"]) + [f"attention.impl={part}"])
    t = cfg.train
    log(
        f"{os.path.basename(spec['config'])} attention.impl={part}: batch {t.batch_size} x "
        f"{t.seq_len}, {spec['steps']} steps after {spec['warmup']} warm-up"
    )
    r = train_step.measure(cfg, steps=spec["steps"], warmup=spec["warmup"])
    res: dict[str, Any] = {
        k: r.get(k)
        for k in (
            "tokens_per_s",
            "step_s",
            "step_s_min",
            "step_s_max",
            "compile_s",
            "tokens_per_step",
            "flops_per_token",
            "params",
            "active_params",
            "moe_dispatch",
            "dtype",
            "param_dtype",
            "final_loss",
            "peak_memory_bytes",
            "peak_memory_source",
            "xla_flops",
        )
    }
    res["config"] = os.path.basename(spec["config"])
    res["flops_per_token_causal"] = causal_flops_per_token(cfg, t.seq_len)
    out[part] = res
    out.save()
    # after the training, so the matmul's buffers cannot raise the step's peak memory
    pk = peak_bench.measure(spec["matmul_n"], spec["matmul_repeats"])
    matmul = pk["matmul"]["median"]
    res.update(
        peak_flops=pk["peak_flops"],
        peak_source=pk["peak_source"],
        matmul_flops=matmul,
        matmul_dtype=pk["matmul"]["dtype"],
        matmul_n=pk["matmul"]["n"],
    )
    model_flops = res["flops_per_token"] * res["tokens_per_s"]
    res["mfu"] = model_flops / pk["peak_flops"]
    res["mfu_vs_matmul"] = model_flops / matmul
    res["mfu_causal"] = res["flops_per_token_causal"] * res["tokens_per_s"] / pk["peak_flops"]
    log(
        f"impl={part}: {res['tokens_per_s']:,.0f} tok/s, MFU {100 * res['mfu']:.1f}% "
        f"({res['peak_source']}), peak memory {res['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    out.save()
