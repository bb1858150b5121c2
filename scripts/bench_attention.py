#!/usr/bin/env python
"""Benchmark mlalm's Pallas attention kernels against XLA and cuDNN.

Training attention: forward + backward time of ``flash_attention`` vs
``jax.nn.dot_product_attention`` (implementation='xla', and 'cudnn' where it accepts the
shape; both need the value head dim equal to the qk head dim, so V is zero-padded from G
to H and the output sliced, which costs them some work MLA would not need) and vs the
model's own einsum ``attention_core`` (impl 'core': what attention.impl=xla runs).
Decode: ``mla_decode`` over a full latent cache, reported as achieved bandwidth
(cache bytes read / time) against the device's peak, next to the jnp reference under XLA.

    python scripts/bench_attention.py --json docs/bench_attention.json     # GPU
    python scripts/bench_attention.py --quick                              # CPU smoke test

On CPU the Pallas kernels run in interpret mode: the numbers only show the script works.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlalm.kernels import BlockSizes, flash_attention, mla_decode, mla_decode_reference
from mlalm.model.attention import attention_core

# HBM bandwidth in GB/s by device_kind substring (vendor data sheets), first match wins
PEAK_GBPS = [("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("A100", 2039.0), ("GH200", 4000.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and 2 repetitions (runs on CPU in interpret mode)"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=16, help="query heads N")
    p.add_argument("--kv-heads", type=int, default=16, help="kv heads K (MLA expands to N)")
    p.add_argument("--qk-dim", type=int, default=192, help="H = d_nope + d_rope")
    p.add_argument("--v-dim", type=int, default=128, help="G = d_v")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--impl",
        nargs="+",
        default=["pallas", "core", "xla", "cudnn"],
        choices=["pallas", "core", "xla", "cudnn"],
    )
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--num-stages", type=int, default=None)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--decode-len", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--kv-lora", type=int, default=512, help="R = d_c")
    p.add_argument("--rope-dim", type=int, default=64, help="P = d_r")
    p.add_argument("--block-s", type=int, default=None, help="mla_decode block_s")
    p.add_argument("--num-splits", type=int, default=None, help="mla_decode num_splits")
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="peak memory bandwidth; default from a table for H100/H200/A100",
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.seq, a.heads, a.kv_heads, a.qk_dim, a.v_dim = [1], [32, 64], 2, 2, 24, 16
        a.decode_batch, a.decode_len, a.kv_lora, a.rope_dim = [2], [64, 100], 32, 16
        a.reps = 2
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    return a


def timed(fn, *args, reps):
    """(median seconds per call, first-call seconds incl. compile) of a jitted fn."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), first


def attention_fns(a, block_sizes):
    """name -> o_BTNG = f(q, k, v) for each implementation asked for."""
    causal = not a.no_causal
    H, G = a.qk_dim, a.v_dim

    def sdpa(impl):
        def f(q, k, v):
            # cuDNN (and XLA's shape check) want G == H: zero-pad V, slice the output
            vp = jnp.pad(v, ((0, 0),) * 3 + ((0, H - G),)) if G < H else v
            o = jax.nn.dot_product_attention(q, k, vp, scale=H**-0.5, is_causal=causal, implementation=impl)
            return o[..., :G]

        return f

    def core(q, k, v):
        out = attention_core(q, k, v, scale=H**-0.5, causal=causal)
        return out[0] if isinstance(out, tuple) else out  # (o, max_logit_N) with QK-clip

    fns = {
        "pallas": lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=block_sizes),
        "core": core,
        "xla": sdpa("xla"),
        "cudnn": sdpa("cudnn"),
    }
    return {name: fns[name] for name in a.impl}


