"""GGUF export (mlalm.gguf, scripts/export.py --format gguf) against independent references.

* Metadata and tensor names/shapes, read back with ``gguf.GGUFReader``, against an
  expectation written out here from llama.cpp's deepseek2 loader (src/models/deepseek2.cpp).
* Layout: a float64 numpy forward pass written here from llama.cpp's deepseek2 graph
  (interleaved NORM rope, absorbed MLA with attn_k_b/attn_v_b, build_moe_ffn routing),
  reading only the file's tensors and keys, must give mlalm's logits.
* Vocabulary: GPT-2's byte-level table (the published algorithm, written here) and a
  ranked-merge BPE written here over the file's tokens and merges must give mlalm's ids.
* f16/bf16/q8_0: smaller files that dequantize within each format's rounding bound.
* llama.cpp itself (needs ``llama_cpp``: ``pip install -e ".[gguf]"``; skipped otherwise):
  trained models (byte and BPE tokenizers, sigmoid and softmax routing, with and without
  q LoRA) exported to f32 are tokenized, scored and continued greedily by llama.cpp as
  by mlalm.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf", reason='the gguf package is not installed (pip install -e ".[gguf]")')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mlalm.config import from_dict  # noqa: E402
from mlalm.data.tokenizers import get_tokenizer  # noqa: E402
from mlalm.errors import ConfigError  # noqa: E402
from mlalm.gguf import serving_warnings, write_gguf  # noqa: E402
from mlalm.model import Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("export_cli", os.path.join(ROOT, "scripts", "export.py"))
export_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_cli)

# q LoRA, group-limited sigmoid routing with a bias, one dense layer, scaling 1.5
GROUPED = {
    "model": dict(vocab_size=257, d_model=64, n_layers=3, ffn_dim=96, max_seq_len=64),
    "attention": dict(
        kind="mla",
        n_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),
    "moe": dict(
        n_routed_experts=8,
        n_shared_experts=1,
        top_k=2,
        expert_ffn_dim=32,
        first_k_dense_replace=1,
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        dispatch="dropless",
    ),
    "train": dict(seq_len=32),
}
# no q LoRA, softmax routing with a bias, no dense layer, two shared experts, no
# renormalisation, tied embeddings
SOFTMAX = {
    "model": dict(vocab_size=300, d_model=64, n_layers=2, ffn_dim=96, max_seq_len=64, tie_embeddings=True),
    "attention": dict(
        kind="mla",
        n_heads=2,
        q_lora_rank=0,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=32,
    ),
    "moe": dict(
        n_routed_experts=4,
        n_shared_experts=2,
        top_k=2,
        expert_ffn_dim=32,
        scoring="softmax",
        norm_topk_prob=False,
        dispatch="dropless",
    ),
    "train": dict(seq_len=32),
}


def _random_model(raw, seed=0):
    """A model with random weights, norms and balancing biases (none left at 1 or 0)."""
    cfg = from_dict(raw)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and path and path[-1] in ("scale", "bias_E"):
            base = 1.0 if path[-1] == "scale" else 0.0
            var.set_value(jnp.asarray(base + 0.2 * rng.standard_normal(var[...].shape), jnp.float32))
        elif isinstance(var, nnx.Param):  # larger weights: routing and attention far from uniform
            var.set_value(var[...] * 5.0)
    return model, cfg


def _logits(model, tokens):
    """mlalm's float32 logits [T, V] of one sequence, as float64 (one jitted program)."""
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(np.asarray(tokens)[None]))
    return np.asarray(logits, np.float64)[0]


def _read(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return meta, tensors


def _f64(t):
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64)


# ---------------------------------------------------------------------------------------
# Metadata and tensor shapes
# ---------------------------------------------------------------------------------------


