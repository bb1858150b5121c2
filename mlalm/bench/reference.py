"""The reference: transformers' DeepseekV3ForCausalLM trained on the same batch.

Built from ``mlalm.hf.config_to_hf`` of the benchmark config; PyTorch with
``torch.set_num_threads`` = the CPUs XLA's CPU client uses; loss in float32,
``clip_grad_norm_`` and ``torch.optim.AdamW`` with the same betas, eps and weight decay on
the same matrices as mlalm's AdamW.  Timed: forward + backward + optimizer step.

torch and transformers (the ``test`` extra) are imported inside the functions, so that
``mlalm.bench`` imports without them.
"""

from __future__ import annotations

import gc
import statistics
import time

from mlalm.bench.common import SEED, batch_tokens, log, max_rss_bytes, summarise


def make_spec(
    cfg, *, threads: int, attn: str, experts: str, adamw: str, matmul_n: int, steps: int, warmup: int
) -> dict:
    """The reference workload's spec for ``cfg``.

    Raises:
        ConfigError: the transformers format cannot express ``cfg`` (``config_to_hf``).
    """
    from mlalm.hf import config_to_hf

    o = cfg.optim
    return {
        "hf_config": config_to_hf(cfg),
        "threads": threads,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "attn": attn,
        "experts": experts,
        "adamw_impl": adamw,
        "matmul_n": matmul_n,
        "steps": steps,
        "warmup": warmup,
        "optim": {
            "lr": o.lr,
            "b1": o.b1,
            "b2": o.b2,
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "clip_norm": o.clip_norm,
            "decay_embeddings": o.decay_embeddings,
        },
    }


def setup(spec: dict, attn: str, experts: str):
    """``(model, step, resolved implementations, parameter count)``; ``step()`` runs one
    training step and returns the loss."""
    import numpy as np
    import torch
    import transformers

    hcfg = transformers.DeepseekV3Config(**spec["hf_config"])
    torch.manual_seed(SEED)
    kw = {"attn_implementation": attn}
    if experts != "default":
        kw["experts_implementation"] = experts
    model = transformers.DeepseekV3ForCausalLM._from_config(hcfg, **kw)
    model.train()
    # weight decay as mlalm.optim applies it: on the block matrices only (not norms or the
    # router), and on the embedding and head only with optim.decay_embeddings
    o = spec["optim"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        table = "embed_tokens" in name or name.startswith("lm_head")
        plain = (
            (table and not o.get("decay_embeddings", False))
            or "norm" in name
            or name.endswith("mlp.gate.weight")
        )
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    opt_kw = {"fused": True} if spec["adamw_impl"] == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"], **opt_kw)
    tokens = torch.from_numpy(
        batch_tokens(hcfg.vocab_size, spec["batch_size"], spec["seq_len"]).astype(np.int64)
    )
    inputs, labels = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    clip = o["clip_norm"]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss

    resolved = {
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    n_params = sum(p.numel() for p in model.parameters())
    return model, step, resolved, n_params


def time_steps(step, steps: int, warmup: int):
    """(wall seconds per timed step, CPU seconds per step, last loss)."""
    for _ in range(warmup):
        step()
    times, cpu = [], []
    loss = None
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    assert loss is not None, "steps must be >= 1 (scripts/bench.py checks it)"
    return times, cpu, float(loss.detach())


def measure(spec: dict) -> dict:
    """The reference's step times, tokens/s, peak RSS, and torch's own float32 GEMM rate
    at the peak's size (to tell library speed from model code)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    rss_import = max_rss_bytes()
    _, step, resolved, n_params = setup(spec, spec["attn"], spec["experts"])
    times, cpu, loss = time_steps(step, spec["steps"], spec["warmup"])
    n = spec.get("matmul_n", 4096)
    with torch.no_grad():
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        mm = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, b)
            mm.append(time.perf_counter() - t0)
    del a, b
    tokens = spec["batch_size"] * spec["seq_len"]
    s = summarise(times, cpu)
    return {
        **s,
        "tokens_per_s": tokens / s["step_s"],
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        **resolved,
        "adamw_impl": spec["adamw_impl"],
        "params": n_params,
        "final_loss": loss,
        "torch_matmul_flops": 2.0 * n**3 / statistics.median(mm),
        "torch_matmul_n": n,
        "device": "cpu",
        "rss_after_import_bytes": rss_import,
        "peak_memory_bytes": max_rss_bytes(),
        "peak_memory_source": "host max RSS of the worker process (ru_maxrss)",
    }


def sweep(spec: dict) -> dict:
    """Every attention x experts x AdamW implementation for a few steps (speed only).

    Returns:
        {'rows': one per combination ('step_s' or 'error'), 'best': the fastest row}.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    rows = []
    for attn in ("eager", "sdpa"):
        for experts in ("eager", "grouped_mm"):
            for adamw in ("foreach", "fused"):
                row = {"attn": attn, "experts": experts, "adamw": adamw}
                built = None
                try:
                    built = setup({**spec, "adamw_impl": adamw}, attn, experts)
                    times, _, _ = time_steps(built[1], spec["steps"], spec["warmup"])
                    rows.append(
                        {
                            **row,
                            "step_s": statistics.median(times),
                            "step_times_s": [round(t, 4) for t in times],
                        }
                    )
                    log(f"  reference {attn}/{experts}/{adamw}: {statistics.median(times):.3f} s/step")
                except Exception as e:  # noqa: BLE001 - an implementation this build lacks
                    rows.append({**row, "error": f"{type(e).__name__}: {e}"})
                built = None  # free this model before building the next
                gc.collect()
    ok = [r for r in rows if "step_s" in r]
    return {"rows": rows, "best": min(ok, key=lambda r: r["step_s"]) if ok else None}
