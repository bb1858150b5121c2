"""Stage ``attention``: training attention (forward, and forward + backward) at MLA
training shapes in bfloat16: mlalm's Pallas flash kernel against XLA (``attention_core``,
what ``attention.impl=xla`` runs) and cuDNN through ``jax.nn.dot_product_attention``.

MLA trains as multi-head attention with per-head keys [k_nope; k_pe] of width
d_qk = d_n + d_r and values of width d_v: DeepSeek-V3's 192 / 128 and the bench model's
(configs/bench_gpu.yaml) 96 / 64.  cuDNN (like jax.nn.dot_product_attention's XLA path)
requires d_v == d_qk, so at MLA widths it is recorded as unsupported with its own error;
a third shape with equal widths (128 / 128) shows where it stands when it applies.

FLOPs (matmuls only, the FlashAttention-2 convention), per call with B sequences, N heads,
T queries and S keys:
    forward            2·B·N·T·S·(d_qk + d_v)          (q kᵀ and p v)
    backward           2·B·N·T·S·(3·d_qk + 2·d_v)      (q kᵀ again, dO vᵀ, pᵀ dO, dS k, dSᵀ q)
both halved when causal (T = S), since half the score matrix is masked.  Every
implementation is credited with the same count, so TFLOP/s compare like ms do.
"""

from __future__ import annotations

from mlalm.bench.gpu.common import log, short_error, timed

PARTS = ("main",)
IMPLS = ("pallas", "xla", "cudnn")

_GPU = {
    "tokens": 16384,
    "reps": 5,
    "causal": True,
    # the goal's configuration first, so a stage cut short by its budget still has it
    "configs": [
        ("mla_v3", 16, 192, 128, 4096),
        ("mla_v3", 16, 192, 128, 1024),
        ("mla_v3", 16, 192, 128, 8192),
        ("bench", 12, 96, 64, 4096),
        ("bench", 12, 96, 64, 1024),
        ("bench", 12, 96, 64, 8192),
        ("equal", 16, 128, 128, 4096),
    ],
    "goal": ["mla_v3", 4096],
}
_DRY = {
    "tokens": 64,
    "reps": 1,
    "causal": True,
    "configs": [("mla_v3", 2, 24, 16, 32)],
    "goal": ["mla_v3", 32],
}


def spec(dry: bool, stage: str) -> dict:
    return _DRY if dry else _GPU


def flops(B, N, T, S, H, G, causal) -> tuple[float, float]:
    """(forward, forward + backward) matmul FLOPs (see the module docstring)."""
    half = 0.5 if causal else 1.0
    fwd = 2.0 * B * N * T * S * (H + G) * half
    return fwd, fwd + 2.0 * B * N * T * S * (3 * H + 2 * G) * half


def implementations(H: int, causal: bool) -> dict:
    """name -> o_BTNG = f(q, k, v)."""
    import jax

    from mlalm.kernels import flash_attention
    from mlalm.model.attention import attention_core

    scale = H**-0.5

    def xla(q, k, v):
        return attention_core(q, k, v, scale=scale, causal=causal)[0]

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")

    def pallas(q, k, v):
        return flash_attention(q, k, v, causal=causal, sm_scale=scale)

    return {"pallas": pallas, "xla": xla, "cudnn": cudnn}


def measure(name, N, H, G, T, *, tokens, reps, causal) -> dict:
    """One configuration: a row per implementation with fwd / fwd+bwd ms and TFLOP/s."""
    import jax
    import jax.numpy as jnp

    B = max(1, tokens // T)
    keys = jax.random.split(jax.random.key(0), 4)
    bf = jnp.bfloat16
    q = jax.random.normal(keys[0], (B, T, N, H), bf)
    k = jax.random.normal(keys[1], (B, T, N, H), bf)
    v = jax.random.normal(keys[2], (B, T, N, G), bf)
    ct = jax.random.normal(keys[3], (B, T, N, G), bf)
    f_fwd, f_all = flops(B, N, T, T, H, G, causal)
    row = {
        "shape": name,
        "B": B,
        "T": T,
        "N": N,
        "d_qk": H,
        "d_v": G,
        "causal": causal,
        "fwd_flops": f_fwd,
        "fwd_bwd_flops": f_all,
        "impls": {},
    }
    for impl, f in implementations(H, causal).items():
        r = {}
        if impl == "cudnn" and G != H:
            r["unsupported"] = f"cuDNN attention requires d_v == d_qk (here {G} vs {H})"
        try:
            loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))
            fwd = timed(jax.jit(f), q, k, v, reps=reps)
            both = timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v, reps=reps)
            r = {
                "fwd_ms": 1e3 * fwd["s"],
                "fwd_bwd_ms": 1e3 * both["s"],
                "fwd_tflops": f_fwd / fwd["s"] / 1e12,
                "fwd_bwd_tflops": f_all / both["s"] / 1e12,
                "first_call_s": fwd["first_call_s"] + both["first_call_s"],
            }
        except Exception as e:  # noqa: BLE001 - cuDNN refuses shapes, dtypes and devices it lacks
            why = short_error(e)
            if impl == "cudnn":
                r["unsupported"] = f"{r['unsupported']}: {why}" if r else why
            else:
                r["error"] = why
        row["impls"][impl] = r
    p, x = row["impls"]["pallas"], row["impls"]["xla"]
    if "fwd_ms" in p and "fwd_ms" in x:
        row["pallas_speedup_fwd"] = x["fwd_ms"] / p["fwd_ms"]
        row["pallas_speedup_fwd_bwd"] = x["fwd_bwd_ms"] / p["fwd_bwd_ms"]
    return row


def run(part: str, spec: dict, out) -> None:
    import jax

    out["interpret"] = jax.default_backend() == "cpu"
    out["flop_formula"] = "fwd 2·B·N·T·S·(d_qk+d_v), bwd 2·B·N·T·S·(3·d_qk+2·d_v), halved when causal"
    out["goal_config"] = spec["goal"]
    out["rows"] = []
    errors = []
    for name, N, H, G, T in spec["configs"]:
        row = measure(name, N, H, G, T, tokens=spec["tokens"], reps=spec["reps"], causal=spec["causal"])
        log(
            f"{name} T={T}: "
            + ", ".join(
                f"{i} {r.get('fwd_bwd_ms', r.get('error', r.get('unsupported')))}"
                for i, r in row["impls"].items()
            )
        )
        errors += [f"{name} T={T} {i}: {r['error']}" for i, r in row["impls"].items() if "error" in r]
        out["rows"].append(row)
        if [name, T] == list(spec["goal"]):
            out["goal_speedup_fwd_bwd"] = row.get("pallas_speedup_fwd_bwd")
        out.save()
    if errors:
        raise RuntimeError("; ".join(errors)[:1500])