def test_metadata_and_tensor_shapes(tmp_path):
    model, cfg = _random_model(GROUPED)
    path = write_gguf(model, cfg, get_tokenizer("byte"), str(tmp_path / "m.gguf"), name="tiny")
    meta, tensors = _read(path)
    a = "deepseek2."
    expected = {
        "general.architecture": "deepseek2",
        "general.name": "tiny",
        "general.file_type": 0,
        a + "block_count": 3,
        a + "context_length": 64,
        a + "embedding_length": 64,
        a + "feed_forward_length": 96,
        a + "attention.head_count": 4,
        a + "attention.head_count_kv": 1,
        a + "rope.freq_base": 10000.0,
        a + "rope.dimension_count": 8,
        a + "attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        a + "vocab_size": 257,
        a + "attention.q_lora_rank": 32,
        a + "attention.kv_lora_rank": 32,
        a + "attention.key_length": 32 + 8,
        a + "attention.value_length": 32,
        a + "attention.key_length_mla": 16 + 8,
        a + "attention.value_length_mla": 16,
        a + "leading_dense_block_count": 1,
        a + "expert_feed_forward_length": 32,
        a + "expert_shared_count": 1,
        a + "expert_count": 8,
        a + "expert_used_count": 2,
        a + "expert_gating_func": 2,  # sigmoid
        a + "expert_weights_norm": True,
        a + "expert_weights_scale": 1.5,
        a + "expert_group_count": 4,
        a + "expert_group_used_count": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": 256,
        "tokenizer.ggml.bos_token_id": 256,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    tokenizer_arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    assert set(meta) == set(expected) | tokenizer_arrays
    for k, v in expected.items():
        assert meta[k] == v, k
    # ggml dimension order (innermost first), as the deepseek2 loader creates them
    D, V, Q, R, P, N, dn, dv, F, Fe, E = 64, 257, 32, 32, 8, 4, 16, 16, 96, 32, 8
    shapes = {"token_embd.weight": [D, V], "output_norm.weight": [D], "output.weight": [D, V]}
    for i in range(3):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": [D],
            b + "attn_q_a.weight": [D, Q],
            b + "attn_q_a_norm.weight": [Q],
            b + "attn_q_b.weight": [Q, N * (dn + P)],
            b + "attn_kv_a_mqa.weight": [D, R + P],
            b + "attn_kv_a_norm.weight": [R],
            b + "attn_k_b.weight": [dn, R, N],
            b + "attn_v_b.weight": [R, dv, N],
            b + "attn_output.weight": [N * dv, D],
            b + "ffn_norm.weight": [D],
        }
        if i == 0:
            shapes |= {
                b + "ffn_gate.weight": [D, F],
                b + "ffn_up.weight": [D, F],
                b + "ffn_down.weight": [F, D],
            }
        else:
            shapes |= {
                b + "ffn_gate_inp.weight": [D, E],
                b + "exp_probs_b.bias": [E],
                b + "ffn_gate_exps.weight": [D, Fe, E],
                b + "ffn_up_exps.weight": [D, Fe, E],
                b + "ffn_down_exps.weight": [Fe, D, E],
                b + "ffn_gate_shexp.weight": [D, Fe],
                b + "ffn_up_shexp.weight": [D, Fe],
                b + "ffn_down_shexp.weight": [Fe, D],
            }
    assert {n: [int(x) for x in t.shape] for n, t in tensors.items()} == shapes
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())


def test_dense_only_model_declares_every_layer_dense(tmp_path):
    raw = {k: dict(v) for k, v in SOFTMAX.items()}
    raw["moe"] = {}
    model, cfg = _random_model(raw)
    meta, tensors = _read(write_gguf(model, cfg, get_tokenizer("byte"), str(tmp_path / "d.gguf")))
    assert meta["deepseek2.leading_dense_block_count"] == 2
    assert meta["deepseek2.expert_shared_count"] == 0
    assert meta["deepseek2.expert_feed_forward_length"] == 96
    assert "deepseek2.expert_count" not in meta and "deepseek2.expert_gating_func" not in meta
    assert meta["deepseek2.attention.q_lora_rank"] == 0 and "blk.0.attn_q.weight" in tensors
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert not any("exps" in n or "shexp" in n for n in tensors)


