"""The device's peak FLOP/s, the denominator of MFU.

CPU: the median measured rate of a jitted n x n float32 matmul (no data sheet says what
XLA can reach on a given CPU).  Accelerators: the data-sheet bf16 dense peak
(``mlalm.flops.accelerator_peak``), with a measured bf16 8192^3 matmul beside it (and in
its place for a device not in the table).
"""

from __future__ import annotations

from mlalm.bench.common import jax_info


def measure(n: int = 4096, repeats: int = 5) -> dict:
    """{'peak_flops', 'peak_source', 'matmul' (the measured rate), backend facts}."""
    import jax

    from mlalm.flops import accelerator_peak, matmul_rate

    info = jax_info()
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        r = matmul_rate(n, repeats, "float32")
        return {
            **info,
            "peak_flops": r["median"],
            "peak_source": f"measured: median of {r['repeats']} jitted {r['n']}x{r['n']} float32 matmuls",
            "matmul": r,
        }
    peak = accelerator_peak(dev.device_kind)
    r = matmul_rate(8192, repeats, "bfloat16")
    if peak is None:
        return {
            **info,
            "peak_flops": r["median"],
            "peak_source": "measured bf16 8192^3 matmul (device not in the data-sheet table)",
            "matmul": r,
        }
    return {
        **info,
        "peak_flops": peak,
        "peak_source": f"data sheet bf16 dense ({dev.device_kind})",
        "matmul": r,
    }


def worker(spec: dict) -> dict:
    return measure(spec["n"], spec["repeats"])
