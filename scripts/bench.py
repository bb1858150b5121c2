#!/usr/bin/env python
"""Benchmark mlalm's training step against transformers' DeepseekV3ForCausalLM, with MFU.

    python scripts/bench.py                          # table on stdout
    python scripts/bench.py --json > bench.json      # one JSON object on stdout
    python scripts/bench.py --profile --skip-reference --skip-decode   # where the step's time goes

Every figure comes from one invocation on one machine; each workload runs in its own
subprocess (so peak memory, host RSS on CPU or the device's peak_bytes_in_use on an
accelerator, is its own):

  peak       the device peak: on CPU the median rate of a jitted 4096x4096 float32 matmul
             (--peak-n), on accelerators the data-sheet bf16 dense peak
  mlalm      the training step of --config (forward, backward, AdamW update; the very
             ``mlalm.trainer.make_train_step`` + ``mlalm.optim.build_optimizer`` that
             train.py runs) on one fixed random batch: median step time after warm-up,
             each step blocked on; tokens/s = batch x seq_len / that
  dense      the same for --dense-config (same active FFN width), for MoE overhead
  reference  transformers' DeepseekV3ForCausalLM built from ``mlalm.hf.config_to_hf`` of
             --config, PyTorch on CPU with torch.set_num_threads = the cores XLA's CPU
             client uses (the CPUs this process may run on), the same batch, loss in
             float32, clip_grad_norm_ and torch.optim.AdamW (same betas, eps, weight decay
             on the same matrices): median of forward + backward + optimizer step.
             Defaults: attn_implementation='sdpa', experts 'eager', fused AdamW, the
             fastest combination in --reference-sweep on a 2-core EPYC (740 ms/step vs
             814 for eager/eager/foreach); --reference-sweep re-picks on any machine
  decode     ``mlalm.generate.measure_decode`` with the latent (absorbed) MLA cache and the
             expanded per-head cache, at each --decode-contexts
  profile    (--profile) where the mlalm step's time goes: forward, forward+backward, the
             optimizer update alone, one layer's parts (forward+backward), whole-step
             variants (MoE dispatch, capacity factor, bfloat16 compute, no donation, no
             clipping), all timed round-robin; and a per-HLO-op trace of the step
             (jax.profiler) grouped by phase, kind of op and model part

MFU = flops_per_token (mlalm.flops: 6 x active matmul parameters + attention products
over the full T x T, PaLM's convention) x tokens/s / peak.

On a shared machine: the peak is measured at the start and at the end and the higher one
kept; --rounds N runs the mlalm / dense / reference workloads N times, alternating, and
keeps each one's fastest round.  Every workload also reports cpu_per_wall (process CPU
seconds per wall second; about the core count when it had the machine to itself) and the
1-minute load average before and after it.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
from functools import partial
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULT_TAG = "BENCH_RESULT "
SEED = 0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def n_cpus() -> int:
    """CPUs this process may run on: the size of XLA's CPU thread pool (it sizes its
    Eigen pool from the scheduler affinity), and the thread count the reference gets."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux reports KiB


def batch_tokens(vocab: int, batch: int, seq_len: int):
    """The one fixed batch both implementations train on: [B, T+1] uniform random ids."""
    import numpy as np
    return np.random.default_rng(SEED).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)


def summarise(times: list, cpu: list | None = None) -> dict:
    out = {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
           "step_times_s": [round(t, 5) for t in times]}
    if cpu:
        # process CPU seconds per wall second: ~n_cpus when the step had every core to
        # itself, less when other work on the machine took some
        out["cpu_per_wall"] = sum(cpu) / sum(times)
    return out


# =======================================================================================
# Workers (each runs in its own subprocess)
# =======================================================================================

def _jax_info() -> dict:
    import jax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax_version": jax.__version__,
            "xla_cpu_threads": n_cpus() if dev.platform == "cpu" else None}


def _device_peak_memory():
    """Accelerator: peak_bytes_in_use of device 0; CPU: None (host RSS is used)."""
    import jax
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def worker_peak(spec: dict) -> dict:
    import jax
    from mlalm.flops import accelerator_peak, matmul_rate
    info = _jax_info()
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        r = matmul_rate(spec["n"], spec["repeats"], "float32")
        return {**info, "peak_flops": r["median"], "peak_source": f"measured: median of {r['repeats']} "
                f"jitted {r['n']}x{r['n']} float32 matmuls", "matmul": r}
    peak = accelerator_peak(dev.device_kind)
    r = matmul_rate(8192, spec["repeats"], "bfloat16")
    if peak is None:
        return {**info, "peak_flops": r["median"], "peak_source": "measured bf16 8192^3 matmul "
                "(device not in the data-sheet table)", "matmul": r}
    return {**info, "peak_flops": peak, "peak_source": f"data sheet bf16 dense ({dev.device_kind})",
            "matmul": r}