def bench_training(a, block_sizes):
    dtype = jnp.dtype(a.dtype)
    N, K, H, G = a.heads, a.kv_heads, a.qk_dim, a.v_dim
    rows = []
    for B in a.batch:
        for T in a.seq:
            key = jax.random.split(jax.random.key(0), 4)
            q = jax.random.normal(key[0], (B, T, N, H), dtype)
            k = jax.random.normal(key[1], (B, T, K, H), dtype)
            v = jax.random.normal(key[2], (B, T, K, G), dtype)
            ct = jax.random.normal(key[3], (B, T, N, G), dtype)
            # matmul FLOPs: forward q kᵀ and p v; backward 2.5x (FlashAttention-2 count)
            fwd_flops = 2 * B * N * T * T * (H + G) * (0.5 if not a.no_causal else 1.0)
            for name, f in attention_fns(a, block_sizes).items():
                loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))
                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                row = dict(
                    kind="train",
                    impl=name,
                    B=B,
                    T=T,
                    N=N,
                    K=K,
                    H=H,
                    G=G,
                    dtype=a.dtype,
                    causal=not a.no_causal,
                )
                try:
                    fwd_s, _ = timed(jax.jit(f), q, k, v, reps=a.reps)
                    s, first = timed(step, q, k, v, reps=a.reps)
                    row.update(
                        fwd_ms=1e3 * fwd_s,
                        fwd_bwd_ms=1e3 * s,
                        compile_s=first - s,
                        tflops=3.5 * fwd_flops / s / 1e12,
                    )
                except Exception as e:  # cuDNN refuses shapes/dtypes/devices it lacks
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(_fmt_train(row), flush=True)
    return rows


def peak_gbps(a):
    if a.peak_gbps:
        return a.peak_gbps
    kind = jax.devices()[0].device_kind
    return next((gbps for name, gbps in PEAK_GBPS if name in kind), None)


def bench_decode(a):
    dtype = jnp.dtype(a.dtype)
    N, R, P = a.heads, a.kv_lora, a.rope_dim
    scale = (a.qk_dim) ** -0.5
    peak = peak_gbps(a)
    rows = []
    for B in a.decode_batch:
        for L in a.decode_len:
            key = jax.random.split(jax.random.key(1), 4)
            q_abs = jax.random.normal(key[0], (B, N, R), dtype)
            q_pe = jax.random.normal(key[1], (B, N, P), dtype)
            c_kv = jax.random.normal(key[2], (B, L, R), dtype)
            k_pe = jax.random.normal(key[3], (B, L, P), dtype)
            lengths = jnp.full((B,), L, jnp.int32)
            cache_bytes = B * L * (R + P) * dtype.itemsize
            impls = {
                "pallas": jax.jit(
                    lambda *x: mla_decode(*x, sm_scale=scale, block_s=a.block_s, num_splits=a.num_splits)
                ),
                "xla": jax.jit(lambda *x: mla_decode_reference(*x, sm_scale=scale)),
            }
            for name, f in impls.items():
                row = dict(
                    kind="decode", impl=name, B=B, S=L, N=N, R=R, P=P, dtype=a.dtype, cache_bytes=cache_bytes
                )
                try:
                    s, first = timed(f, q_abs, q_pe, c_kv, k_pe, lengths, reps=a.reps)
                    gbps = cache_bytes / s / 1e9
                    row.update(
                        ms=1e3 * s,
                        compile_s=first - s,
                        gbps=gbps,
                        peak_gbps=peak,
                        frac_peak=gbps / peak if peak else None,
                    )
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(_fmt_decode(row), flush=True)
    return rows


def _fmt_train(r):
    head = f"train  {r['impl']:>6}  B={r['B']:<2} T={r['T']:<6}"
    if "error" in r:
        return f"{head}  unsupported: {r['error']}"
    return f"{head}  fwd {r['fwd_ms']:9.3f} ms  fwd+bwd {r['fwd_bwd_ms']:9.3f} ms  {r['tflops']:8.3f} TFLOP/s"


def _fmt_decode(r):
    head = f"decode {r['impl']:>6}  B={r['B']:<2} S={r['S']:<6}"
    if "error" in r:
        return f"{head}  unsupported: {r['error']}"
    frac = f"{100 * r['frac_peak']:5.1f}% of {r['peak_gbps']:.0f}" if r["frac_peak"] else "n/a"
    return f"{head}  {r['ms']:9.3f} ms  {r['gbps']:9.2f} GB/s  ({frac} GB/s peak)"


def main(argv=None):
    a = parse_args(argv)
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"dtype {a.dtype}" + ("  [Pallas in interpret mode]" if jax.default_backend() == "cpu" else "")
    )
    bs_kw = {
        k: v
        for k, v in dict(
            block_q=a.block_q, block_k=a.block_k, num_warps=a.num_warps, num_stages=a.num_stages
        ).items()
        if v is not None
    }
    block_sizes = BlockSizes(**bs_kw)
    rows = bench_training(a, block_sizes) + bench_decode(a)
    if a.json:
        out = dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            device=dev.device_kind,
            backend=jax.default_backend(),
            host=platform.node(),
            jax=jax.__version__,
            argv=sys.argv[1:],
            block_sizes=block_sizes.__dict__,
            results=rows,
        )
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
