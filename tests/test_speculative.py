"""Self-speculative decoding with the MTP modules (mlalm.generate, speculative=True).

* Greedy: token for token the output of plain greedy decoding (itself tested against full
  recomputation in test_generate.py), for MLA with the latent (absorbed) cache, MLA with
  the expanded cache, GQA and MLA + MoE, in batches whose rows accept different numbers
  of drafts and stop at different places.
* Sampling: the distribution of a 3-token continuation against the exact distribution
  enumerated from the main model's training forward pass (no cache code involved), by
  total variation, with a bound calibrated on numpy multinomial draws from the exact
  distribution; the distribution the drafts alone would give is checked to lie far
  outside that bound, so the test can fail.

Random MTP modules almost never agree with the main model.  ``make_oracle`` turns them
into good drafters of a nearly context-free main model: the main blocks' outputs are
scaled down (next token ~ a function of the current one, with some context), and each
MTP module passes the embedding of its input token straight to the shared head
(h' = enorm(Emb(t)), block outputs 0).  Acceptance is then between 0 and 1.
"""

import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_model
from mlalm.config import from_dict
from mlalm.data.tokenizers import ByteTokenizer
from mlalm.errors import ConfigError
from mlalm.generate import generate

MLA = dict(kind="mla", n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
ATTN = {
    "mla": MLA,
    "gqa": dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=8),
    "mla_moe": dict(MLA, q_lora_rank=12),
}
MOE = dict(
    n_routed_experts=4,
    n_shared_experts=1,
    top_k=2,
    expert_ffn_dim=16,
    first_k_dense_replace=1,
    dispatch="dropless",
)


def make_cfg(name, *, vocab=257, depth=2, max_seq_len=48):
    return from_dict(
        {
            "model": dict(
                vocab_size=vocab,
                d_model=32,
                n_layers=2,
                ffn_dim=48,
                max_seq_len=max_seq_len,
                mtp_depth=depth,
                rope_theta=500.0,
            ),
            "attention": ATTN[name],
            "moe": MOE if name == "mla_moe" else {},
            "train": {"seq_len": 16},
        }
    )


def build(cfg, seed=0):
    """Weights N(0, 0.3), norm scales 1 + N(0, 0.2) (``conftest.random_model``)."""
    return random_model(cfg, seed=seed, scale=0.3, norm_spread=0.2)


def _zero(var):
    var.set_value(jnp.zeros_like(var[...]))


def make_oracle(model, context: float):
    """Main blocks' output projections times ``context``; MTP depth k drafts
    head(final_norm(Emb(t_{p+k}))): eh_proj = [I; 0], enorm scale 1, block outputs 0."""
    for block in model.blocks:
        for var in _outputs(block):
            var.set_value(var[...] * context)
    D = model.cfg.model.d_model
    for m in model.mtp_modules():
        m.eh_proj_2DD.set_value(jnp.stack([jnp.eye(D), jnp.zeros((D, D))]))
        m.enorm.scale.set_value(jnp.ones((D,)))
        for var in _outputs(m.block):
            _zero(var)
    return model


def _outputs(block):
    ffn = block.ffn
    out = [block.attn.wo_NGD]
    if block.is_moe:
        out += [ffn.w_down_EFD] + ([ffn.shared.w_down_FD] if ffn.shared is not None else [])
    else:
        out.append(ffn.w_down_FD)
    return out


PROMPTS = [[5, 17, 200], [1, 2, 3, 250, 4, 99, 7], [9], [40, 41]]


@pytest.mark.parametrize(
    "name, absorbed",
    [
        pytest.param("mla", True, marks=pytest.mark.slow),
        pytest.param("mla", False, marks=pytest.mark.slow),
        pytest.param("gqa", True, marks=pytest.mark.slow),
        pytest.param("mla_moe", True, marks=pytest.mark.slow),
    ],
)
def test_speculative_greedy_equals_plain_greedy(name, absorbed):
    model = make_oracle(build(make_cfg(name)), context=0.03)
    n_new = 20
    ref = generate(model, PROMPTS, n_new, absorbed=absorbed)
    stats = {}
    out = generate(model, PROMPTS, n_new, absorbed=absorbed, speculative=True, stats=stats)
    assert out == ref
    print(f"{name} absorbed={absorbed}: {stats}")
    assert 0.1 < stats["acceptance_rate"] < 0.95, stats  # drafts both kept and rejected
    assert len(set(stats["accepted_by_row"])) > 1, stats  # rows advance differently
    assert stats["steps"] < n_new - 1  # fewer main-model passes than tokens
    # a row stopping at eos mid-round stops there, the others go on
    eos = ref[1][6]
    ref_eos = generate(model, PROMPTS, n_new, absorbed=absorbed, eos_id=eos)
    assert generate(model, PROMPTS, n_new, absorbed=absorbed, eos_id=eos, speculative=True) == ref_eos
    assert len(ref_eos[1]) == ref[1].index(eos) + 1


@pytest.mark.slow
def test_speculative_streams_every_token_once():
    """on_token sees each row's tokens in order, -1 where a row got none at that call."""
    model = make_oracle(build(make_cfg("mla")), context=0.03)
    seen = [[] for _ in PROMPTS]

    def on_token(step, tokens_B):
        for b, t in enumerate(tokens_B):
            if t >= 0:
                seen[b].append(int(t))

    out = generate(model, PROMPTS, 15, speculative=True, on_token=on_token)
    assert seen == out
    assert [len(o) for o in out] == [15] * len(PROMPTS)


