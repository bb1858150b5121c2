"""mlalm.generate against independent references.

* Cached greedy decoding against full recomputation: the training forward pass
  ``model(tokens)`` over the whole sequence at every step (no cache code involved), the
  next token its argmax at the last real position.  The sequence sits in a fixed-length
  buffer padded after its end, so one compiled program serves every step: by causality
  the logits at position n-1 do not depend on the padding after it.
* Cache sizes against the per-token formulas of the "KV cache" section of
  docs/architecture.md, written out by hand.
* Sampling filters against a numpy nucleus / top-k reference; temperature sampling
  frequencies against softmax(logits / T).

Models are tiny (d_model 32, 2 layers) and built abstractly then filled from numpy, as in
test_model.py; the vocabulary is the byte tokenizer's (257) so the script test can share
the models.
"""

import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_model
from mlalm.config import from_dict
from mlalm.data.tokenizers import ByteTokenizer
from mlalm.decode_speed import measure_decode
from mlalm.generate import cache_bytes, decode_step, generate, init_cache, prefill
from mlalm.model import Transformer, kv_cache_bytes_per_token_per_layer
from mlalm.sampling import filter_logits, sample

V, D, L = 257, 32, 16  # vocab, width, reference buffer length
MLA = dict(
    kind="mla",
    n_heads=4,
    q_lora_rank=0,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
ATTN = {
    "mha": dict(kind="mha", n_heads=4, head_dim=8),
    "gqa": dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=8),
    "mqa": dict(kind="mqa", n_heads=4, head_dim=8),
    "mla": MLA,
    "mla_qlora": dict(MLA, q_lora_rank=12),
    "mla_moe": dict(MLA, q_lora_rank=12),
}
# layer 0 dense, layer 1 MoE; dropless so that routing never depends on the batch
MOE = dict(
    n_routed_experts=8,
    n_shared_experts=1,
    top_k=2,
    expert_ffn_dim=16,
    first_k_dense_replace=1,
    dispatch="dropless",
)
PROMPTS = [[5, 17, 200], [1, 2, 3, 250, 4, 99, 7]]  # different lengths, same batch
N_NEW = 6
MAX_LEN = 64  # what generate() allocates for these prompts, so compilations are shared


def make_cfg(name, **over):
    model = dict(
        vocab_size=V, d_model=D, n_layers=2, ffn_dim=64, max_seq_len=32, init_std=0.1, rope_theta=500.0
    )
    model.update(over.pop("model", {}))
    attn = dict(ATTN[name], **over.pop("attention", {}))
    return from_dict(
        {"model": model, "attention": attn, "moe": MOE if name == "mla_moe" else {}, "train": {"seq_len": 16}}
    )


def build(cfg, seed=0):
    """Weights N(0, 0.1), norm scales 1 + N(0, 0.3), routing biases N(0, 0.1) (so a decode
    path that dropped the bias would show; ``conftest.random_model``)."""
    return random_model(cfg, seed=seed, scale=0.1, norm_spread=0.3)


