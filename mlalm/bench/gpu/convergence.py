"""Stage ``bf16_convergence``: a small MLA + MoE model trained in bfloat16 compute and in
float32 on the same batches; the loss curves must agree and stay finite.

Data: a fixed first-order Markov chain over V tokens, each token followed by one of 4
successors with probabilities (0.4, 0.3, 0.2, 0.1) -- learnable, needs no tokenizer or
Grain, and its loss floor is known: the entropy rate -Σ p ln p = 1.2799 nats, against
ln V for a model that has learned nothing.  Both runs use float32 parameters and AdamW
state (``model.param_dtype=float32``) and the same step as train.py; the float32 run
multiplies in full float32 (``jax.default_matmul_precision('float32')``: GPUs would
otherwise use TF32, itself a reduced precision).

Agreement: mean |loss_bf16 - loss_f32| over the last ``tail`` steps <= ``tol`` nats.
The same batch at the same step makes the noise of the two curves common: what remains is
bf16 rounding (2^-9 relative per activation) carried through a few layers, measured on
CPU at 0.0005-0.002 nats for the dry run's model and 0.006-0.024 nats for
tests/test_bf16.py's (tol 0.05), while a run that diverges, stalls or learns at a
different rate differs by tenths (a model that learned nothing sits ln V - 1.28 = 4.9
nats above the floor at V = 512).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from mlalm.bench.gpu.common import log

PARTS = ("main",)
PROBS = (0.4, 0.3, 0.2, 0.1)

_MODEL = {
    "model": {"vocab_size": 512, "d_model": 256, "n_layers": 4, "ffn_dim": 768, "max_seq_len": 256},
    "attention": {
        "kind": "mla",
        "n_heads": 4,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
    },
    "moe": {"n_routed_experts": 8, "top_k": 2, "expert_ffn_dim": 256, "first_k_dense_replace": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 30},
    "train": {"batch_size": 16, "seq_len": 256},
}
# the dry run: a one-layer dense model (XLA's CPU backend compiles the MoE step twice as
# slowly, and bfloat16 programs twice as slowly again; tests/test_bf16.py trains MoE in bf16)
_DRY_MODEL = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "ffn_dim": 64, "max_seq_len": 32},
    "attention": {
        "kind": "mla",
        "n_heads": 2,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
    },
    "optim": {"lr": 1e-2, "warmup_steps": 5},
    "train": {"batch_size": 8, "seq_len": 32},
}


def spec(dry: bool, stage: str) -> dict:
    if dry:
        return {"config": _DRY_MODEL, "steps": 40, "tail": 10, "tol": 0.05, "seed": 0}
    return {"config": _MODEL, "steps": 300, "tail": 50, "tol": 0.05, "seed": 0}


def entropy_rate() -> float:
    return -sum(p * math.log(p) for p in PROBS)


def markov_batches(vocab: int, steps: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[steps, batch, seq_len + 1] int32 token ids from the fixed Markov chain."""
    rng = np.random.default_rng(seed)
    succ = np.stack([rng.choice(vocab, len(PROBS), replace=False) for _ in range(vocab)])
    n = steps * batch
    x = np.empty((n, seq_len + 1), np.int64)
    x[:, 0] = rng.integers(0, vocab, n)
    for t in range(seq_len):
        x[:, t + 1] = succ[x[:, t], rng.choice(len(PROBS), n, p=PROBS)]
    return x.reshape(steps, batch, seq_len + 1).astype(np.int32)


def train_curve(raw: dict, dtype: str, batches: np.ndarray, seed: int) -> dict:
    """Train ``raw`` (a config dict) in compute ``dtype`` on ``batches``; per-step losses,
    whether every update was applied, and the dtypes of the parameters and AdamW state."""
    import jax
    import jax.numpy as jnp

    from mlalm.config import from_dict
    from mlalm.optim import build_optimizer
    from mlalm.train import init_state, make_train_step

    raw = {k: dict(v) for k, v in raw.items()}
    raw["model"].update(dtype=dtype, param_dtype="float32")
    cfg = from_dict(raw)
    steps = len(batches)
    tx, schedule = build_optimizer(cfg, steps)
    precision = jax.default_matmul_precision("float32") if dtype == "float32" else contextlib.nullcontext()
    with precision:
        graphdef, state = init_state(cfg, tx, seed=seed)
        step_fn = make_train_step(graphdef, tx, schedule, cfg)
        metrics = []
        for b in batches:
            state, m = step_fn(state, jnp.asarray(b))
            metrics.append((m["loss"], m["applied"]))
        losses = [float(x) for x, _ in metrics]
        applied = all(bool(a) for _, a in metrics)
    float_dtypes = lambda tree: sorted(
        {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    )
    return {
        "losses": losses,
        "all_applied": applied,
        "param_dtypes": float_dtypes(state.params),
        "opt_state_dtypes": float_dtypes(state.opt_state),
    }


def run(part: str, spec: dict, out) -> None:
    raw, steps, tail, tol = spec["config"], spec["steps"], spec["tail"], spec["tol"]
    t = raw["train"]
    V = raw["model"]["vocab_size"]
    batches = markov_batches(V, steps, t["batch_size"], t["seq_len"], spec["seed"])
    out.update(
        steps=steps,
        tail=tail,
        tol_nats=tol,
        vocab=V,
        uniform_loss=math.log(V),
        loss_floor=entropy_rate(),
        tokens_per_step=t["batch_size"] * t["seq_len"],
    )
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = r = train_curve(raw, dtype, batches, spec["seed"])
        log(f"{dtype}: loss {r['losses'][0]:.3f} -> {np.mean(r['losses'][-tail:]):.3f}")
        out[dtype] = {
            "first_loss": r["losses"][0],
            "tail_mean_loss": float(np.mean(r["losses"][-tail:])),
            "all_finite": bool(np.all(np.isfinite(r["losses"]))),
            "all_applied": r["all_applied"],
            "param_dtypes": r["param_dtypes"],
            "opt_state_dtypes": r["opt_state_dtypes"],
            "losses": [round(x, 5) for x in r["losses"]],
        }
        out.save()
    d = np.abs(np.asarray(runs["bfloat16"]["losses"]) - np.asarray(runs["float32"]["losses"]))
    out["mean_abs_diff_tail"] = float(np.mean(d[-tail:]))
    out["max_abs_diff"] = float(np.max(d))
    # learned: each tail mean closed at least half the gap between ln V and the floor
    half_way = (math.log(V) + entropy_rate()) / 2
    problems = []
    for dtype in runs:
        o = out[dtype]
        if not (o["all_finite"] and o["all_applied"]):
            problems.append(f"{dtype}: a non-finite loss or a skipped update")
        if not o["tail_mean_loss"] < half_way:
            problems.append(f"{dtype}: tail loss {o['tail_mean_loss']:.3f} is not below {half_way:.3f}")
        if o["param_dtypes"] != ["float32"] or o["opt_state_dtypes"] != ["float32"]:
            problems.append(
                f"{dtype}: parameters {o['param_dtypes']}, AdamW state {o['opt_state_dtypes']} (want float32)"
            )
    if not out["mean_abs_diff_tail"] <= tol:
        problems.append(
            f"mean |Δloss| over the last {tail} steps {out['mean_abs_diff_tail']:.4f} > {tol} nats"
        )
    out["agree"] = not problems
    out.save()
    if problems:
        raise RuntimeError("; ".join(problems))
