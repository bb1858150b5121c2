"""What the benchmark workloads share: the fixed batch, timing summaries, process and
machine facts."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import sys

SEED = 0


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the results)."""
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
    """Median, min, max of per-call wall times (seconds), and CPU seconds per wall second."""
    out = {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_times_s": [round(t, 5) for t in times],
    }
    if cpu:
        # process CPU seconds per wall second: ~n_cpus when the step had every core to
        # itself, less when other work on the machine took some
        out["cpu_per_wall"] = sum(cpu) / sum(times)
    return out


def ratio(a, b):
    """a / b, or None when either is missing (or b is zero)."""
    return a / b if a is not None and b else None


def load_config(spec: dict):
    """The Config a workload's spec names: ``config`` (a YAML path) + ``overrides``."""
    from mlalm.config import load_config as load

    return load(spec["config"], spec.get("overrides", []))


def jax_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "xla_cpu_threads": n_cpus() if dev.platform == "cpu" else None,
    }


def device_peak_memory():
    """Accelerator: peak_bytes_in_use of device 0; CPU: None (host RSS is used)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    return (dev.memory_stats() or {}).get("peak_bytes_in_use")


def peak_memory() -> dict:
    """This process's peak memory and where the figure comes from."""
    dev_peak = device_peak_memory()
    if dev_peak is None:
        return {
            "peak_memory_bytes": max_rss_bytes(),
            "peak_memory_source": "host max RSS of the worker process (ru_maxrss)",
        }
    return {
        "peak_memory_bytes": dev_peak,
        "peak_memory_source": "device peak_bytes_in_use",
        "host_rss_bytes": max_rss_bytes(),
    }


def xla_cost(compiled) -> dict:
    """FLOPs and bytes accessed from XLA's cost analysis of a compiled function (empty
    when the backend gives none)."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return {
            "xla_flops": float(ca.get("flops", 0.0)),
            "xla_bytes_accessed": float(ca.get("bytes accessed", 0.0)),
        }
    except Exception:  # noqa: BLE001 - cost analysis is informative only
        return {}


def machine_info() -> dict:
    """CPU model and notable flags, cores, memory, library versions, the date (UTC)."""
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

    return {
        "cpu_model": cpu,
        "cpu_flags_of_note": sorted(
            flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}
        ),
        "cores": n_cpus(),
        "cores_online": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax_version": ver("jax"),
        "jaxlib_version": ver("jaxlib"),
        "flax_version": ver("flax"),
        "optax_version": ver("optax"),
        "torch_version": ver("torch"),
        "transformers_version": ver("transformers"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
