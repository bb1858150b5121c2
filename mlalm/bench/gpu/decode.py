"""Stage ``decode``: the latent MLA decode kernel (``mlalm.kernels.mla_decode``) against
the device's memory bandwidth and against the XLA path generation runs with
``attention.impl=xla`` (``mlalm.model.attention.absorbed_mla_attention``).

One decode step reads the whole latent cache once: B·S·(R + P) elements (c_kv and the
shared rope key; DeepSeek-V3's R = 512, P = 64, N = 16 query heads), which dwarfs the
queries and outputs (B·N·(2R + P)).  Achieved bandwidth = cache bytes / time per call;
its fraction of the data-sheet HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) is the
figure the goal names, taken at the largest cache measured (batch 64, context 32k):
there launch and split-combine overheads weigh least, as in long-context serving.
"""

from __future__ import annotations

from mlalm.bench.gpu.common import hbm_gbps, log, short_error, timed

PARTS = ("main",)

_GPU = {
    "N": 16,
    "R": 512,
    "P": 64,
    "reps": 20,
    # (batch, context), the goal's (largest) first
    "configs": [
        (64, 32768),
        (8, 4096),
        (8, 16384),
        (8, 32768),
        (32, 4096),
        (32, 16384),
        (32, 32768),
        (64, 4096),
        (64, 16384),
    ],
    "goal": [64, 32768],
}
_DRY = {"N": 4, "R": 32, "P": 16, "reps": 1, "configs": [(2, 100)], "goal": [2, 100]}


def spec(dry: bool, stage: str) -> dict:
    return _DRY if dry else _GPU


def measure(B, S, *, N, R, P, reps, peak_gbps) -> dict:
    """One (batch, context): ms, GB/s and fraction of peak for the kernel and XLA."""
    import jax
    import jax.numpy as jnp

    from mlalm.kernels import mla_decode
    from mlalm.model.attention import absorbed_mla_attention

    bf = jnp.bfloat16
    keys = jax.random.split(jax.random.key(1), 4)
    q_abs = jax.random.normal(keys[0], (B, N, R), bf)
    q_pe = jax.random.normal(keys[1], (B, N, P), bf)
    c_kv = jax.random.normal(keys[2], (B, S, R), bf)
    k_pe = jax.random.normal(keys[3], (B, S, P), bf)
    lengths = jnp.full((B,), S, jnp.int32)  # full caches: every row is read
    scale = 192**-0.5  # (d_n + d_r)^-1/2 of DeepSeek-V3; the time does not depend on it
    cache_bytes = B * S * (R + P) * 2

    def pallas(qa, qp, c, kp, n):
        return mla_decode(qa, qp, c, kp, n, sm_scale=scale)

    def xla(qa, qp, c, kp, n):  # one new token per sequence at position length - 1
        o = absorbed_mla_attention(qa[:, None], qp[:, None], c, kp, (n - 1)[:, None], scale=scale)
        return o[:, 0]

    row = {"B": B, "S": S, "N": N, "R": R, "P": P, "cache_bytes": cache_bytes, "impls": {}}
    for impl, f in (("pallas", pallas), ("xla", xla)):
        try:
            t = timed(jax.jit(f), q_abs, q_pe, c_kv, k_pe, lengths, reps=reps)
            gbps = cache_bytes / t["s"] / 1e9
            row["impls"][impl] = {
                "ms": 1e3 * t["s"],
                "gbps": gbps,
                "frac_hbm": gbps / peak_gbps if peak_gbps else None,
                "first_call_s": t["first_call_s"],
            }
        except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
            row["impls"][impl] = {"error": short_error(e)}
    p, x = row["impls"]["pallas"], row["impls"]["xla"]
    if "ms" in p and "ms" in x:
        row["pallas_speedup"] = x["ms"] / p["ms"]
    return row


def run(part: str, spec: dict, out) -> None:
    import jax

    peak = hbm_gbps(jax.devices()[0].device_kind)
    out.update(
        interpret=jax.default_backend() == "cpu",
        hbm_gbps_datasheet=peak,
        bytes_counted="latent cache c_kv + k_pe, bfloat16: B·S·(R+P)·2",
        goal_config=spec["goal"],
        rows=[],
    )
    errors = []
    for B, S in spec["configs"]:
        row = measure(B, S, N=spec["N"], R=spec["R"], P=spec["P"], reps=spec["reps"], peak_gbps=peak)
        log(
            f"B={B} S={S}: "
            + ", ".join(f"{i} {r.get('gbps', r.get('error'))}" for i, r in row["impls"].items())
        )
        errors += [f"B={B} S={S} {i}: {r['error']}" for i, r in row["impls"].items() if "error" in r]
        out["rows"].append(row)
        if [B, S] == list(spec["goal"]):
            out["goal_frac_hbm"] = row["impls"]["pallas"].get("frac_hbm")
            out["goal_gbps"] = row["impls"]["pallas"].get("gbps")
        out.save()
    if errors:
        raise RuntimeError("; ".join(errors)[:1500])
