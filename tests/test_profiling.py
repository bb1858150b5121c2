"""The per-op profiler's grouping: phases from JAX's jvp/transpose markers, parts from the
model's named scopes, checked on op names JAX really produces."""

import re

import jax
import jax.numpy as jnp
import pytest

from mlalm.profiling import _classify, _hlo_instructions, op_profile


def _scoped_loss(w, x):
    with jax.named_scope("attention"):
        with jax.named_scope("core"):
            s = jnp.tanh(x @ w)
    with jax.named_scope("ffn"):
        y = s @ w.T
    return jnp.sum(y * y)


def _compiled():
    w, x = jnp.ones((64, 64)) * 0.01, jnp.ones((32, 64))
    return jax.jit(jax.grad(_scoped_loss)).lower(w, x).compile(), (w, x)


def test_instructions_carry_the_scopes_and_phases():
    compiled, _ = _compiled()
    info = _hlo_instructions(compiled.as_text())
    parts = {}
    for name, (opcode, _, op_name, kind) in info.items():
        if op_name:
            phase, k, part = _classify(name, opcode, op_name, kind)
            parts.setdefault((phase, part), set()).add(k)
    # the forward and the backward of the scoped matmuls are both found and named
    assert ("forward", "attention core: QK and PV products") in parts
    assert ("backward", "attention core: QK and PV products") in parts
    assert ("forward", "dense FFN / shared expert (matmuls)") in parts
    assert any(p == "attention core: mask, softmax, block slices" for _, p in parts)  # tanh


@pytest.mark.parametrize(
    "op_name,opcode,want",
    [
        (
            "jit(step)/jvp(attention)/core/BNTH,BNSH->BNTS/dot_general",
            "dot",
            ("forward", "matmul", "attention core: QK and PV products"),
        ),
        (
            "jit(step)/transpose(jvp(attention))/core/reduce_sum",
            "fusion",
            ("backward", "elementwise/reduce", "attention core: mask, softmax, block slices"),
        ),
        ("jit(step)/jvp(attention)/rope/mul", "fusion", ("forward", "elementwise/reduce", "attention: rope")),
        ("jit(step)/jvp(attention)/dot_general", "dot", ("forward", "matmul", "attention projections")),
        (
            "jit(step)/jvp(moe)/experts/ECD,EDF->ECF/dot_general",
            "dot",
            ("forward", "matmul", "routed experts (matmuls)"),
        ),
        ("jit(step)/jvp(moe)/router/logistic", "fusion", ("forward", "elementwise/reduce", "MoE router")),
        (
            "jit(step)/transpose(jvp(moe))/shared/dot_general",
            "dot",
            ("backward", "matmul", "dense FFN / shared expert (matmuls)"),
        ),
        (
            "jit(step)/jvp(lm_head_loss)/exp",
            "fusion",
            ("forward", "elementwise/reduce", "LM head + loss (softmax, elementwise)"),
        ),
        ("jit(step)/jvp(attention)/norm/rsqrt", "fusion", ("forward", "elementwise/reduce", "norms")),
        (
            "jit(step)/optimizer/cond/add",
            "fusion",
            ("update (optimizer, guards, bias)", "elementwise/reduce", "update: clip, AdamW, guard, bias"),
        ),
    ],
)
def test_classify(op_name, opcode, want):
    assert _classify("op", opcode, op_name, "") == want


def test_op_profile_times_the_compiled_function():
    compiled, args = _compiled()
    r = op_profile(compiled, list(args), donate=False, calls=2)
    if "error" in r:
        pytest.skip(f"this backend's profiler gives no per-op events: {r['error']}")
    assert r["ops_s_per_call"] > 0 and r["n_ops"] > 0
    # every op's time is in exactly one part, one phase and one kind
    for key in ("by_part", "by_phase", "by_kind"):
        assert sum(r[key].values()) == pytest.approx(r["ops_s_per_call"], rel=1e-9)
    assert any(re.search("attention core", p) for p in r["by_part"])
