"""What the GPU acceptance stages share: the error metric, device facts, timing, and the
figures file each stage process fills as it goes."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# Data-sheet HBM bandwidth in GB/s by device_kind prefix; the first match wins (so the
# PCIe and NVL H100 come before the SXM one, whose kind is e.g. "NVIDIA H100 80GB HBM3").
HBM_GBPS = (
    ("NVIDIA H100 PCIe", 2000.0),
    ("NVIDIA H100 NVL", 3900.0),
    ("NVIDIA H100", 3350.0),
    ("NVIDIA H200", 4800.0),
    ("NVIDIA GH200", 4000.0),
    ("NVIDIA A100", 2039.0),
)


def log(msg: str) -> None:
    """Progress on stderr (the runner echoes it, prefixed with the stage's name)."""
    print(msg, file=sys.stderr, flush=True)


def hbm_gbps(device_kind: str) -> float | None:
    """Data-sheet memory bandwidth of ``device_kind`` in GB/s, or None (CPU, unknown)."""
    return next((g for prefix, g in HBM_GBPS if device_kind.startswith(prefix)), None)


def err(x, ref, floor: float = 0.0) -> float:
    """max|x - ref| / max(max|ref|, floor), in float64.

    Relative where the reference is large; where it vanishes because its terms cancel
    (dq, dk of attention with one visible key: dS = p ∘ (dP - δ) with dP = δ) the error is
    measured against ``floor``, the size of those terms (the same sum over |terms|,
    computed from the inputs, never from the result under test), which is what float
    arithmetic can promise: n·u·Σ|t_i| for a sum of n terms t_i.  0 when both are 0 and
    x == ref; inf when x differs from an all-zero reference with a zero floor, or holds NaN.
    """
    x, ref = np.asarray(x).astype(np.float64), np.asarray(ref).astype(np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: result {x.shape}, reference {ref.shape}")
    diff = float(np.max(np.abs(x - ref), initial=0.0))
    denom = max(float(np.max(np.abs(ref), initial=0.0)), float(floor))
    if np.isnan(diff):
        return float("inf")
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def f64(x) -> np.ndarray:
    """A jax or numpy array (bfloat16 included: exact in float64) as float64 numpy."""
    return np.asarray(x).astype(np.float64)


def device_facts() -> dict:
    """Device kind, backend, count, compute capability, data-sheet peaks."""
    import jax

    from mlalm.flops import accelerator_peak

    dev = jax.devices()[0]
    return {
        "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "compute_capability": getattr(dev, "compute_capability", None),
        "hbm_gbps_datasheet": hbm_gbps(dev.device_kind),
        "bf16_peak_flops_datasheet": accelerator_peak(dev.device_kind),
        "jax_version": jax.__version__,
    }


def timed(fn, *args, reps: int, rounds: int = 3) -> dict:
    """Seconds per call of a jitted ``fn``: the first call (compilation included), then
    ``rounds`` rounds of ``reps`` back-to-back calls blocked on at the end (so host
    dispatch overlaps device work, as in a training loop); the median round / reps.

    Returns:
        {'s': median seconds per call, 's_min': fastest round's, 'first_call_s'}.
    """
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    del out
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / reps)
    per_call.sort()
    return {"s": per_call[len(per_call) // 2], "s_min": per_call[0], "first_call_s": first}


def short_error(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:limit]


class Figures(dict):
    """A stage part's figures, written to its JSON file (atomically) on every ``save()``,
    so that a part stopped by its time budget still leaves what it measured."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self, f, indent=1, default=_plain)
        os.replace(tmp, self.path)


def _plain(x):
    """numpy scalars and arrays for json.dump."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-able: {type(x).__name__}")
