"""Decoding throughput with the absorbed MLA cache (the latent c and the shared rope key
per token) against the naive one (keys and values expanded per head), at several
context lengths: ``mlalm.decode_speed.measure_decode`` on the benchmark model."""

from __future__ import annotations

from mlalm.bench.common import SEED, load_config, log, max_rss_bytes, ratio


def measure(cfg, *, batch: int, contexts: list, new_tokens: int) -> dict:
    """{'batch', 'new_tokens', 'runs': one per (mode, context), 'peak_memory_bytes'}."""
    from flax import nnx

    from mlalm.decode_speed import measure_decode
    from mlalm.model import Transformer

    model = Transformer(cfg, rngs=nnx.Rngs(SEED))
    out = {"batch": batch, "new_tokens": new_tokens, "runs": []}
    for absorbed in (True, False):
        mode = "absorbed" if absorbed else "naive"
        for ctx in contexts:
            log(f"  decode {mode} context {ctx}")
            r = measure_decode(model, batch=batch, context=ctx, new_tokens=new_tokens, absorbed=absorbed)
            out["runs"].append({"mode": mode, **r})
    out["peak_memory_bytes"] = max_rss_bytes()
    return out


def worker(spec: dict) -> dict:
    """Spec: 'config', 'overrides', 'batch', 'contexts', 'new_tokens'."""
    return measure(
        load_config(spec), batch=spec["batch"], contexts=spec["contexts"], new_tokens=spec["new_tokens"]
    )


def summary(dec: dict) -> dict:
    """tokens/s by mode and context, and absorbed / naive by context."""
    table = {"absorbed": {}, "naive": {}}
    for r in dec["runs"]:
        table[r["mode"]][str(r["context"])] = r["tokens_per_s"]
    return {
        "decode": table,
        "decode_absorbed_speedup": {
            c: ratio(table["absorbed"].get(c), table["naive"].get(c)) for c in table["absorbed"]
        },
    }
