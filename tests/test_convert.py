"""MHA/GQA/MQA -> MLA conversion (mlalm.convert, scripts/convert_to_mla.py).

References: the source model itself (exact conversions), a float64 numpy attention written
from the definition of what a conversion keeps (the rope key turned, the rest not), numpy
eigen- and singular value decompositions, and transformers' LlamaForCausalLM."""

import importlib.util
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlalm.config import from_dict
from mlalm.convert import convert_layer, convert_model, input_moments, max_rank, rope_plan
from mlalm.convert.files import write_export
from mlalm.model import Transformer, kv_cache_bytes_per_token_per_layer
from mlalm.model.attention import MLAttention
from mlalm.model.layers import rope_tables
from numerics import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "convert_cli", os.path.join(ROOT, "scripts", "convert_to_mla.py")
)
assert spec is not None and spec.loader is not None
convert_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_cli)

D, N, H, THETA = 48, 4, 16, 5000.0


def _cfg(kind, n_kv_heads=None, **model):
    attention = {"kind": kind, "n_heads": N, "head_dim": H}
    if n_kv_heads:
        attention["n_kv_heads"] = n_kv_heads
    m = dict(
        vocab_size=97, d_model=D, n_layers=2, ffn_dim=80, max_seq_len=64, rope_theta=THETA, init_std=0.15
    )
    return from_dict({"model": {**m, **model}, "attention": attention, "train": {"seq_len": 32}})


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 24)))


def _layer(K, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0, 0.3, (D, N, H)),
        rng.normal(0, 0.3, (D, K, H)),
        rng.normal(0, 0.3, (D, K, H)),
        rng.normal(0, 0.3, (N, H, D)),
    )


def _moment(seed):
    """A random second moment E[h hᵀ] far from the identity."""
    a = np.random.default_rng(seed).normal(size=(D, D)) * np.linspace(0.2, 3.0, D)
    return a @ a.T / D


# ---------------------------------------------------------------------------------------
# The latent-norm switch
# ---------------------------------------------------------------------------------------


def test_latent_without_norm_is_the_linear_map():
    kw = dict(d_model=D, n_heads=N, q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8)
    kw.update(v_head_dim=8, norm_eps=1e-6, std=0.3, out_std=0.3, rngs=nnx.Rngs(0))
    plain = MLAttention(**kw, kv_latent_norm=False)
    assert not hasattr(plain, "kv_norm")  # no parameter the model never uses
    assert hasattr(MLAttention(**kw), "kv_norm")  # DeepSeek's default keeps it
    x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
    cos, sin = rope_tables(jnp.zeros((2, 5), jnp.int32), 8, THETA)  # position 0: no rotation
    c_kv, k_pe = plain.latent(jnp.asarray(x), cos, sin)
    w = np.asarray(plain.wkv_a_DJ[...], np.float64)
    assert_close(c_kv, x.astype(np.float64) @ w[:, :12], rtol=1e-5, what="c_kv")
    assert_close(k_pe, x.astype(np.float64) @ w[:, 12:], rtol=1e-5, what="k_pe")


# ---------------------------------------------------------------------------------------
# MQA -> MLA: exact
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["transmla", "mha2mla"])
def test_mqa_converts_exactly(method, tokens):
    cfg = _cfg("mqa")
    src = Transformer(cfg, rngs=nnx.Rngs(1))
    ref = np.asarray(src(tokens))
    new, new_cfg, report = convert_model(src, cfg, kv_lora_rank=H, rope_dim=H, method=method)
    a = new_cfg.attention
    assert (a.kind, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank) == ("mla", 0, H, H)
    assert a.kv_latent_norm is False and a.v_head_dim == H
    assert_close(new(tokens), ref, rtol=1e-5, what=f"{method} MQA -> MLA logits")
    assert all(l["kv_energy_kept"] == pytest.approx(1, abs=1e-12) for l in report["layers"])
    assert all(l["rope_energy_kept"] == pytest.approx(1, abs=1e-12) for l in report["layers"])
    # the cache: MQA 2·H; MLA R + P, which is 2·H when exact and shrinks with R < H
    assert kv_cache_bytes_per_token_per_layer(cfg, dtype_bytes=1) == 2 * H
    assert kv_cache_bytes_per_token_per_layer(new_cfg, dtype_bytes=1) == H + H
    _, small, _ = convert_model(src, cfg, kv_lora_rank=6, rope_dim=H, method=method)
    assert kv_cache_bytes_per_token_per_layer(small, dtype_bytes=1) == 6 + H