# ---------------------------------------------------------------------------------------
# Layout: llama.cpp's deepseek2 graph in numpy, from the file alone
# ---------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_adjacent(x, theta):
    """ggml's NORM rope: rotate pairs (2i, 2i+1) at position t by t·θ^(-2i/d)."""
    T, d = x.shape[0], x.shape[-1]
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, d, 2) / d)  # [T, d/2]
    ang = ang.reshape(T, *([1] * (x.ndim - 2)), d // 2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def _swiglu(x, gate, up, down):
    g, u = x @ gate.T, x @ up.T
    return (g / (1 + np.exp(-g)) * u) @ down.T


def deepseek2_logits(path, tokens):
    """Logits [T, V] in float64 of one sequence, as src/models/deepseek2.cpp computes them."""
    meta, ts = _read(path)
    W = {n: _f64(t) for n, t in ts.items()}
    a = "deepseek2."
    L, N = meta[a + "block_count"], meta[a + "attention.head_count"]
    eps, theta = meta[a + "attention.layer_norm_rms_epsilon"], meta[a + "rope.freq_base"]
    R, P = meta[a + "attention.kv_lora_rank"], meta[a + "rope.dimension_count"]
    dk = meta[a + "attention.key_length_mla"]
    dn = dk - P
    dense = meta[a + "leading_dense_block_count"]
    T = len(tokens)
    h = W["token_embd.weight"][np.asarray(tokens)]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(L):
        b = f"blk.{i}."
        x = _rms(h, W[b + "attn_norm.weight"], eps)
        if meta[a + "attention.q_lora_rank"] > 0:
            q = (
                _rms(x @ W[b + "attn_q_a.weight"].T, W[b + "attn_q_a_norm.weight"], eps)
                @ W[b + "attn_q_b.weight"].T
            )
        else:
            q = x @ W[b + "attn_q.weight"].T
        q = q.reshape(T, N, dk)
        q_nope, q_pe = q[..., :dn], _rope_adjacent(q[..., dn:], theta)
        kv = x @ W[b + "attn_kv_a_mqa.weight"].T
        c = _rms(kv[:, :R], W[b + "attn_kv_a_norm.weight"], eps)
        k_pe = _rope_adjacent(kv[:, R:], theta)
        q_abs = np.einsum("nrj,tnj->tnr", W[b + "attn_k_b.weight"], q_nope)  # absorbed W_UK
        s = (np.einsum("tnr,sr->nts", q_abs, c) + np.einsum("tnp,sp->nts", q_pe, k_pe)) / np.sqrt(dk)
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("ndr,tnr->tnd", W[b + "attn_v_b.weight"], np.einsum("nts,sr->tnr", p, c))
        h = h + o.reshape(T, -1) @ W[b + "attn_output.weight"].T
        x = _rms(h, W[b + "ffn_norm.weight"], eps)
        if i < dense:
            h = h + _swiglu(x, W[b + "ffn_gate.weight"], W[b + "ffn_up.weight"], W[b + "ffn_down.weight"])
            continue
        logits = x @ W[b + "ffn_gate_inp.weight"].T
        if meta[a + "expert_gating_func"] == 2:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        sel = probs + W.get(b + "exp_probs_b.bias", 0.0)
        G = meta.get(a + "expert_group_count", 0)
        E, k = probs.shape[1], meta[a + "expert_used_count"]
        if G > 1:  # keep the group_used groups with the largest sum of their two best
            grouped = sel.reshape(T, G, E // G)
            score = np.sort(grouped, -1)[..., -2:].sum(-1)
            keep = np.argsort(-score, -1)[:, : meta[a + "expert_group_used_count"]]
            mask = np.zeros((T, G), bool)
            np.put_along_axis(mask, keep, True, -1)
            sel = np.where(np.repeat(mask, E // G, 1), sel, -np.inf)
        idx = np.argsort(-sel, -1)[:, :k]
        w = np.take_along_axis(probs, idx, -1)
        if meta.get(a + "expert_weights_norm"):
            w = w / np.maximum(w.sum(-1, keepdims=True), 6.103515625e-5)
        w = w * meta[a + "expert_weights_scale"]
        y = _swiglu(
            x, W[b + "ffn_gate_shexp.weight"], W[b + "ffn_up_shexp.weight"], W[b + "ffn_down_shexp.weight"]
        )
        for t in range(T):
            for j, e in enumerate(idx[t]):
                y[t] += w[t, j] * _swiglu(
                    x[t],
                    W[b + "ffn_gate_exps.weight"][e],
                    W[b + "ffn_up_exps.weight"][e],
                    W[b + "ffn_down_exps.weight"][e],
                )
        h = h + y
    out = W.get("output.weight", W["token_embd.weight"])
    return _rms(h, W["output_norm.weight"], eps) @ out.T


@pytest.mark.parametrize("raw", [GROUPED, SOFTMAX], ids=["qlora_sigmoid_groups", "softmax_tied"])
@pytest.mark.slow
def test_llama_cpp_graph_in_numpy_reproduces_mlalm_logits(raw, tmp_path):
    model, cfg = _random_model(raw, seed=3)
    path = write_gguf(model, cfg, get_tokenizer("byte"), str(tmp_path / "m.gguf"))
    tokens = np.random.default_rng(1).integers(0, 257, size=24)
    ours = _logits(model, tokens)
    ref = deepseek2_logits(path, tokens)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    print(f"max |logit diff| {diff:.2e} (logit scale {scale:.1f})")
    # float32 against float64 through three layers: ~1e-6 relative is measured
    assert diff <= 2e-5 * max(scale, 1.0)


# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------


def gpt2_byte_table() -> list[str]:
    """GPT-2's bytes_to_unicode (openai/gpt-2 encoder.py): printable Latin-1 bytes map to
    themselves, the other 68 to chr(256 + n) in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


TEXTS = [
    "the cat sat on the mat",
    "  leading spaces, trailing  ",
    "line one\nline two\n\n\ttabbed 12345 67",
    "naïve café — 日本語 🦙 emoji",
    "it's <|endoftext|> inside; don't",
]


def _bpe_ids(text, tokens, merges):
    """Ranked-merge BPE over GPT-2's pre-tokenizer pieces, with the file's merges and ids."""
    from tokenizers import pre_tokenizers

    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    index = {t: i for i, t in enumerate(tokens)}
    ids = []
    for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text):
        syms = list(piece)
        while len(syms) > 1:
            r, i = min((ranks.get((x, y), np.inf), i) for i, (x, y) in enumerate(zip(syms, syms[1:])))
            if r == np.inf:
                break
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        ids += [index[s] for s in syms]
    return ids


def test_byte_vocabulary(tmp_path):
    model, cfg = _random_model(GROUPED)
    meta, _ = _read(write_gguf(model, cfg, get_tokenizer("byte"), str(tmp_path / "m.gguf")))
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens == gpt2_byte_table() + ["<|endoftext|>"]
    assert meta["tokenizer.ggml.token_type"] == [1] * 256 + [3]  # NORMAL bytes, CONTROL eos
    assert meta["tokenizer.ggml.merges"] == ["<|endoftext|> <|endoftext|>"]
    tok = get_tokenizer("byte")
    for text in TEXTS:
        assert _bpe_ids(text, tokens, meta["tokenizer.ggml.merges"]) == tok.encode(text).tolist()


def test_bpe_vocabulary_and_padding(tmp_path):
    corpus = [" ".join(TEXTS)] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    tok = get_tokenizer("bpe", train_texts=corpus, vocab_size=300)
    raw = {k: dict(v) for k, v in SOFTMAX.items()}
    raw["model"]["vocab_size"] = tok.vocab_size + 5  # a padded embedding
    model, cfg = _random_model(raw)
    meta, _ = _read(write_gguf(model, cfg, tok, str(tmp_path / "m.gguf")))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    assert len(tokens) == tok.vocab_size + 5
    assert {t: i for i, t in enumerate(tokens[: tok.vocab_size])} == vocab
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 5)]
    assert types[tok.eos_id] == 3 and types[-1] == 5 and types.count(1) == tok.vocab_size - 1
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    for text in TEXTS + corpus[-1:]:
        assert _bpe_ids(text, tokens, meta["tokenizer.ggml.merges"]) == tok.encode(text).tolist()


def test_other_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from mlalm.data.tokenizers import HFTokenizer

    hf = Tokenizer(models.BPE(vocab={"a": 0, "</s>": 1}, merges=[]))
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = HFTokenizer(hf, eos_token="</s>", where="tok.json")
    model, cfg = _random_model(GROUPED)
    with pytest.raises(ConfigError, match=r"^tok.json: GGUF export supports byte-level BPE .*Metaspace") as e:
        write_gguf(model, cfg, tok, str(tmp_path / "m.gguf"))
    assert "\n" not in str(e.value) and not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------
# Quantised exports
# ---------------------------------------------------------------------------------------


def test_f16_bf16_q8_0_are_smaller_and_dequantize_close(tmp_path):
    model, cfg = _random_model(GROUPED)
    tok = get_tokenizer("byte")
    paths = {d: write_gguf(model, cfg, tok, str(tmp_path / f"{d}.gguf"), dtype=d) for d in gguf_dtypes()}
    size = {d: os.path.getsize(p) for d, p in paths.items()}
    assert (
        size["f16"] < 0.6 * size["f32"] and size["bf16"] == size["f16"] and size["q8_0"] < 0.8 * size["f16"]
    )
    _, ref = _read(paths["f32"])
    Q = gguf.GGMLQuantizationType
    for d in ("f16", "bf16", "q8_0"):
        _, got = _read(paths[d])
        kinds = set()
        for name, t in got.items():
            x, y = _f64(ref[name]), _f64(t)
            assert x.shape == y.shape, name
            if name.endswith(("norm.weight", ".bias", "ffn_gate_inp.weight")):
                assert t.tensor_type == Q.F32 and np.array_equal(x, y), name  # kept exact
                continue
            kinds.add(t.tensor_type)
            amax = np.abs(x).max()
            # rounding bounds: f16 11-bit and bf16 8-bit significands (relative, plus the
            # f16 subnormal step); q8_0 rounds x/d to an integer q, |q| <= 127, with
            # d = max|block|/127 <= amax/127 stored in f16: |x - q·d16| <= d/2 + 127·d·2^-11
            bound = {
                Q.F16: np.abs(x) * 2.0**-11 + 2.0**-25,
                Q.BF16: np.abs(x) * 2.0**-8,
                Q.Q8_0: amax / 127 * (0.5 + 127 * 2.0**-11) + 1e-12,
            }[t.tensor_type]
            assert np.all(np.abs(x - y) <= bound), (d, name)
        want = {"f16": {Q.F16}, "bf16": {Q.BF16}, "q8_0": {Q.Q8_0, Q.F16}}[d]  # q8_0: f16 for rows % 32
        assert kinds == want, (d, kinds)


def gguf_dtypes():
    from mlalm.gguf import GGUF_DTYPES

    return GGUF_DTYPES


# ---------------------------------------------------------------------------------------
# Bad inputs and engine warnings
# ---------------------------------------------------------------------------------------


def test_non_mla_and_missing_shared_expert_are_one_line_errors(tmp_path):
    mha = from_dict({"model": dict(vocab_size=257, d_model=32, n_layers=1), "attention": dict(kind="mha")})
    with pytest.raises(ConfigError, match=r"needs attention.kind=mla; this model uses attention.kind=mha"):
        write_gguf(Transformer(mha, rngs=nnx.Rngs(0)), mha, get_tokenizer("byte"), str(tmp_path / "m.gguf"))
    raw = {k: dict(v) for k, v in SOFTMAX.items()}
    raw["moe"]["n_shared_experts"] = 0
    model, cfg = _random_model(raw)
    with pytest.raises(ConfigError, match=r"^moe.n_shared_experts=0: llama.cpp's deepseek2"):
        write_gguf(model, cfg, get_tokenizer("byte"), str(tmp_path / "m.gguf"))
    with pytest.raises(
        ConfigError, match=r"GGUF dtype 'q4_0' is not supported \(valid: f32, f16, bf16, q8_0\)"
    ):
        write_gguf(model, cfg, get_tokenizer("byte"), str(tmp_path / "m.gguf"), dtype="q4_0")
    assert not os.listdir(tmp_path)


def test_cli_without_gguf_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    assert export_cli.main([str(tmp_path / "run"), str(tmp_path / "out"), "--format", "gguf"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == 'error: GGUF export needs the gguf package: pip install -e ".[gguf]"\n'


def test_cli_dtype_must_fit_the_format(tmp_path, capsys):
    assert (
        export_cli.main([str(tmp_path / "run"), str(tmp_path / "o"), "--format", "gguf", "--dtype", "q4"])
        == 2
    )
    assert capsys.readouterr().err == "error: --dtype q4: --format gguf takes f32 | f16 | bf16 | q8_0\n"
    assert (
        export_cli.main([str(tmp_path / "run"), str(tmp_path / "o"), "--format", "hf", "--dtype", "q8_0"])
        == 2
    )
    assert capsys.readouterr().err == "error: --dtype q8_0: --format hf takes float32 | bfloat16\n"


def test_serving_warnings():
    def cfg(**att):
        return from_dict({"model": dict(vocab_size=10, n_layers=4), "attention": dict(kind="mla", **att)})

    deepseek = cfg(kv_lora_rank=512, qk_rope_head_dim=64, n_heads=16, q_lora_rank=64)
    assert serving_warnings(deepseek) == [] and serving_warnings(deepseek, "hf") == []
    small = serving_warnings(cfg(kv_lora_rank=128, qk_rope_head_dim=16))
    assert len(small) == 3 and all("\n" not in w for w in small)
    assert "FlashMLA" in small[0] and "vLLM" in small[1] and "144" in small[1] and "llama.cpp" in small[2]
    # 256 + 64 = 320: vLLM's second size; llama.cpp's 320/256 kernel wants heads % 32 == 0
    mid = serving_warnings(cfg(kv_lora_rank=256, qk_rope_head_dim=64, n_heads=32))
    assert len(mid) == 1 and "FlashMLA" in mid[0]
    assert len(serving_warnings(cfg(kv_lora_rank=256, qk_rope_head_dim=64, n_heads=16))) == 2
    hf = serving_warnings(cfg(kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=0), "hf")
    assert len(hf) == 1 and "q_lora_rank=0" in hf[0] and "--format gguf" in hf[0]
    assert (
        serving_warnings(
            from_dict({"model": dict(vocab_size=10), "attention": dict(kind="gqa", n_kv_heads=2)})
        )
        == []
    )


# ---------------------------------------------------------------------------------------
# A trained model through the command line, and llama.cpp itself
# ---------------------------------------------------------------------------------------

WORDS = "the of and to in a is that for it as was with be by on not café naïve 日本 🦙 1984".split()


def _corpus(n_lines, seed):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))) for _ in range(n_lines))


def _train(d, raw, tokenizer):
    from mlalm.train import train

    (d / "train.txt").write_text(_corpus(400, 0), encoding="utf-8")
    raw = {k: dict(v) for k, v in raw.items()}
    raw["model"].pop("vocab_size")
    raw["moe"] = {**raw["moe"], "bias_update_rate": 0.01, "dispatch": "dropless"}
    raw.pop("train")
    raw |= {
        "data": dict(
            path=str(d / "train.txt"), cache_dir=str(d / "cache"), tokenizer=tokenizer, bpe_vocab_size=320
        ),
        "train": dict(
            steps=40,
            batch_size=8,
            seq_len=32,
            eval_every=1000,
            run_dir=str(d / "runs"),
            name="r",
            progress=False,
        ),
        "optim": dict(warmup_steps=4, lr=1e-2),
        "checkpoint": dict(async_save=False),
    }
    train(from_dict(raw), log=lambda *a: None)
    return str(d / "runs" / "r")


@pytest.fixture(scope="module", params=["byte", "bpe"])
def trained(request, tmp_path_factory):
    """A trained run (byte: GROUPED, q LoRA + grouped sigmoid; bpe: SOFTMAX, no q LoRA)
    exported with scripts/export.py to f32 and q8_0."""
    d = tmp_path_factory.mktemp(f"gguf_{request.param}")
    run = _train(d, GROUPED if request.param == "byte" else SOFTMAX, request.param)
    out = {}
    for dtype in ("f32", "q8_0"):
        path = str(d / f"{dtype}.gguf")
        assert export_cli.main([run, path, "--format", "gguf", "--dtype", dtype]) == 0
        out[dtype] = path
    return request.param, run, out


@pytest.mark.slow
def test_cli_export_of_a_trained_run(trained, tmp_path):
    from mlalm.inference import load_for_inference

    name, run, paths = trained
    model, cfg, tok = load_for_inference(run)
    meta, tensors = _read(paths["f32"])
    assert meta["general.name"] == "r" and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert any(np.abs(_f64(t)).max() > 0 for n, t in tensors.items() if n.endswith("exp_probs_b.bias"))
    tokens = np.asarray(tok.encode(TEXTS[3])[:40])
    ours = _logits(model, tokens)
    assert np.abs(ours - deepseek2_logits(paths["f32"], tokens)).max() <= 2e-5 * max(np.abs(ours).max(), 1)
    # a directory OUT gets OUT/model.gguf; warnings go to stderr, one line each
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "export.py"),
            run,
            str(tmp_path / "o"),
            "--format",
            "gguf",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.returncode == 0, p.stderr
    assert os.path.isfile(tmp_path / "o" / "model.gguf") and p.stdout.startswith(
        f"wrote {tmp_path / 'o'} (gguf"
    )
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {w}" for w in serving_warnings(cfg)] and len(warnings) == 3


needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason='llama-cpp-python is not installed (pip install -e ".[gguf]" builds it)',
)


def _llama(path, n_ctx):
    import llama_cpp

    return llama_cpp, llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,  # float32 latent cache: compare float32 with float32
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_tokenizes_scores_and_generates_like_mlalm(trained):
    """llama.cpp's own tokenizer, forward pass and greedy decoding against mlalm's.

    Tolerance: both run float32 with a float32 cache; what remains is summation order
    (ggml's blocked dot products and exp vs XLA's), ~1e-6 relative per op through a
    few layers: max |logit diff| <= 1e-3 · max(1, logit scale), top-1 equal everywhere.
    """
    from mlalm.generate import generate
    from mlalm.inference import load_for_inference

    name, run, paths = trained
    model, cfg, tok = load_for_inference(run)
    _, llm = _llama(paths["f32"], cfg.model.max_seq_len)
    for text in TEXTS:  # llama.cpp's tokenizer from the file's vocabulary
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).tolist(), text
    prompts = [tok.encode(t)[:48].tolist() for t in TEXTS + [_corpus(3, 7)]]
    worst, agree, total, scale = 0.0, 0, 0, 0.0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], np.float64)
        ours = _logits(model, ids)
        worst = max(worst, float(np.abs(theirs - ours).max()))
        scale = max(scale, float(np.abs(ours).max()))
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        total += len(ids)
    print(f"{name}: max |logit diff| {worst:.2e} (logit scale {scale:.1f}), top-1 {agree}/{total}")
    assert worst <= 1e-3 * max(scale, 1.0) and agree == total
    # greedy continuations: llama.cpp's sampler at temperature 0 against mlalm.generate
    for ids in prompts[:3]:
        ours_new = generate(model, [ids[:16]], 24, eos_id=tok.eos_id)[0]
        llm.reset()
        theirs_new = []
        for t in llm.generate(ids[:16], temp=0.0, top_k=1, reset=True):
            theirs_new.append(int(t))
            if t == tok.eos_id or len(theirs_new) == 24:
                break
        assert theirs_new == ours_new
        assert tok.decode([t for t in theirs_new if t != tok.eos_id]) == tok.decode(
            [t for t in ours_new if t != tok.eos_id]
        )


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_runs_the_q8_0_export(trained):
    """q8_0 weights: llama.cpp loads them and stays close (8-bit rounding of every matrix)."""
    from mlalm.inference import load_for_inference

    name, run, paths = trained
    model, cfg, tok = load_for_inference(run)
    _, llm = _llama(paths["q8_0"], cfg.model.max_seq_len)
    ids = tok.encode(_corpus(3, 7))[:48].tolist()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], np.float64)
    ours = _logits(model, ids)
    p = np.exp(ours - ours.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(theirs - theirs.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    tv = 0.5 * np.abs(p - q).sum(-1).max()  # total variation between next-token distributions
    print(f"{name} q8_0: max |logit diff| {np.abs(theirs - ours).max():.3f}, max TV distance {tv:.4f}")
    assert tv < 0.05


@pytest.mark.slow
def test_cli_refuses_a_non_mla_run_before_reading_its_weights(tmp_path, capsys):
    from mlalm.train import train

    (tmp_path / "t.txt").write_text(_corpus(100, 0), encoding="utf-8")
    cfg = from_dict(
        {
            "model": dict(d_model=32, n_layers=1, ffn_dim=64, max_seq_len=32),
            "attention": dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=8),
            "data": dict(path=str(tmp_path / "t.txt"), cache_dir=str(tmp_path / "cache")),
            "train": dict(
                steps=2, batch_size=2, seq_len=16, run_dir=str(tmp_path / "runs"), name="g", progress=False
            ),
            "checkpoint": dict(async_save=False),
        }
    )
    train(cfg, log=lambda *a: None)
    capsys.readouterr()
    argv = [str(tmp_path / "runs" / "g"), str(tmp_path / "g.gguf"), "--format", "gguf"]
    assert export_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(
        "error: GGUF export writes llama.cpp's deepseek2 architecture, which needs attention.kind=mla"
    )
    assert not os.path.exists(tmp_path / "g.gguf")