def _build_train(cfg, steps_hint: int = 1000):
    """(graphdef, tx, schedule, state, step_fn, batch) exactly as train.py builds them
    (without the mesh: one device)."""
    import jax.numpy as jnp
    from flax import nnx
    from mlalm.model import Transformer
    from mlalm.optim import build_optimizer
    from mlalm.trainer import make_train_step, split_model
    model = Transformer(cfg, rngs=nnx.Rngs(SEED))
    graphdef, params, rest = split_model(model)
    tx, schedule = build_optimizer(cfg, steps_hint)
    state = {"params": params, "opt_state": tx.init(params), "rest": rest,
             "step": jnp.zeros((), jnp.int32)}
    step_fn = make_train_step(graphdef, tx, schedule, cfg)
    t = cfg.train
    batch = jnp.asarray(batch_tokens(cfg.model.vocab_size, t.batch_size, t.seq_len))
    return model, graphdef, tx, schedule, state, step_fn, batch


def _time_step(step_fn, state, batch, steps: int, warmup: int):
    """Run ``warmup`` then ``steps`` donated steps, each blocked on; returns (state, times, cpu)."""
    import jax
    for _ in range(warmup):
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return state, metrics, times, cpu


def _cost(compiled) -> dict:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return {"xla_flops": float(ca.get("flops", 0.0)),
                "xla_bytes_accessed": float(ca.get("bytes accessed", 0.0))}
    except Exception:  # noqa: BLE001 - cost analysis is informative only
        return {}


def _load(spec):
    from mlalm.config import load_config
    return load_config(spec["config"], spec.get("overrides", []))


def worker_train(spec: dict) -> dict:
    import jax
    from mlalm.flops import flops_per_token, macs_per_token
    from mlalm.model import count_params
    rss_import = max_rss_bytes()
    cfg = _load(spec)
    t = cfg.train
    model, graphdef, tx, schedule, state, step_fn, batch = _build_train(cfg)
    n_params, n_active = count_params(model), count_params(model, active=True)
    del model
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = _cost(compiled)
    state, metrics, times, cpu = _time_step(compiled, state, batch, spec["steps"], spec["warmup"])
    tokens = t.batch_size * t.seq_len
    s = summarise(times, cpu)
    fpt = flops_per_token(cfg, t.seq_len)
    dispatch = cfg.moe.dispatch
    if cfg.moe.n_routed_experts and dispatch == "auto":
        dispatch = "capacity" if jax.default_backend() == "cpu" else "dropless"
    out = {**_jax_info(), **s, "tokens_per_step": tokens, "tokens_per_s": tokens / s["step_s"],
           "compile_s": compile_s, "flops_per_token": fpt, "macs_per_token": macs_per_token(cfg, t.seq_len),
           "model_flops_per_step": fpt * tokens, **cost,
           "params": n_params, "active_params": n_active,
           "moe_dispatch": dispatch if cfg.moe.n_routed_experts else None,
           "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
           "final_loss": float(metrics["loss"]), "rss_after_import_bytes": rss_import,
           "peak_memory_source": "host max RSS of the worker process (ru_maxrss)"}
    dev_peak = _device_peak_memory()
    out["peak_memory_bytes"] = dev_peak if dev_peak is not None else max_rss_bytes()
    if dev_peak is not None:
        out["peak_memory_source"] = "device peak_bytes_in_use"
        out["host_rss_bytes"] = max_rss_bytes()
    return out