def test_speculative_needs_mtp_modules():
    cfg = make_cfg("mla", depth=0)
    with pytest.raises(ConfigError, match=r"model.mtp_depth=0"):
        generate(build(cfg), PROMPTS, 3, speculative=True)


# ---------------------------------------------------------------------------------------
# Sampling: the main model's distribution
# ---------------------------------------------------------------------------------------


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _filtered(logits, temperature, top_k):
    """softmax(logits / T) over the top_k largest logits (float64)."""
    z = np.asarray(logits, np.float64) / temperature
    kth = np.sort(z, axis=-1)[..., -top_k][..., None]
    return _softmax(np.where(z >= kth, z, -np.inf))


def _exact_continuations(model, prompt, n, temperature, top_k):
    """{tuple of n tokens: probability} under the main model, from its training forward
    pass over every continuation (and the distribution the MTP drafts alone would give,
    keeping the first token from the main model as the speculative rounds do)."""
    V = model.cfg.model.vocab_size
    P = len(prompt)
    seqs = np.array([prompt + list(np.unravel_index(i, (V,) * n)) for i in range(V**n)], np.int32)
    h, mtp_h, _ = jax.jit(lambda t: model.hidden_mtp(t))(jnp.asarray(seqs))
    main = np.asarray(model.logits(h))
    p = np.ones(len(seqs))
    q = _filtered(main[:, P - 1], temperature, top_k)[np.arange(len(seqs)), seqs[:, P]]
    for j in range(n):
        pj = _filtered(main[:, P - 1 + j], temperature, top_k)
        p *= pj[np.arange(len(seqs)), seqs[:, P + j]]
    for k in range(1, n):  # the drafts of round 1: depth k at position P - 1
        qk = _filtered(np.asarray(model.logits(mtp_h[k - 1]))[:, P - 1], temperature, top_k)
        q *= qk[np.arange(len(seqs)), seqs[:, P + k]]
    return {tuple(s[P:]): (pi, qi) for s, pi, qi in zip(seqs.tolist(), p, q)}


@pytest.mark.slow
def test_speculative_sampling_has_the_main_models_distribution():
    V, n, temperature, top_k = 6, 3, 0.9, 4
    model = build(make_cfg("mla", vocab=V, depth=2, max_seq_len=32), seed=3)
    prompt = [1, 4, 2, 5]
    exact = _exact_continuations(model, prompt, n, temperature, top_k)
    keys = sorted(exact)
    p = np.array([exact[k][0] for k in keys])
    q = np.array([exact[k][1] for k in keys])
    assert abs(p.sum() - 1) < 1e-9 and abs(q.sum() - 1) < 1e-9

    N = 4000
    stats = {}
    out = generate(
        model, [prompt] * N, n, temperature=temperature, top_k=top_k, seed=7, speculative=True, stats=stats
    )
    index = {k: i for i, k in enumerate(keys)}
    counts = np.bincount([index[tuple(o)] for o in out], minlength=len(keys))
    tv = 0.5 * np.abs(counts / N - p).sum()
    # TV of N exact draws, 500 times: the bound is 1.25 x their largest
    rng = np.random.default_rng(0)
    null = 0.5 * np.abs(rng.multinomial(N, p, size=500) / N - p).sum(axis=1)
    bound = 1.25 * null.max()
    tv_drafts = 0.5 * np.abs(q - p).sum()
    rate = stats["acceptance_rate"]
    print(f"TV {tv:.4f}, bound {bound:.4f}, drafts-only TV {tv_drafts:.4f}, acceptance {rate:.3f}")
    assert 0.05 < rate < 0.95  # both branches of the rule ran
    assert tv_drafts > 3 * bound  # keeping every draft would be detected
    assert tv <= bound


# ---------------------------------------------------------------------------------------
# scripts/generate.py --speculative
# ---------------------------------------------------------------------------------------


def _load_script():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "generate.py")
    spec = importlib.util.spec_from_file_location("generate_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_inference(monkeypatch, model):
    fake = types.ModuleType("mlalm.inference")
    fake.load_for_inference = lambda path: (model, model.cfg, ByteTokenizer())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlalm.inference", fake)


@pytest.mark.slow
def test_script_speculative(monkeypatch, capsys, tmp_path):
    """Same text as plain greedy on stdout; acceptance and tokens/s on stderr; on a model
    without MTP: one error line, exit status 2, nothing on stdout."""
    script = _load_script()
    model = make_oracle(build(make_cfg("mla")), context=0.03)
    _fake_inference(monkeypatch, model)
    args = [str(tmp_path), "--prompt", "abc", "--max-new-tokens", "12"]
    assert script.main(args) == 0
    plain = capsys.readouterr()
    assert script.main(args + ["--speculative"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "tokens/s" in spec.err and "% of" in spec.err and "drafts accepted" in spec.err

    _fake_inference(monkeypatch, build(make_cfg("mla", depth=0)))
    assert script.main(args + ["--speculative"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --speculative") and "mtp_depth=0" in lines[0]