# ---------------------------------------------------------------------------------------
# GQA/MHA -> MLA at full rank: exactly the definition of partial RoPE
# ---------------------------------------------------------------------------------------


def _rope64(x, pos):
    """Half-layout RoPE in float64 on the last axis, positions ``pos`` [T]."""
    P = x.shape[-1]
    ang = pos[:, None] * THETA ** (-np.arange(0, P, 2) / P)[None, :]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : P // 2], x[..., P // 2 :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _reference(x_TD, wq, wk, wv, wo, plan):
    """What the conversion computes by definition: per head the source's score WITHOUT
    rotation, plus RoPE's effect on the rope key alone:

        s = H^-1/2 (q·k_g + RoPE(q_pe)·RoPE(k_pe) - q_pe·k_pe),
        k_pe slot m = Σ_a u_a k_a,  q_pe slot m = Σ_{a of head n's kv head} u_a q_n,f_a
    """
    T, K = x_TD.shape[0], wk.shape[1]
    half, P = H // 2, 2 * len(plan.slots)
    group = np.arange(N) // (N // K)
    q, k, v = (np.einsum("TD,DXH->TXH", x_TD, w) for w in (wq, wk, wv))
    k_pe, q_pe = np.zeros((T, P)), np.zeros((T, N, P))
    for m, (cands, u) in enumerate(plan.slots):
        for slot, off in ((m, 0), (m + P // 2, half)):
            for u_a, (g, f) in zip(u, cands):
                k_pe[:, slot] += u_a * k[:, g, f + off]
                for n in np.flatnonzero(group == g):
                    q_pe[:, n, slot] += u_a * q[:, n, f + off]
    pos = np.arange(T, dtype=np.float64)
    qr, kr = _rope64(q_pe, pos), _rope64(k_pe[:, None], pos)[:, 0]
    s = np.einsum("TNH,SNH->NTS", q, k[:, group]) + np.einsum("TNP,SP->NTS", qr, kr)
    s = (s - np.einsum("TNP,SP->NTS", q_pe, k_pe)) * H**-0.5
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("NTS,SNG->TNG", p, v[:, group])
    return np.einsum("TNG,NGD->TD", o, wo)


def _mla_module(res, rank, dn, P):
    mod = MLAttention(
        d_model=D,
        n_heads=N,
        q_lora_rank=0,
        kv_lora_rank=rank,
        qk_nope_head_dim=dn,
        qk_rope_head_dim=P,
        v_head_dim=H,
        norm_eps=1e-6,
        std=0.02,
        out_std=0.02,
        kv_latent_norm=False,
        rngs=nnx.Rngs(0),
    )
    for name in ("wq_DNH", "wkv_a_DJ", "wkv_b_RNU", "wo_NGD"):
        getattr(mod, name).set_value(jnp.asarray(getattr(res, name), jnp.float32))
    return mod


@pytest.mark.parametrize(
    "K, P, method",
    [
        (2, 16, "transmla"),
        (2, 16, "mha2mla"),
        (4, 8, "transmla"),  # MHA, two frequencies folded per slot
        (4, 8, "mha2mla"),
        (2, 4, "transmla"),
        (1, 8, "transmla"),
        (1, 8, "mha2mla"),
    ],
)
@pytest.mark.parametrize("with_moment", [False, True])
def test_full_rank_is_exactly_partial_rope(K, P, method, with_moment):
    w = _layer(K, seed=K + P)
    moment = _moment(7) if with_moment else None
    plan = rope_plan(w[0], w[1], P, method, moment)
    rank = max_rank(D, K, H, P)
    res = convert_layer(*w, rank=rank, plan=plan, method=method, moment_DD=moment)
    assert res.kv_energy == pytest.approx(1.0, abs=1e-12)
    mod = _mla_module(res, rank, plan.nope_dim, P)
    T = 12
    x = np.random.default_rng(3).normal(size=(T, D))
    cos, sin = rope_tables(jnp.arange(T, dtype=jnp.int32)[None], P, THETA)
    y, _ = mod(jnp.asarray(x[None], jnp.float32), cos, sin)
    ref = _reference(x, *w, plan)
    assert_close(y[0], ref, rtol=2e-5, what=f"K={K} P={P} {method}")
    # and the definition is not the source: the rope key holds only part of the keys
    if K > 1 or P < H:
        assert res.rope_energy < 0.95


@pytest.mark.slow
def test_proportional_kv_heads_convert_exactly(tokens):
    """kv heads whose keys are multiples of one key: RoRoPE's principal direction holds
    them all, so GQA -> MLA at full rank is exact; MHA2MLA's one-head-per-frequency is not."""
    cfg = _cfg("gqa", 2)
    src = Transformer(cfg, rngs=nnx.Rngs(2))
    for block in src.blocks:
        wk = block.attn.wk_DKH[...]
        block.attn.wk_DKH.set_value(wk.at[:, 1].set(-0.7 * wk[:, 0]))
    ref = np.asarray(src(tokens))
    rank = max_rank(D, 2, H, H)
    new, _, report = convert_model(src, cfg, kv_lora_rank=rank, method="transmla")
    assert_close(new(tokens), ref, rtol=1e-5, what="proportional keys, transmla")
    assert all(l["rope_energy_kept"] == pytest.approx(1, abs=1e-9) for l in report["layers"])
    other, _, _ = convert_model(src, cfg, kv_lora_rank=rank, method="mha2mla")
    assert np.abs(np.asarray(other(tokens)) - ref).max() > 1e-2 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------
# Step 1: which directions the rope key keeps
# ---------------------------------------------------------------------------------------


def _gram(a, b, m):
    return a.T @ (b if m is None else m @ b)


@pytest.mark.parametrize("with_moment", [False, True])
def test_transmla_slot_is_the_principal_direction(with_moment):
    K, P = 2, 8
    c = H // P
    wq, wk, wv, wo = _layer(K, seed=11)
    m_ = _moment(5) if with_moment else None
    plan = rope_plan(wq, wk, P, "transmla", m_)
    top = []
    for m, (cands, u) in enumerate(plan.slots):
        assert sorted(cands) == sorted((g, f) for g in range(K) for f in range(m * c, (m + 1) * c))
        re = np.stack([wk[:, g, f] for g, f in cands], 1)
        im = np.stack([wk[:, g, f + H // 2] for g, f in cands], 1)
        vals, vecs = np.linalg.eigh(_gram(re, re, m_) + _gram(im, im, m_))
        assert abs(float(u @ vecs[:, -1])) == pytest.approx(1.0, abs=1e-10)
        top.append(vals[-1])
    res = convert_layer(wq, wk, wv, wo, rank=20, plan=plan, moment_DD=m_)
    total = np.trace(_gram(wk.reshape(D, -1), wk.reshape(D, -1), m_))
    assert res.rope_energy == pytest.approx(sum(top) / total, rel=1e-10)


@pytest.mark.parametrize("with_moment", [False, True])
def test_mha2mla_slot_keeps_the_largest_2norm(with_moment):
    K, P = 2, 8
    c, half = H // P, H // 2
    wq, wk, _, _ = _layer(K, seed=12)
    m_ = _moment(6) if with_moment else None

    def norm(w):  # sqrt(E|h·w|²) over the pair's two features
        return np.sqrt(np.trace(_gram(w, w, m_)))

    wins = np.zeros(K, int)
    plan = rope_plan(wq, wk, P, "mha2mla", m_)
    for m, (cands, u) in enumerate(plan.slots):
        f = m * c
        score = [
            norm(wk[:, g, [f, f + half]])
            * sum(norm(wq[:, n, [f, f + half]]) for n in range(g * 2, g * 2 + 2))
            for g in range(K)
        ]
        g_best = int(np.argmax(score))
        assert cands[int(np.flatnonzero(u)[0])] == (g_best, f) and np.count_nonzero(u) == 1
        wins[g_best] += 1
    # a kv head's features taken whole into the rope key leave a zero residual: dropped
    assert plan.nope_dim == H - 2 * wins.min()


# ---------------------------------------------------------------------------------------
# Step 2: the latent is the truncated SVD
# ---------------------------------------------------------------------------------------


def _joint(res, K):
    """The kv heads' joint map A·B [D, K·U] (each kv head's first query head's columns)."""
    b = np.asarray(res.wkv_b_RNU)[:, :: N // K]
    return res.wkv_a_DJ[:, : b.shape[0]] @ b.reshape(b.shape[0], -1)


@pytest.mark.parametrize("method", ["mha2mla", "transmla"])
def test_truncated_latent_is_the_best_rank_r(method):
    K, P, R = 2, 8, 20
    w = _layer(K, seed=13)
    plan = rope_plan(w[0], w[1], P, method)
    full = _joint(convert_layer(*w, rank=max_rank(D, K, H, P), plan=plan, method=method), K)
    res = convert_layer(*w, rank=R, plan=plan, method=method)
    dn = plan.nope_dim
    keys = np.zeros(K * (dn + H), bool).reshape(K, -1)
    keys[:, :dn] = True
    keys = keys.reshape(-1)
    ratio = 1.0
    if method == "transmla":  # balanced: equal mean energy per key and value feature
        ratio = np.sqrt(np.mean(full[:, keys] ** 2) / np.mean(full[:, ~keys] ** 2))
    scaled = full / np.where(keys, ratio, 1.0)
    U, s, Vt = np.linalg.svd(scaled, full_matrices=False)
    best = (U[:, :R] * s[:R]) @ Vt[:R] * np.where(keys, ratio, 1.0)
    assert_close(_joint(res, K), best, rtol=1e-9, what="rank-R latent")
    assert res.kv_energy == pytest.approx(np.sum(s[:R] ** 2) / np.sum(s**2), rel=1e-10)
    # the singular values split evenly between W_kva and W_kvb: |A_r| = |B_r| = sqrt(σ_r)
    a, b = res.wkv_a_DJ[:, :R], np.asarray(res.wkv_b_RNU)[:, :: N // K].reshape(R, -1)
    b = b / np.where(keys, ratio, 1.0)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(s[:R]), rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(s[:R]), rtol=1e-9)


# ---------------------------------------------------------------------------------------
# Calibration statistics against transformers
# ---------------------------------------------------------------------------------------


def _llama_dir(path, *, n_kv_heads, vocab_size=97, tokenizer=None, seed=1):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=D,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=N,
        num_key_value_heads=n_kv_heads,
        head_dim=H,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(str(path))
    return hf


@pytest.mark.slow
def test_input_moments_match_transformers(tokens, tmp_path):
    import torch

    from mlalm.llama import from_pretrained

    hf = _llama_dir(tmp_path, n_kv_heads=2)
    model, _ = from_pretrained(str(tmp_path))
    ours = input_moments(model, np.asarray(tokens))
    with torch.no_grad():
        hidden = hf(torch.tensor(np.asarray(tokens)), output_hidden_states=True).hidden_states
    for i, layer in enumerate(hf.model.layers):
        x = hidden[i].double().numpy().reshape(-1, D)  # the residual stream entering layer i
        g = layer.input_layernorm.weight.detach().double().numpy()
        h = x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-5) * g
        assert_close(ours[i], h.T @ h / len(h), rtol=1e-5, what=f"layer {i} moment")


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    from mlalm.data.tokenizers import BPETokenizer

    words = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away"]
    rng = np.random.default_rng(0)
    return BPETokenizer.train([" ".join(rng.choice(words, 12)) for _ in range(200)], 300)


@pytest.mark.slow
def test_cli_converts_llama_mqa_exactly(bpe, tmp_path, capsys):
    import torch

    from mlalm.inference import load_for_inference

    src, out = tmp_path / "src", tmp_path / "out"
    hf = _llama_dir(src, n_kv_heads=1, vocab_size=300, tokenizer=bpe)
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and the dog ran far away\n" * 40)
    argv = [
        str(src),
        str(out),
        "--kv-lora-rank",
        str(H),
        "--calibration",
        str(text),
        "--calibration-tokens",
        "256",
    ]
    assert convert_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer 1: kv energy kept 100.00%" in printed and "32 -> 32 elements" in printed
    model, cfg, tokenizer = load_for_inference(str(out))
    assert cfg.attention.kind == "mla" and cfg.attention.kv_latent_norm is False
    assert tokenizer.fingerprint() == bpe.fingerprint()
    toks = np.random.default_rng(1).integers(0, 300, size=(2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    assert_close(model(jnp.asarray(toks)), ref, rtol=1e-5, what="Llama MQA -> MLA export")
    meta = json.load(open(out / "mlalm_params.json"))["conversion"]
    assert meta["method"] == "transmla" and meta["calibration"] == str(text)
    assert meta["kv_cache_elements_per_token_per_layer"] == {"source": 2 * H, "mla": 2 * H}
    assert [l["layer"] for l in meta["layers"]] == [0, 1]


@pytest.mark.slow
def test_cli_converts_an_mlalm_gqa_export(tmp_path, tokens):
    from mlalm.data.tokenizers import get_tokenizer
    from mlalm.inference import load_for_inference

    cfg = _cfg("gqa", 2, vocab_size=257)
    write_export(str(tmp_path / "src"), Transformer(cfg, rngs=nnx.Rngs(4)), cfg, get_tokenizer("byte"),
                 dtype="float32", source="test", meta={})  # fmt: skip
    src_model, _, _ = load_for_inference(str(tmp_path / "src"))
    argv = [str(tmp_path / "src"), str(tmp_path / "out"), "--kv-lora-rank", "20", "--rope-dim", "8"]
    assert convert_cli.main([*argv, "--method", "mha2mla", "--dtype", "bfloat16"]) == 0
    model, new_cfg, _ = load_for_inference(str(tmp_path / "out"))
    a = new_cfg.attention
    assert (a.kind, a.kv_lora_rank, a.qk_rope_head_dim, new_cfg.model.param_dtype) == (
        "mla",
        20,
        8,
        "float32",
    )
    meta = json.load(open(tmp_path / "out" / "mlalm_params.json"))
    assert meta["dtype"] == "bfloat16"
    assert meta["conversion"]["kv_cache_elements_per_token_per_layer"] == {"source": 2 * 2 * H, "mla": 28}
    kept = [l["kv_energy_kept"] for l in meta["conversion"]["layers"]]
    assert all(0.5 < k < 1.0 for k in kept)
    # an approximation of its source: close in distribution, not equal
    p, q = (np.asarray(jnp.exp(m(tokens) - m(tokens).max(-1, keepdims=True))) for m in (model, src_model))
    assert np.all(np.isfinite(p)) and not np.allclose(p, q)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A GQA params export (H = 16, D = 48, 2 kv heads), an MLA one, a DeepSeek-V3 dir."""
    from mlalm.data.tokenizers import get_tokenizer

    d = tmp_path_factory.mktemp("sources")
    cfg = _cfg("gqa", 2, vocab_size=257)
    write_export(str(d / "gqa"), Transformer(cfg, rngs=nnx.Rngs(0)), cfg, get_tokenizer("byte"),
                 dtype="float32", source="test", meta={})  # fmt: skip
    mla = from_dict({"model": {"vocab_size": 257, "d_model": 32, "n_layers": 1}, "train": {"seq_len": 32}})
    write_export(str(d / "mla"), Transformer(mla, rngs=nnx.Rngs(0)), mla, get_tokenizer("byte"),
                 dtype="float32", source="test", meta={})  # fmt: skip
    (d / "ds").mkdir()
    (d / "ds" / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    return d


@pytest.mark.parametrize(
    "source, args, message",
    [
        ("gqa", ["--kv-lora-rank", "49"], "between 1 and 48"),
        ("gqa", ["--kv-lora-rank", "0"], "between 1 and 48"),
        ("gqa", ["--kv-lora-rank", "8", "--rope-dim", "7"], "--rope-dim 7: must be even"),
        ("gqa", ["--kv-lora-rank", "8", "--rope-dim", "32"], "at most the head dim 16"),
        ("gqa", ["--kv-lora-rank", "8", "--rope-dim", "6"], r"valid: \[2, 4, 8, 16\]"),
        ("gqa", ["--kv-lora-rank", "8", "--method", "svd"], "'svd' is not one of"),
        ("gqa", ["--kv-lora-rank", "8", "--dtype", "float16"], "float16"),
        ("mla", ["--kv-lora-rank", "8"], "already MLA"),
        ("ds", ["--kv-lora-rank", "8"], "already MLA"),
        ("missing", ["--kv-lora-rank", "8"], "no such run"),
    ],
)
def test_cli_bad_input_is_one_line(sources, source, args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_cli.main([str(sources / source), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_cli_refuses_a_non_empty_out(sources, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert convert_cli.main([str(sources / "gqa"), str(tmp_path / "out"), "--kv-lora-rank", "8"]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("absorbed", [True, False])
def test_converted_mqa_generates_like_its_source(absorbed):
    """The MLA caches (the latent one with d_n = 0 and the expanded one) give the source's
    greedy continuation."""
    from mlalm.generate import generate

    cfg = _cfg("mqa")
    src = Transformer(cfg, rngs=nnx.Rngs(5))
    new, _, _ = convert_model(src, cfg, kv_lora_rank=H, method="transmla")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    assert generate(new, prompts, 12, absorbed=absorbed) == generate(src, prompts, 12)


@pytest.mark.slow
def test_moe_and_mtp_sources_keep_everything_but_attention(tokens):
    """MoE layers (experts, router, balancing bias) and the MTP modules are copied; the MTP
    blocks' attention is converted like the others (exactly, for MQA)."""
    cfg = from_dict(
        {
            "model": dict(vocab_size=97, d_model=D, n_layers=2, ffn_dim=80, max_seq_len=64, mtp_depth=1),
            "attention": {"kind": "mqa", "n_heads": N, "head_dim": H},
            "moe": dict(
                n_routed_experts=4, top_k=2, expert_ffn_dim=16, first_k_dense_replace=1, dispatch="dropless"
            ),
            "train": {"seq_len": 32},
        }
    )
    src = Transformer(cfg, rngs=nnx.Rngs(6))
    for moe in src.moe_layers():
        moe.bias_E.set_value(jnp.linspace(-0.3, 0.3, moe.n_experts))
    new, new_cfg, report = convert_model(src, cfg, kv_lora_rank=H)
    assert new_cfg.moe == cfg.moe and new_cfg.model == cfg.model
    assert len(report["layers"]) == 3  # two blocks and the MTP block
    for a, b in zip(src.moe_layers(), new.moe_layers()):
        np.testing.assert_array_equal(np.asarray(a.bias_E[...]), np.asarray(b.bias_E[...]))
    h, mtp, _ = src.hidden_mtp(tokens)
    h2, mtp2, _ = new.hidden_mtp(tokens)
    assert_close(h2, h, rtol=1e-5, what="main hidden state")
    assert_close(mtp2[0], mtp[0], rtol=1e-5, what="MTP depth 1 hidden state")