def _reference_setup(spec, attn: str, experts: str):
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
    # AdamW with mlalm's defaults: weight decay on the block matrices only (not embedding,
    # head, norms, router); mlalm.optim labels the same way
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = ("embed_tokens" in name or name.startswith("lm_head") or "norm" in name
                 or name.endswith("mlp.gate.weight"))
        (no_decay if plain else decay).append(p)
    o = spec["optim"]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    opt_kw = {"fused": True} if spec["adamw_impl"] == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"], **opt_kw)
    tokens = torch.from_numpy(batch_tokens(hcfg.vocab_size, spec["batch_size"], spec["seq_len"]).astype(np.int64))
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

    resolved = {"attn_implementation": model.config._attn_implementation,
                "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    n_params = sum(p.numel() for p in model.parameters())
    return model, step, resolved, n_params


def _time_reference(step, steps, warmup):
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return times, cpu, float(loss.detach())


def worker_reference(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    import transformers
    rss_import = max_rss_bytes()
    model, step, resolved, n_params = _reference_setup(spec, spec["attn"], spec["experts"])
    times, cpu, loss = _time_reference(step, spec["steps"], spec["warmup"])
    # torch's own float32 GEMM rate at the peak's size, to tell library speed from model code
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
    return {**s, "tokens_per_s": tokens / s["step_s"], "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, **resolved,
            "adamw_impl": spec["adamw_impl"], "params": n_params, "final_loss": loss,
            "torch_matmul_flops": 2.0 * n ** 3 / statistics.median(mm), "torch_matmul_n": n,
            "device": "cpu", "rss_after_import_bytes": rss_import,
            "peak_memory_bytes": max_rss_bytes(),
            "peak_memory_source": "host max RSS of the worker process (ru_maxrss)"}


def worker_reference_sweep(spec: dict) -> dict:
    """Every attention x experts x AdamW implementation for a few steps (speed only)."""
    import gc
    import torch
    torch.set_num_threads(spec["threads"])
    rows = []
    for attn in ("eager", "sdpa"):
        for experts in ("eager", "grouped_mm"):
            for adamw in ("foreach", "fused"):
                row = {"attn": attn, "experts": experts, "adamw": adamw}
                setup = None
                try:
                    setup = _reference_setup({**spec, "adamw_impl": adamw}, attn, experts)
                    times, _, _ = _time_reference(setup[1], spec["steps"], spec["warmup"])
                    rows.append({**row, "step_s": statistics.median(times),
                                 "step_times_s": [round(t, 4) for t in times]})
                    log(f"  reference {attn}/{experts}/{adamw}: {statistics.median(times):.3f} s/step")
                except Exception as e:  # noqa: BLE001 - an implementation this build lacks
                    rows.append({**row, "error": f"{type(e).__name__}: {e}"})
                setup = None  # free this model before building the next
                gc.collect()
    ok = [r for r in rows if "step_s" in r]
    best = min(ok, key=lambda r: r["step_s"]) if ok else None
    return {"rows": rows, "best": best}


def worker_decode(spec: dict) -> dict:
    from flax import nnx
    from mlalm.model import Transformer
    try:
        from mlalm.generate import measure_decode
    except ImportError as e:
        return {"skipped": f"mlalm.generate.measure_decode is not available ({e})"}
    cfg = _load(spec)
    model = Transformer(cfg, rngs=nnx.Rngs(SEED))
    out = {"batch": spec["batch"], "new_tokens": spec["new_tokens"], "runs": []}
    for absorbed in (True, False):
        for ctx in spec["contexts"]:
            log(f"  decode {'absorbed' if absorbed else 'naive'} context {ctx}")
            r = measure_decode(model, batch=spec["batch"], context=ctx,
                               new_tokens=spec["new_tokens"], absorbed=absorbed)
            out["runs"].append({"mode": "absorbed" if absorbed else "naive", **r})
    out["peak_memory_bytes"] = max_rss_bytes()
    return out


# einsum strings used by mlalm.model -> the part of the model they belong to
def worker_profile(spec: dict) -> dict:
    """Where the mlalm step's time goes: its pieces, one layer's parts, and whole-step
    variants.  Everything is compiled first, then timed round-robin (one call of each per
    round), so that load from other processes falls on all entries alike and the ratios
    between them stay meaningful on a shared machine."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from mlalm import profiling
    from mlalm.flops import macs_per_token
    from mlalm.model.layers import rope_tables
    from mlalm.model.loss import lm_head_cross_entropy
    from mlalm.trainer import lm_loss
    cfg = _load(spec)
    rounds, warmup = spec["steps"], spec["warmup"]
    t = cfg.train
    entries = []  # (group, name, compiled, args list, how many leading arguments it donates)
    errors = {}

    def add(group, name, fn, *args, donate=False):
        try:
            t0 = time.perf_counter()
            compiled = fn.lower(*args).compile()
            comp = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - report and go on
            errors[name] = {"group": group, "error": f"{type(e).__name__}: {e}"}
            log(f"  {name}: {type(e).__name__}: {e}")
            return
        log(f"  compiled {name} ({comp:.1f}s)")
        entries.append({"group": group, "name": name, "fn": compiled, "args": list(args),
                        "donate": donate, "compile_s": comp, "cost": _cost(compiled),
                        "times": [], "cpu": []})

    # -- the step and its pieces --------------------------------------------------------
    coef = cfg.moe.seq_aux_loss_coef
    _, _, _, _, state, step_fn, batch = _build_train(cfg)
    add("parts", "train_step", step_fn, state, batch, donate=True)
    # a second copy (same seed) for the pieces that do not donate; ``model`` shares its arrays
    model, graphdef, tx, schedule, state2, step_fn, batch = _build_train(cfg)
    params, rest, opt_state = state2["params"], state2["rest"], state2["opt_state"]
    add("parts", "forward (loss)", jax.jit(lambda p, r, b: lm_loss(graphdef, p, r, b, coef, t.loss_chunk)[0]),
        params, rest, batch)
    grad = jax.jit(jax.value_and_grad(lambda p, r, b: lm_loss(graphdef, p, r, b, coef, t.loss_chunk)[0]))
    add("parts", "forward + backward", grad, params, rest, batch)
    grads = grad(params, rest, batch)[1]

    def opt_update(o, p, g):
        u, o = tx.update(g, o, p)
        return o, optax.apply_updates(p, u)
    # donated like in the step (own copies: the entries above keep using params)
    add("parts", "optimizer update (clip + AdamW)", jax.jit(opt_update, donate_argnums=(0, 1)),
        jax.tree.map(jnp.copy, opt_state), jax.tree.map(jnp.copy, params), grads, donate=2)
    wrapped = getattr(step_fn, "__wrapped__", None)
    if wrapped is not None:  # the same step function without buffer donation
        add("variants", "no buffer donation", jax.jit(wrapped), state2, batch)

    # -- one layer's parts, forward + backward (random input, non-trivial cotangent) ------
    x = jax.random.normal(jax.random.key(1), (t.batch_size, t.seq_len, cfg.model.d_model), jnp.float32)
    a = cfg.attention
    rope_dim = a.qk_rope_head_dim if a.kind == "mla" else a.head_dim
    pos = jnp.broadcast_to(jnp.arange(t.seq_len, dtype=jnp.int32), (t.batch_size, t.seq_len))
    cos, sin = rope_tables(pos, rope_dim, cfg.model.rope_theta)

    def part(name, module, call):
        gd, st = nnx.split(module)

        def loss(s, x):
            y = call(nnx.merge(gd, s), x)
            return jnp.sum(y * jnp.cos(y))
        add("layer_parts", name, jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), st, x)

    blocks = list(model.blocks)
    part("attention, one layer (norm excluded)", blocks[0].attn, lambda m, x: m(x, cos, sin)[0])
    if a.kind == "mla":
        from mlalm.model.attention import attention_core
        N, dqk, dv = a.n_heads, a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
        B, T = t.batch_size, t.seq_len
        q, k, v = (jax.random.normal(k1, (B, T, N, dqk)), jax.random.normal(k2, (B, T, N, dqk)),
                   jax.random.normal(k3, (B, T, N, dv)))

        def core(q, k, v):
            o = attention_core(q, k, v, scale=dqk ** -0.5)[0]
            return jnp.sum(o * jnp.cos(o))
        add("layer_parts", "  of which attention core (QK^T, mask, softmax, PV)",
            jax.jit(jax.value_and_grad(core, argnums=(0, 1, 2))), q, k, v)

        # what-if: the core with other numbers of causal query blocks (attention_core's
        # q_blocks; block i only multiplies the keys of blocks <= i)
        if "q_blocks" in inspect.signature(attention_core).parameters:
            for nb in (1, 2, 8):
                if T % nb == 0:
                    def core_nb(q, k, v, nb=nb):
                        o = attention_core(q, k, v, scale=dqk ** -0.5, q_blocks=nb)[0]
                        return jnp.sum(o * jnp.cos(o))
                    add("what_if", f"attention core with q_blocks={nb}",
                        jax.jit(jax.value_and_grad(core_nb, argnums=(0, 1, 2))), q, k, v)
    dense = [b for b in blocks if not b.is_moe]
    moe = [b for b in blocks if b.is_moe]
    if dense:
        part("dense FFN, one layer", dense[0].ffn, lambda m, x: m(x))
    if moe:
        part("MoE FFN, one layer", moe[0].ffn, lambda m, x: m(x)[0])
        if moe[0].ffn.shared is not None:
            part("  of which shared expert(s)", moe[0].ffn.shared, lambda m, x: m(x))
    norm_gd, norm_st = nnx.split(model.final_norm)
    w_DV = model.embed_VD[...].T if cfg.model.tie_embeddings else model.head_DV[...]
    labels = batch[:, 1:]

    def head_loss(p, x, chunk=t.loss_chunk):  # the final norm, then what lm_loss computes
        h = nnx.merge(norm_gd, p[0])(x)
        if chunk:
            return lm_head_cross_entropy(h, p[1], labels, chunk_tokens=chunk)
        logits = jnp.einsum("BTD,DV->BTV", h, p[1], preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    add("layer_parts", "final norm + LM head + loss",
        jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1))), (norm_st, w_DV), x)
    if t.loss_chunk:
        add("what_if", "final norm + LM head + loss, unfused (train.loss_chunk=0)",
            jax.jit(jax.value_and_grad(partial(head_loss, chunk=0), argnums=(0, 1))), (norm_st, w_DV), x)

    # -- variants of the whole step -----------------------------------------------------
    def variant(name, new_cfg):
        try:
            _, _, _, _, st, fn, b = _build_train(new_cfg)
        except Exception as e:  # noqa: BLE001
            errors[name] = {"group": "variants", "error": f"{type(e).__name__}: {e}"}
            return
        add("variants", name, fn, st, b, donate=True)
    R = dataclasses.replace
    if cfg.moe.n_routed_experts:
        other = "dropless" if jax.default_backend() == "cpu" else "capacity"
        variant(f"moe.dispatch={other}", R(cfg, moe=R(cfg.moe, dispatch=other)))
        variant("moe.capacity_factor=1.0", R(cfg, moe=R(cfg.moe, dispatch="capacity", capacity_factor=1.0)))
    if cfg.model.dtype != "bfloat16":
        variant("model.dtype=bfloat16 (compute)", R(cfg, model=R(cfg.model, dtype="bfloat16")))
    if cfg.optim.clip_norm > 0:
        variant("optim.clip_norm=0 (no clipping)", R(cfg, optim=R(cfg.optim, clip_norm=0.0)))
    if t.loss_chunk:
        variant("train.loss_chunk=0 (unfused LM head + loss)", R(cfg, train=R(t, loss_chunk=0)))

    # -- time everything round-robin ----------------------------------------------------
    def call(e, record):
        a_, c_ = time.perf_counter(), time.process_time()
        r = e["fn"](*e["args"])
        jax.block_until_ready(r)
        if record:
            e["times"].append(time.perf_counter() - a_)
            e["cpu"].append(time.process_time() - c_)
        for i in range(int(e["donate"])):  # donated inputs: carry the outputs forward
            e["args"][i] = r[i]
    for _ in range(warmup):
        for e in entries:
            call(e, False)
    for i in range(rounds):
        for e in entries:
            call(e, True)
        log(f"  round {i + 1}/{rounds} done")
    # -- per-op profile of the step ----------------------------------------------------
    base = next((e for e in entries if e["name"] == "train_step"), None)
    op = None
    if base is not None:
        log("  per-op trace of train_step")
        try:
            op = profiling.op_profile(base["fn"], base["args"], True, max(2, min(rounds, 5)))
        except Exception as e:  # noqa: BLE001 - the profiler is optional
            op = {"error": f"{type(e).__name__}: {e}"}
    out = {"rounds": rounds, "parts": {}, "layer_parts": {}, "variants": {}, "what_if": {}, "ops": op,
           "macs_per_token": macs_per_token(cfg, t.seq_len),
           "tokens_per_step": t.batch_size * t.seq_len}
    for e in entries:
        out[e["group"]][e["name"]] = {**summarise(e["times"], e["cpu"]), "compile_s": e["compile_s"], **e["cost"]}
    for name, err in errors.items():
        out[err["group"]][name] = {"error": err["error"]}
    return out


WORKERS = {"peak": worker_peak, "train": worker_train, "reference": worker_reference,
           "reference_sweep": worker_reference_sweep, "decode": worker_decode,
           "profile": worker_profile}


def run_worker(name: str, spec: dict, label: str | None = None) -> dict:
    """Run one workload in a fresh Python process; its result (or an error) as a dict."""
    label = label or name
    log(f"{label} ...")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                           "--spec", json.dumps(spec)], stdout=subprocess.PIPE, stderr=None,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or line is None:
        log(f"{label}: failed (exit {proc.returncode})")
        return {"error": f"worker '{name}' exited with {proc.returncode}", "wall_s": wall}
    res = json.loads(line[len(RESULT_TAG):])
    res["wall_s"] = wall
    res["loadavg_1min_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    log(f"{label}: done in {wall:.0f}s")
    return res


# =======================================================================================
# The driver
# =======================================================================================

def machine_info() -> dict:
    cpu, flags = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    def ver(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None
    return {"cpu_model": cpu, "cpu_flags_of_note": sorted(flags & {
                "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}),
            "cores": n_cpus(), "cores_online": os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "platform": platform.platform(),
            "jax_version": ver("jax"), "jaxlib_version": ver("jaxlib"), "flax_version": ver("flax"),
            "optax_version": ver("optax"), "torch_version": ver("torch"),
            "transformers_version": ver("transformers"),
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "bench.yaml"))
    p.add_argument("--dense-config", default=os.path.join(ROOT, "configs", "bench_dense.yaml"),
                   help="the dense model of equal active parameters (MoE overhead, dense MFU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per workload (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the mlalm / dense / reference workloads this many times, alternating, "
                        "and keep each one's fastest round (for a shared, noisy machine)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (progress on stderr)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--profile", action="store_true", help="also break the mlalm step's time down")
    p.add_argument("--reference-attn", default="sdpa", choices=["eager", "sdpa"],
                   help="transformers attention implementation")
    p.add_argument("--reference-experts", default="eager", choices=["eager", "grouped_mm", "default"],
                   help="transformers experts implementation ('default': what transformers picks)")
    p.add_argument("--reference-adamw", default="fused", choices=["foreach", "fused"])
    p.add_argument("--reference-sweep", action="store_true",
                   help="time every attention x experts x AdamW implementation of the reference "
                        "first (2 steps each) and use the fastest")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the reference (default: the CPUs XLA uses)")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--peak-n", type=int, default=4096, help="CPU peak: n of the n x n matmul")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to both configs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return a


def ratio(a, b):
    return a / b if a is not None and b else None


def run_bench(args) -> dict:
    from mlalm.config import load_config
    from mlalm.errors import ConfigError
    from mlalm.hf import config_to_hf
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = load_config(args.config, args.overrides)
    threads = args.threads or n_cpus()
    base = {"steps": args.steps, "warmup": args.warmup}
    out = {"machine": machine_info(), "config": os.path.relpath(args.config, ROOT),
           "dense_config": None if args.skip_dense else os.path.relpath(args.dense_config, ROOT),
           "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
           "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
           "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
           "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}

    peak_spec = {"n": args.peak_n, "repeats": args.peak_repeats}
    peaks = [run_worker("peak", peak_spec, "peak (start)")]
    out["machine"].update(backend=peaks[0].get("backend"), device_kind=peaks[0].get("device_kind"),
                          xla_cpu_threads=peaks[0].get("xla_cpu_threads"))

    # the workloads to compare, run in turn (--rounds times, alternating)
    jobs = [("mlalm", "train", {**base, "config": args.config, "overrides": args.overrides},
             "mlalm train step")]
    if not args.skip_dense:
        jobs.append(("dense", "train", {**base, "config": args.dense_config, "overrides": args.overrides},
                     "mlalm dense train step"))
    if not args.skip_reference:
        try:
            hf = config_to_hf(cfg)
        except ConfigError as e:
            out["reference"] = {"skipped": str(e)}
            hf = None
        if hf is not None:
            o = cfg.optim
            rspec = {**base, "hf_config": hf, "threads": threads, "batch_size": cfg.train.batch_size,
                     "seq_len": cfg.train.seq_len, "attn": args.reference_attn,
                     "experts": args.reference_experts, "adamw_impl": args.reference_adamw,
                     "matmul_n": args.peak_n,
                     "optim": {"lr": o.lr, "b1": o.b1, "b2": o.b2, "eps": o.eps,
                               "weight_decay": o.weight_decay, "clip_norm": o.clip_norm}}
            if args.reference_sweep:
                sweep = run_worker("reference_sweep", {**rspec, "steps": 2, "warmup": 1},
                                   "reference implementation sweep")
                out["reference_sweep"] = sweep
                if sweep.get("best"):
                    best = sweep["best"]
                    rspec["attn"], rspec["experts"], rspec["adamw_impl"] = best["attn"], best["experts"], best["adamw"]
            jobs.append(("reference", "reference", rspec, "transformers reference train step"))
    runs = {key: [] for key, *_ in jobs}
    for rnd in range(args.rounds):
        for key, worker, spec, label in jobs:
            suffix = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            runs[key].append(run_worker(worker, spec, label + suffix))
    peaks.append(run_worker("peak", peak_spec, "peak (end)"))

    # Each figure from its least disturbed measurement: the highest of the peak runs, the
    # round with the lowest median step time (the others are kept in '*_rounds').
    ok_peaks = [p for p in peaks if p.get("peak_flops")]
    out["peak"] = max(ok_peaks, key=lambda p: p["peak_flops"]) if ok_peaks else peaks[0]
    out["peak_runs"] = [{"peak_flops": p.get("peak_flops"), "error": p.get("error"),
                         "loadavg_1min_before_after": p.get("loadavg_1min_before_after")} for p in peaks]
    out["peak_flops"] = out["peak"].get("peak_flops")
    for key, results in runs.items():
        good = [x for x in results if "step_s" in x]
        out[key] = min(good, key=lambda x: x["step_s"]) if good else results[0]
        if len(results) > 1:
            out[key + "_rounds"] = [{"step_s": x.get("step_s"), "error": x.get("error"),
                                     "cpu_per_wall": x.get("cpu_per_wall"),
                                     "loadavg_1min_before_after": x.get("loadavg_1min_before_after")}
                                    for x in results]

    def mfu(w):
        if "tokens_per_s" not in w or not out["peak_flops"]:
            return None
        return w["flops_per_token"] * w["tokens_per_s"] / out["peak_flops"]

    train = out["mlalm"]
    out["tokens_per_s"] = train.get("tokens_per_s")
    out["step_s"] = train.get("step_s")
    out["flops_per_token"] = train.get("flops_per_token")
    out["mfu"] = mfu(train)
    out["peak_memory_bytes"] = train.get("peak_memory_bytes")
    if "dense" in out:
        dense = out["dense"]
        out["dense_tokens_per_s"] = dense.get("tokens_per_s")
        out["dense_mfu"] = mfu(dense)
        out["dense_peak_memory_bytes"] = dense.get("peak_memory_bytes")
        # same active FFN width, so the step-time ratio is what MoE routing/dispatch costs
        out["moe_overhead"] = ratio(train.get("step_s"), dense.get("step_s"))
    if "reference" in runs:
        ref = out["reference"]
        out["reference_tokens_per_s"] = ref.get("tokens_per_s")
        out["reference_peak_memory_bytes"] = ref.get("peak_memory_bytes")
        out["speedup_vs_reference"] = ratio(out["tokens_per_s"], ref.get("tokens_per_s"))
        out["memory_ratio_vs_reference"] = ratio(out["peak_memory_bytes"], ref.get("peak_memory_bytes"))

    if not args.skip_decode:
        dec = run_worker("decode", {"config": args.config, "overrides": args.overrides,
                                    "batch": args.decode_batch, "contexts": args.decode_contexts,
                                    "new_tokens": args.decode_tokens}, "decode")
        out["decode_details"] = dec
        if "runs" in dec:
            table = {"absorbed": {}, "naive": {}}
            for r in dec["runs"]:
                table[r["mode"]][str(r["context"])] = r["tokens_per_s"]
            out["decode"] = table
            out["decode_absorbed_speedup"] = {c: ratio(table["absorbed"].get(c), table["naive"].get(c))
                                              for c in table["absorbed"]}
        else:
            out["decode"] = None
            log(f"decode skipped: {dec.get('skipped') or dec.get('error')}")

    if args.profile:
        out["profile"] = run_worker("profile", {"config": args.config, "overrides": args.overrides,
                                                "steps": args.steps, "warmup": 1},
                                    "profile of the mlalm step")
    out["loadavg_start"] = [round(x, 2) for x in load_start]
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["bench_wall_s"] = time.perf_counter() - t_start
    return out


# =======================================================================================
# Table
# =======================================================================================

def _f(x, fmt="{:,.0f}", none="-"):
    return none if x is None else fmt.format(x)


def _mib(x):
    return _f(None if x is None else x / 2 ** 20, "{:,.0f} MiB")


def format_table(r: dict) -> str:
    m = r["machine"]
    lines = [f"mlalm benchmark  {m['date']}  ({r['command']})",
             f"machine: {m['cpu_model']} x{m['cores']} cores, backend {m.get('backend')} "
             f"({m.get('device_kind')}), jax {m['jax_version']}, torch {m['torch_version']}, "
             f"transformers {m['transformers_version']}",
             f"load average (1/5/15 min): start {r['loadavg_start']}, end {r['loadavg_end']}",
             f"config {r['config']}: batch {r['batch_size']} x seq {r['seq_len']} = "
             f"{r['tokens_per_step']} tokens/step; {r['steps']} timed steps after {r['warmup']} warm-up",
             ""]
    pk = r.get("peak", {})
    runs = ", ".join(_f(x.get("peak_flops") and x["peak_flops"] / 1e9, "{:,.1f}") for x in r.get("peak_runs", []))
    lines.append(f"peak: {_f(r.get('peak_flops') and r['peak_flops'] / 1e9, '{:,.1f}')} GFLOP/s "
                 f"({pk.get('peak_source', pk.get('error'))}; the higher of the runs at start and end: {runs})")
    for key in ("mlalm", "dense", "reference"):
        if key + "_rounds" in r:
            lines.append(f"{key} rounds: step ms " + ", ".join(
                _f(x.get("step_s") and x["step_s"] * 1e3) for x in r[key + "_rounds"]) + " (fastest kept)")
    fpt = r.get("flops_per_token")
    if fpt:
        mc = r["mlalm"].get("macs_per_token", {})
        lines.append(f"model FLOPs/token: {fpt / 1e6:.2f} M  (6 x MACs: attn proj "
                     f"{mc.get('attn_proj', 0) / 1e3:.0f}k, attn products {mc.get('attn_products', 0) / 1e3:.0f}k, "
                     f"FFN {mc.get('ffn', 0) / 1e3:.0f}k, router {mc.get('router', 0) / 1e3:.0f}k, "
                     f"head {mc.get('head', 0) / 1e3:.0f}k)")
    lines.append("")
    hdr = (f"{'training step':<44}{'tokens/s':>10}{'step ms':>10}{'min..max ms':>16}{'MFU':>8}"
           f"{'peak mem':>12}{'cpu/wall':>9}")
    lines += [hdr, "-" * len(hdr)]

    def row(name, w, mfu):
        if not w or "step_s" not in w:
            lines.append(f"{name:<44}{(w or {}).get('error') or (w or {}).get('skipped') or 'skipped'}")
            return
        lines.append(f"{name:<44}{_f(w['tokens_per_s']):>10}{w['step_s'] * 1e3:>10.0f}"
                     f"{w['step_s_min'] * 1e3:>8.0f}..{w['step_s_max'] * 1e3:<6.0f}"
                     f"{_f(mfu and 100 * mfu, '{:.1f}%'):>8}{_mib(w.get('peak_memory_bytes')):>12}"
                     f"{_f(w.get('cpu_per_wall'), '{:.2f}'):>9}")
    t = r.get("mlalm", {})
    row(f"mlalm MoE ({t.get('moe_dispatch')})", t, r.get("mfu"))
    if "dense" in r:
        row("mlalm dense (same active FFN)", r["dense"], r.get("dense_mfu"))
    if "reference" in r:
        ref = r["reference"]
        ref_mfu = ratio(fpt * ref["tokens_per_s"], r.get("peak_flops")) if fpt and "tokens_per_s" in ref else None
        name = (f"transformers ({ref.get('attn_implementation')}/{ref.get('experts_implementation')}/"
                f"{ref.get('adamw_impl')}, {ref.get('threads')}t)") if "tokens_per_s" in ref else "transformers"
        row(name, ref, ref_mfu)
    lines.append("")
    if r.get("speedup_vs_reference") is not None:
        lines.append(f"mlalm / transformers: {r['speedup_vs_reference']:.2f}x tokens/s, "
                     f"{_f(r.get('memory_ratio_vs_reference'), '{:.2f}')}x peak memory")
    if r.get("moe_overhead") is not None:
        lines.append(f"MoE overhead (MoE step / dense step, equal active FFN): {r['moe_overhead']:.2f}x")
    if t.get("xla_flops") and t.get("model_flops_per_step"):
        lines.append(f"XLA cost analysis: {t['xla_flops'] / 1e9:.1f} GFLOP/step vs model "
                     f"{t['model_flops_per_step'] / 1e9:.1f} GFLOP/step "
                     f"({t['xla_flops'] / t['model_flops_per_step']:.2f}x); compile {t.get('compile_s', 0):.1f}s")
    ref = r.get("reference", {})
    if ref.get("torch_matmul_flops") and r.get("peak_flops"):
        lines.append(f"float32 {ref['torch_matmul_n']}^3 matmul: XLA {r['peak_flops'] / 1e9:.1f} GFLOP/s, "
                     f"torch {ref['torch_matmul_flops'] / 1e9:.1f} GFLOP/s ({ref.get('threads')} threads)")
    if t.get("params"):
        lines.append(f"parameters: {t['params'] / 1e6:.2f} M total, {t['active_params'] / 1e6:.2f} M active "
                     f"per token; RSS after imports: mlalm {_mib(t.get('rss_after_import_bytes'))}, "
                     f"transformers {_mib(r.get('reference', {}).get('rss_after_import_bytes'))}")
    if "reference_sweep" in r:
        lines.append("reference implementations, attention/experts/AdamW (median of 2 steps each): " + ", ".join(
            f"{x['attn']}/{x['experts']}/{x['adamw']} {x['step_s'] * 1e3:.0f} ms" if "step_s" in x
            else f"{x['attn']}/{x['experts']}/{x['adamw']} failed" for x in r["reference_sweep"].get("rows", [])))
    if "decode_details" in r:
        lines.append("")
        dec = r["decode_details"]
        if "runs" not in dec:
            lines.append(f"decode: skipped ({dec.get('skipped') or dec.get('error')})")
        else:
            hdr = (f"{'decode (batch ' + str(dec['batch']) + ')':<22}{'context':>8}{'tokens/s':>10}"
                   f"{'ms/step':>9}{'cache':>11}{'B/token':>9}")
            lines += [hdr, "-" * len(hdr)]
            for x in dec["runs"]:
                lines.append(f"{x['mode']:<22}{x['context']:>8}{x['tokens_per_s']:>10,.0f}{x['ms_per_step']:>9.1f}"
                             f"{_mib(x['cache_bytes']):>11}{x['bytes_per_token']:>9,.0f}")
    if "profile" in r and "parts" in r["profile"]:
        p = r["profile"]
        lines += ["", f"profile of the mlalm step (median of {p['rounds']} round-robin calls each; "
                      f"layer parts are forward + backward of one layer)"]
        full = p["parts"].get("train_step", {}).get("step_s")
        core = next((x.get("step_s") for k, x in p["layer_parts"].items() if "attention core" in k), None)
        for group in ("parts", "layer_parts", "what_if", "variants"):
            for name, x in p[group].items():
                if "step_s" not in x:
                    lines.append(f"  {name:<58}{x.get('error')}")
                    continue
                share = f"{100 * x['step_s'] / full:6.1f}% of step" if full and group != "variants" else \
                    (f"{x['step_s'] / full:6.2f}x step" if full else "")
                if group == "what_if" and core:
                    share = f"{x['step_s'] / core:6.2f}x core  "
                xf = f"  XLA {x['xla_flops'] / 1e9:6.1f} GFLOP" if x.get("xla_flops") else ""
                lines.append(f"  {name:<58}{x['step_s'] * 1e3:9.1f} ms  {share}{xf}"
                             f"  cpu/wall {x.get('cpu_per_wall', 0):.2f}")
    ops = r.get("profile", {}).get("ops")
    if ops and "error" not in ops:
        tot = ops["ops_s_per_call"]
        lines += ["", f"per-op trace of the step (jax.profiler, {ops['calls']} steps): "
                      f"{ops['n_ops']} ops, {tot * 1e3:.0f} ms of op time per step "
                      f"(wall {ops['wall_s_per_call'] * 1e3:.0f} ms incl. profiler overhead)"]
        for key, title in (("by_phase", "phase"), ("by_kind", "kind"), ("by_part", "model part"),
                           ("by_phase_kind", "phase / kind")):
            lines.append(f"  by {title}: " + "; ".join(
                f"{k} {v * 1e3:.0f} ms ({100 * v / tot:.0f}%)" for k, v in ops[key].items() if v / tot >= 0.01))
        lines.append("  top ops:")
        for x in ops["top_ops"][:15]:
            lines.append(f"    {x['s'] * 1e3:7.1f} ms  {x['kind']:<19} {x['phase'][:8]:<9} {x['part'][:30]:<31}"
                         f"{x['shape'][:28]:<29} {x['op_name'][-50:]}")
    elif ops:
        lines.append(f"per-op trace: {ops['error']}")
    lines.append("")
    lines.append(f"bench wall time {r['bench_wall_s']:.0f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        res = WORKERS[args.worker](json.loads(args.spec))
        sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
        sys.stdout.flush()
        return 0
    from mlalm.errors import ConfigError
    try:
        result = run_bench(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