def recompute_greedy(model, prompts, n_new):
    """Greedy decoding by full recomputation: tokens [B][n_new] and logits [n_new, B, V]."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    seqs = [list(p) for p in prompts]
    logits = []
    for _ in range(n_new):
        buf = np.zeros((len(seqs), L), np.int32)
        for b, s in enumerate(seqs):
            buf[b, : len(s)] = s
        full = np.asarray(forward(state, jnp.asarray(buf)))
        last = np.stack([full[b, len(s) - 1] for b, s in enumerate(seqs)])
        logits.append(last)
        for b, s in enumerate(seqs):
            s.append(int(np.argmax(last[b])))
    return [s[len(p) :] for s, p in zip(seqs, prompts)], np.stack(logits)


def cached_greedy(model, prompts, n_new, *, absorbed=True, max_len=MAX_LEN):
    """Greedy decoding with prefill + decode_step; tokens [B][n_new], logits [n_new, B, V]."""
    lengths = [len(p) for p in prompts]
    tokens = np.zeros((len(prompts), 8), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    cache = init_cache(model, len(prompts), max_len, absorbed=absorbed)
    step_logits, cache = prefill(model, cache, tokens, lengths)
    logits = [np.asarray(step_logits)]
    for _ in range(n_new - 1):
        step_logits, cache = decode_step(model, cache, np.argmax(logits[-1], axis=-1))
        logits.append(np.asarray(step_logits))
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), np.add(lengths, n_new - 1))
    logits = np.stack(logits)
    return np.argmax(logits, axis=-1).T.tolist(), logits


_models, _reference = {}, {}


def model_for(name):
    if name not in _models:
        _models[name] = build(make_cfg(name))
    return _models[name]


def reference_for(name):
    if name not in _reference:
        _reference[name] = recompute_greedy(model_for(name), PROMPTS, N_NEW)
    return _reference[name]


# ---------------------------------------------------------------------------------------
# Cached decoding = full recomputation
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTN))
def test_cached_greedy_equals_full_recompute(name):
    model = model_for(name)
    ref_tokens, ref_logits = reference_for(name)
    tokens, logits = cached_greedy(model, PROMPTS, N_NEW)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


def test_absorbed_equals_expanded_cache():
    model = model_for("mla")
    ref_tokens, ref_logits = reference_for("mla")
    tokens_a, logits_a = cached_greedy(model, PROMPTS, N_NEW, absorbed=True)
    tokens_n, logits_n = cached_greedy(model, PROMPTS, N_NEW, absorbed=False)
    assert tokens_n == tokens_a == ref_tokens
    np.testing.assert_allclose(logits_n, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits_a, logits_n, atol=2e-5, rtol=0)


def test_pallas_decode_equals_xla(monkeypatch):
    """impl='pallas' decodes with mla_decode (interpret mode on CPU): same logits."""
    import mlalm.kernels

    calls = []
    kernel = mlalm.kernels.mla_decode
    monkeypatch.setattr(mlalm.kernels, "mla_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = build(make_cfg("mla", attention={"impl": "pallas"}))
    ref_tokens, ref_logits = reference_for("mla")  # same weights, impl='xla'
    tokens, logits = cached_greedy(model, PROMPTS, N_NEW, max_len=128)
    assert calls, "the pallas decode path was not taken"
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


def test_batch_of_different_lengths_equals_each_alone():
    model = model_for("mla")
    batched = generate(model, PROMPTS, N_NEW)
    alone = [generate(model, [p], N_NEW)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == N_NEW for t in batched)
    assert batched == reference_for("mla")[0]  # and with full recomputation


def test_top_k_1_is_greedy_and_eos_stops_a_row():
    model = model_for("mla")
    greedy = generate(model, PROMPTS, N_NEW)
    assert generate(model, PROMPTS, N_NEW, temperature=1.5, top_k=1, seed=3) == greedy
    eos = greedy[0][2]  # row 0 stops at its first eos (index <= 2), row 1 if it has one
    seen = []
    out = generate(model, PROMPTS, N_NEW, eos_id=eos, on_token=lambda i, t: seen.append(t))
    cuts = [g.index(eos) + 1 if eos in g else N_NEW for g in greedy]
    assert out == [g[:c] for g, c in zip(greedy, cuts)]
    assert len(seen) == max(cuts)  # stops when every row has stopped
    for step, tokens in enumerate(seen):  # finished rows stream -1
        assert [t == -1 for t in tokens] == [step >= c for c in cuts]


# ---------------------------------------------------------------------------------------
# Cache sizes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,absorbed,dtype,expected",
    [
        ("mha", True, "float32", 2 * 4 * 8 * 4),  # 2·n_h·d_h·b
        ("gqa", True, "float32", 2 * 2 * 8 * 4),  # 2·n_kv·d_h·b
        ("mqa", True, "float32", 2 * 8 * 4),  # 2·d_h·b
        ("mla", True, "float32", (16 + 4) * 4),  # (d_c + d_r)·b
        ("mla", False, "float32", 4 * (8 + 4 + 6) * 4),  # n_h·(d_n + d_r + d_v)·b
        ("mla", True, "bfloat16", (16 + 4) * 2),
        ("mla", False, "bfloat16", 4 * (8 + 4 + 6) * 2),
        ("gqa", True, "bfloat16", 2 * 2 * 8 * 2),
    ],
)
def test_cache_bytes_per_token_per_layer(name, absorbed, dtype, expected):
    cfg = make_cfg(name, model={"dtype": dtype})
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    B, S = 3, 40
    cache = init_cache(model, B, S, absorbed=absorbed)  # dtype: the compute dtype
    per = cache_bytes(cache) / (B * S * cfg.model.n_layers)
    assert per == expected == kv_cache_bytes_per_token_per_layer(cfg, absorbed=absorbed)
    assert cache["lengths"].shape == (B,) and cache["lengths"].dtype == jnp.int32


def test_measure_decode_beyond_max_seq_len():
    model = model_for("mla")
    r = measure_decode(model, batch=2, context=40, new_tokens=3)  # max_seq_len is 32
    assert r["tokens_per_s"] > 0 and r["batch"] == 2 and r["context"] == 40
    assert r["bytes_per_token_per_layer"] == (16 + 4) * 4
    assert r["cache_bytes"] == r["bytes_per_token"] * 2 * r["max_len"]


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def nucleus_reference(logits, top_k, top_p):
    """numpy: indices kept by top-k then top-p (smallest prefix reaching top_p)."""
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(logits[order] - logits[order].max())
    p /= p.sum()
    kept, mass = [], 0.0
    for i, pi in zip(order, p):
        kept.append(int(i))
        mass += pi
        if mass >= top_p:
            break
    return set(kept)


_filter = jax.jit(filter_logits)


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 0.5), (0, 0.9), (0, 0.999), (5, 0.9), (3, 1.0), (0, 1e-3), (12, 0.75)]
)
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(1).normal(0, 2, 40).astype(np.float32)
    kept = np.isfinite(np.asarray(_filter(logits, top_k, top_p)))
    assert set(np.flatnonzero(kept).tolist()) == nucleus_reference(logits.astype(np.float64), top_k, top_p)


_sample_many = jax.jit(
    lambda key, logits, t, k, p: sample(key, jnp.broadcast_to(logits, (20000,) + logits.shape), t, k, p)
)


def test_top_p_samples_stay_in_nucleus():
    logits = np.random.default_rng(2).normal(0, 1.5, 12).astype(np.float32)
    nucleus = nucleus_reference(logits.astype(np.float64), 0, 0.8)
    draws = np.asarray(_sample_many(jax.random.key(0), logits, 1.0, 0, 0.8))
    assert set(np.unique(draws).tolist()) <= nucleus
    assert len(set(np.unique(draws).tolist())) == len(nucleus)  # and uses all of it


def test_temperature_frequencies_match_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -0.2, 0.3, 1.5, -2.0, 0.1, 0.7, -0.5], np.float32)
    T = 0.7
    draws = np.asarray(_sample_many(jax.random.key(1), logits, T, 0, 1.0))
    freq = np.bincount(draws, minlength=len(logits)) / draws.size
    z = logits.astype(np.float64) / T
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    # 20000 draws: standard error <= 0.0036; T = 1 would be off by > 0.05
    np.testing.assert_allclose(freq, p, atol=0.015)
    greedy = np.asarray(_sample_many(jax.random.key(1), logits, 0.0, 0, 1.0))
    assert (greedy == 0).all()


def test_bad_sampling_arguments():
    from mlalm.errors import ConfigError, DataError

    model = model_for("mla")
    for kw in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)):
        with pytest.raises(ConfigError):
            generate(model, PROMPTS, 2, **kw)
    with pytest.raises(DataError, match="prompt 1 is empty"):
        generate(model, [[1], []], 2)
    with pytest.raises(DataError, match="outside"):
        generate(model, [[1, V]], 2)


def test_generate_refuses_to_run_past_max_seq_len():
    """max_seq_len is 32 (make_cfg); the longest prompt has 7 tokens: 25 new tokens fit,
    26 would put the sequence at 33 positions."""
    from mlalm.errors import ConfigError
    from mlalm.generate import generate_text

    model = model_for("mla")
    assert model.cfg.model.max_seq_len == 32 and max(map(len, PROMPTS)) == 7
    with pytest.raises(
        ConfigError,
        match=r"prompt of 7 tokens \+ max_new_tokens=26 = 33 exceeds "
        r"the model's max_seq_len=32: use max_new_tokens <= 25",
    ):
        generate(model, PROMPTS, 26)
    out = generate(model, PROMPTS, 25)
    assert [len(o) for o in out] == [25, 25]
    assert [o[:N_NEW] for o in out] == reference_for("mla")[0]
    tok = ByteTokenizer()
    with pytest.raises(ConfigError, match=r"prompt of 30 tokens \+ max_new_tokens=3 = 33 exceeds"):
        generate_text(model, tok, ["x" * 30], 3)
    with pytest.raises(ConfigError, match=r"prompt of 32 tokens .* shorten the prompt"):
        generate(model, [[1] * 32], 1)


@pytest.mark.parametrize("name", ["gqa", "mla_moe"])
def test_programs_compile_once_per_model_structure(name, monkeypatch):
    """generate() traces its prefill and decode programs once per model structure and
    shapes: a second call (other prompts of the same padded shape, other sampling
    settings), the step functions with those shapes, and a second model of the same
    config (other weights) all reuse them."""
    cfg = make_cfg(name, model={"rope_theta": 321.0})  # a structure no other test compiles
    traces = []
    original = Transformer.forward_cached

    def counting(self, *args):
        traces.append(1)
        return original(self, *args)

    monkeypatch.setattr(Transformer, "forward_cached", counting)
    model = build(cfg)
    first = generate(model, PROMPTS, 3)
    assert len(traces) == 2  # prefill, decode
    generate(model, [[9, 8], [7, 6, 5]], 3, temperature=0.7, top_k=5, seed=1)
    cached_greedy(model, PROMPTS, 3)  # prompts padded to 8, cache of 64 slots: the same shapes
    other = build(cfg, seed=1)
    assert generate(other, PROMPTS, 3) != first  # other weights, other tokens
    assert len(traces) == 2


# ---------------------------------------------------------------------------------------
# scripts/generate.py
# ---------------------------------------------------------------------------------------


def _load_script():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "generate.py")
    spec = importlib.util.spec_from_file_location("generate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_streams_and_reports_errors(monkeypatch, capsys, tmp_path):
    script = _load_script()
    assert script.main([str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err

    model, tok = model_for("mla"), ByteTokenizer()
    fake = types.ModuleType("mlalm.inference")
    fake.load_for_inference = lambda path: (model, model.cfg, tok)
    monkeypatch.setitem(sys.modules, "mlalm.inference", fake)
    prompt = "abc"
    assert script.main([str(tmp_path), "--prompt", prompt, "--max-new-tokens", str(N_NEW)]) == 0
    new = generate(model, [list(tok.encode(prompt))], N_NEW, eos_id=tok.eos_id)[0]
    expected = tok.decode([t for t in new if t != tok.eos_id])
    assert capsys.readouterr().out == prompt + expected + "\n"

    assert script.main([str(tmp_path), "--prompt", "a", "--prompt", "bcd", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- [0] ---\na" in out and "--- [1] ---\nbcd" in out


def test_script_lowers_max_new_tokens_to_the_context(monkeypatch, capsys, tmp_path):
    """max_seq_len 32, prompt "abc" (3 byte tokens): --max-new-tokens 100 becomes 29 with a
    warning; a prompt of 32 tokens leaves no room: exit status 2, nothing on stdout."""
    script = _load_script()
    model, tok = model_for("mla"), ByteTokenizer()
    fake = types.ModuleType("mlalm.inference")
    fake.load_for_inference = lambda path: (model, model.cfg, tok)
    monkeypatch.setitem(sys.modules, "mlalm.inference", fake)
    assert script.main([str(tmp_path), "--prompt", "abc", "--max-new-tokens", "100"]) == 0
    captured = capsys.readouterr()
    assert "warning: --max-new-tokens 100 lowered to 29" in captured.err
    new = generate(model, [list(tok.encode("abc"))], 29, eos_id=tok.eos_id)[0]
    assert captured.out == "abc" + tok.decode([t for t in new if t != tok.eos_id]) + "\n"

    assert script.main([str(tmp_path), "--prompt", "x" * 32, "--max-new-tokens", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "exceeds the model's max_seq_len=32" in captured.err
    with pytest.raises(SystemExit):  # and --help says so
        script.parse_args(["--help"])
    assert "lowered" in capsys.readouterr().out
