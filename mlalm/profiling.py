"""Where a compiled step's time goes: per-HLO-op times from a ``jax.profiler`` trace,
grouped by phase (forward / backward / update), kind (matmul, elementwise, copy, ...) and
model part.

Parts come from the named scopes the model opens (``jax.named_scope``): 'attention'
(with 'core' and 'rope'), 'moe' ('router', 'experts', 'shared'), 'ffn', 'norm', 'embed',
'lm_head_loss', and the trainer's 'optimizer'.  ``scripts/bench.py --profile`` prints the
breakdown of the training step::

    from mlalm.profiling import op_profile
    compiled = step_fn.lower(state, batch).compile()
    report = op_profile(compiled, [state, batch], donate=True, calls=3)
    report["by_part"]   # {"attention core: QK and PV products": seconds per call, ...}
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time


def _hlo_instructions(hlo_text: str) -> dict:
    """name -> (opcode, shape, op_name, fusion kind) for the instructions of an HLO module."""
    line_re = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(")
    out = {}
    for line in hlo_text.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        kind = re.search(r"kind=(k\w+)", line)
        custom = "__ynn_fusion" in line or "__onednn" in line
        out[m.group(1)] = (
            m.group(3),
            m.group(2),
            op.group(1) if op else "",
            "matmul-fusion" if custom else (kind.group(1) if kind else ""),
        )
    return out


def _part(tokens: set, k: str) -> str:
    """The model part of an op from the named scopes in its op_name (the model opens
    'attention', 'core', 'rope', 'moe', 'router', 'experts', 'shared', 'ffn', 'norm',
    'embed', 'lm_head_loss'; the trainer 'optimizer')."""
    mm = k == "matmul"
    if "optimizer" in tokens:
        return "update: clip, AdamW, guard, bias"
    if "lm_head_loss" in tokens:
        return "LM head + loss (matmuls)" if mm else "LM head + loss (softmax, elementwise)"
    if "norm" in tokens:
        return "norms"
    if "attention" in tokens:
        if "core" in tokens:
            return (
                "attention core: QK and PV products" if mm else "attention core: mask, softmax, block slices"
            )
        if "rope" in tokens:
            return "attention: rope"
        return "attention projections" if mm else "attention: other elementwise (split, concat)"
    if "router" in tokens:
        return "MoE router"
    if "experts" in tokens:
        return "routed experts (matmuls)" if mm else "routed experts: dispatch, combine, activation"
    if "shared" in tokens or "ffn" in tokens:
        return "dense FFN / shared expert (matmuls)" if mm else "dense FFN / shared expert: activation"
    return "embedding, residuals, loss mean, other"


def _classify(name, opcode, op_name, kind):
    """(phase, kind, part) of one HLO instruction, from its op_name metadata: the phase from
    JAX's jvp/transpose markers, the part from the model's named scopes.  The fused loss
    computes its gradient inside its forward pass, so that work counts as 'forward'."""
    tokens = set(re.split(r"[/()]", op_name))
    if "optimizer" in tokens:
        phase = "update (optimizer, guards, bias)"
    elif "transpose(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        phase = "update (optimizer, guards, bias)"
    is_dot = "dot_general" in op_name
    if opcode in ("dot", "convolution") or (kind == "matmul-fusion" and is_dot):
        k = "matmul"
    elif opcode == "copy" or name.startswith("copy"):
        k = "copy"
    elif any(s in name for s in ("scatter", "gather", "sort")):
        k = "gather/scatter/sort"
    else:
        k = "elementwise/reduce"  # incl. YNNPACK reduce fusions
    return phase, k, _part(tokens, k)


def op_profile(compiled, args, donate: bool, calls: int) -> dict:
    """Per-HLO-op time of ``calls`` calls of a compiled step, from a jax.profiler trace
    (perfetto JSON; XLA:CPU records one event per executed thunk), grouped by phase
    (forward / backward / update), kind (matmul, elementwise, copy, ...) and model part."""
    import jax

    info = _hlo_instructions(compiled.as_text())
    args = list(args)
    tmp = tempfile.mkdtemp(prefix="mlalm-bench-trace-")
    try:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                r = compiled(*args)
                jax.block_until_ready(r)
                if donate:
                    args[0] = r[0]
        wall = (time.perf_counter() - t0) / calls
        files = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not files:
            return {"error": "the profiler wrote no perfetto trace"}
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in info:
            per_op[e["name"]] += e.get("dur", 0.0) * 1e-6 / calls
    if not per_op:
        return {"error": "no per-op events in the trace (this backend does not record them)"}
    by = {
        "phase": collections.defaultdict(float),
        "kind": collections.defaultdict(float),
        "part": collections.defaultdict(float),
        "phase_kind": collections.defaultdict(float),
    }
    rows = []
    for name, sec in per_op.items():
        opcode, shape, op_name, kind = info[name]
        phase, k, part = _classify(name, opcode, op_name, kind)
        by["phase"][phase] += sec
        by["kind"][k] += sec
        by["part"][part] += sec
        by["phase_kind"][f"{phase} / {k}"] += sec
        rows.append(
            {
                "op": name,
                "s": sec,
                "kind": k,
                "phase": phase,
                "part": part,
                "shape": shape.split("{")[0][:60],
                "op_name": op_name[:90],
            }
        )
    rows.sort(key=lambda r: -r["s"])
    return {
        "calls": calls,
        "wall_s_per_call": wall,
        "ops_s_per_call": sum(per_op.values()),
        "n_ops": len(per_op),
        **{f"by_{k}": dict(sorted(v.items(), key=lambda x: -x[1])) for k, v in by.items()},
        "top_ops": rows[:25],
        **({"all_ops": rows} if os.environ.get("MLALM_BENCH_ALL_OPS") else {}),
    }
