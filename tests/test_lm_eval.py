"""The lm-evaluation-harness adapter (mlalm.lm_eval) against independent computations.

A tiny model is trained for 10 steps (byte tokenizer, train.seq_len T = 16).  References:

* loglikelihood and multiple choice: a float64 log-softmax over ``model(tokens)``'s logits
  of the whole context + continuation, summed over the continuation.
* loglikelihood_rolling: lm-eval's documented windowing written out here (first window:
  end-of-text + the first T - 1 tokens predicting T; each later window predicts the next
  up to T tokens from the T tokens before each), and, for a text of a multiple of T
  tokens, ``mlalm.evaluate.score`` (eval.py's scoring path), which must agree exactly.
* generate_until: greedy decoding by full forward passes (no KV cache), cut at ``until``.
* Tasks: YAML files over local JSON Lines written by the test, run by lm_eval itself
  (``simple_evaluate`` with the registered name ``mlalm``, and ``python -m mlalm.lm_eval``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files only, no hub look-ups
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[lm-eval]")')

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from mlalm.config import from_dict  # noqa: E402
from mlalm.errors import ConfigError  # noqa: E402
from mlalm.lm_eval import MlalmLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 16
WORDS = "the cat sat on a mat and dog ran far away".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mlalm.train import train

    d = tmp_path_factory.mktemp("lm_eval")
    rng = np.random.default_rng(0)
    (d / "train.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(300)))
    cfg = from_dict(
        {
            "model": dict(d_model=32, n_layers=2, ffn_dim=64, max_seq_len=64),
            "attention": dict(
                kind="mla", n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
            ),
            "moe": dict(n_routed_experts=4, expert_ffn_dim=16, first_k_dense_replace=1),
            "data": dict(path=str(d / "train.txt"), cache_dir=str(d / "cache")),
            "train": dict(
                steps=10,
                batch_size=4,
                seq_len=T,
                eval_every=100,
                run_dir=str(d / "runs"),
                name="r",
                progress=False,
            ),
            "optim": dict(warmup_steps=2, lr=1e-2),
            "checkpoint": dict(async_save=False),
        }
    )
    train(cfg, log=lambda *a: None)
    return str(d / "runs" / "r")


@pytest.fixture(scope="module")
def lm(run):
    return MlalmLM(path=run, batch_size=3)


_FORWARD = {}


def _log_softmax(lm, tokens):
    """float64 log-softmax [len, V] of ``model(tokens)``'s logits: one forward pass,
    padded at the end to the model's context (causal: the padding changes nothing before
    it), so every call runs the same compiled program."""
    if id(lm) not in _FORWARD:
        graphdef, state = nnx.split(lm.model)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        _FORWARD[id(lm)] = lambda x: fn(state, x)
    n, S = len(tokens), lm.cfg.model.max_seq_len
    x = np.zeros((1, S), np.int32)
    x[0, :n] = tokens
    l = np.asarray(_FORWARD[id(lm)](x), np.float64)[0, :n]
    m = l.max(-1, keepdims=True)
    return l - (m + np.log(np.exp(l - m).sum(-1, keepdims=True)))


def _score_window(lm, inputs, targets):
    """(Σ log p(targets), all argmax) with targets predicted at the last len(targets) inputs."""
    lp = _log_softmax(lm, inputs)[len(inputs) - len(targets) :]
    picked = lp[np.arange(len(targets)), targets]
    return float(picked.sum()), bool((lp.argmax(-1) == np.asarray(targets)).all())


def _direct_loglikelihood(lm, context, continuation):
    """Scored over the last T + 1 tokens of context + continuation (the context is cut on
    the left to fit the window, as lm-eval's models do)."""
    ctx = lm.tok.encode(context).tolist()
    whole = lm.tok.encode(context + continuation).tolist()
    k = len(whole) - len(ctx)
    whole = whole[-(T + 1) :]
    return _score_window(lm, whole[:-1], whole[-k:])


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_matches_a_direct_computation(lm):
    pairs = [
        ("the cat", " sat on"),
        ("a", " mat and dog ran"),  # T tokens: the whole window
        ("the dog ran far away and the cat sat on a mat", " and"),  # context cut on the left
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = _direct_loglikelihood(lm, c, x)
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-5) and greedy == ref_greedy


def _lm_eval_windows(tokens, eos, L):
    """lm-eval's rolling windows (context 1), as LM.loglikelihood_rolling documents them:
    (inputs, targets predicted at the last len(targets) inputs)."""
    first = min(L, len(tokens))
    out = [([eos] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(L, len(tokens) - done)
        end = done + n
        out.append((tokens[end - L - 1 : end - 1], tokens[end - n : end]))  # L tokens of context
        done = end
    return out


def _rolling_reference(lm, tokens):
    return sum(_score_window(lm, x, y)[0] for x, y in _lm_eval_windows(tokens, lm.eot_token_id, T))


def test_rolling_loglikelihood_equals_eval_py_on_whole_windows(lm, run):
    from mlalm.evaluate import score
    from mlalm.train.state import split_model
    from mlalm.train.step import make_eval_step

    text = "the cat sat on a mat and the dog ran far away now"[:48]  # 3·T bytes
    tokens = lm.tok.encode(text)
    assert len(tokens) == 3 * T
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    _, params, rest = split_model(lm.model)
    nll, n = score(
        make_eval_step(lm.cfg), params, rest, tokens, eos_id=lm.eot_token_id, seq_len=T, batch_size=2
    )
    assert n == 3 * T
    assert got == pytest.approx(-nll, rel=1e-5)


def test_rolling_loglikelihood_uses_lm_eval_windows(lm):
    """A text of 2·T + 5 tokens: the last window gets T tokens of context (eval.py's gets 5)."""
    from mlalm.evaluate import score
    from mlalm.train.state import split_model
    from mlalm.train.step import make_eval_step

    text = "the cat sat on a mat and the dog ran far away."[: 2 * T + 5]
    tokens = lm.tok.encode(text).tolist()
    assert len(tokens) == 2 * T + 5
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    ref = _rolling_reference(lm, tokens)
    assert got == pytest.approx(ref, rel=1e-5)
    _, params, rest = split_model(lm.model)
    nll, _ = score(
        make_eval_step(lm.cfg),
        params,
        rest,
        np.asarray(tokens),
        eos_id=lm.eot_token_id,
        seq_len=T,
        batch_size=2,
    )
    assert abs(got + nll) > 1e-3  # the documented difference: the last window's context


@pytest.mark.slow
def test_generate_until_matches_greedy_full_forward_decoding(lm):
    contexts = ["the cat sat", "a dog ran far away and the"]
    kw = {"until": ["\n", "."], "max_gen_toks": 10}
    got = lm.generate_until([_req("generate_until", c, kw) for c in contexts])
    for c, text in zip(contexts, got):
        ids = lm.tok.encode(c).tolist()
        new = []
        for _ in range(10):  # greedy, a full forward pass per token: no KV cache involved
            t = int(_log_softmax(lm, ids + new)[-1].argmax())
            if t == lm.eot_token_id:
                break
            new.append(t)
        ref = lm.tok.decode(new)
        for stop in kw["until"]:
            ref = ref.split(stop)[0]
        assert text == ref


def _write_tasks(d):
    rng = np.random.default_rng(1)
    docs = []
    for i in range(6):
        q = " ".join(rng.choice(WORDS, 4))
        choices = [" ".join(rng.choice(WORDS, int(k))) for k in rng.integers(1, 4, size=3)]
        docs.append({"question": q, "choices": choices, "answer": int(i % 3)})
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    texts = ["the cat sat on a mat and the dog ran far away " * 3, "a mat and a dog"]
    (d / "ppl.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "toy_mc.yaml").write_text(
        "task: mlalm_toy_mc\n"
        + head.format(d / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (d / "toy_ppl.yaml").write_text(
        "task: mlalm_toy_ppl\n"
        + head.format(d / "ppl.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return docs, texts


@pytest.mark.slow
def test_local_tasks_through_lm_eval_match_direct_scores(lm, run, tmp_path):
    from lm_eval.tasks import TaskManager

    docs, texts = _write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="mlalm",  # the registered name: lm-eval builds the model from model_args
        model_args=f"path={run}",
        batch_size=4,
        tasks=["mlalm_toy_mc", "mlalm_toy_ppl"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert out is not None
    correct = correct_norm = 0
    for s in sorted(out["samples"]["mlalm_toy_mc"], key=lambda s: s["doc_id"]):
        doc = docs[s["doc_id"]]
        ref = [_direct_loglikelihood(lm, doc["question"], " " + c) for c in doc["choices"]]
        got = [tuple(r) for r in s["filtered_resps"]]
        for (ll, greedy), (rll, rgreedy) in zip(got, ref):
            assert ll == pytest.approx(rll, rel=1e-5, abs=1e-5) and greedy == rgreedy
        lls = np.array([r[0] for r in ref])
        correct += int(lls.argmax() == doc["answer"])
        correct_norm += int((lls / np.array([len(c) for c in doc["choices"]])).argmax() == doc["answer"])
    res = out["results"]["mlalm_toy_mc"]
    assert res["acc,none"] == pytest.approx(correct / len(docs))
    assert res["acc_norm,none"] == pytest.approx(correct_norm / len(docs))
    ppl = sorted(out["samples"]["mlalm_toy_ppl"], key=lambda s: s["doc_id"])
    lls = [float(np.ravel(s["filtered_resps"])[0]) for s in ppl]
    for text, ll in zip(texts, lls):
        assert ll == pytest.approx(_rolling_reference(lm, lm.tok.encode(text).tolist()), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert out["results"]["mlalm_toy_ppl"]["bits_per_byte,none"] == pytest.approx(
        -sum(lls) / n_bytes / np.log(2), rel=1e-6
    )


@pytest.mark.slow
def test_command_line(run, tmp_path):
    _write_tasks(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [
        sys.executable,
        "-m",
        "mlalm.lm_eval",
        "--model_args",
        f"path={run}",
        "--include_path",
        str(tmp_path),
    ]
    p = subprocess.run(
        args + ["--tasks", "mlalm_toy_mc", "--batch_size", "4"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "mlalm_toy_mc" in p.stdout and "acc" in p.stdout
    bad = args[:4] + [f"path={tmp_path / 'none'}", "--include_path", str(tmp_path), "--tasks", "mlalm_toy_mc"]
    p = subprocess.run(bad, capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]  # mlalm's one-line error, after lm-eval's log lines
    assert last.startswith(f"error: {tmp_path / 'none'}") and "Traceback" not in p.stderr


def test_bad_model_args_are_one_line_errors(run, lm):
    with pytest.raises(
        ConfigError, match=r"^a loglikelihood continuation of 17 tokens: it must have 1 to max_length=16"
    ):
        lm.loglikelihood([_req("loglikelihood", "a", " mat and dog ran ")])
    with pytest.raises(ConfigError, match=r"^model_args: path=RUN_DIR"):
        MlalmLM()
    with pytest.raises(ConfigError, match=r"^model_args max_length=65: must be in \[1, 64\]"):
        MlalmLM(path=run, max_length=65)
    with pytest.raises(ConfigError, match=r"^batch_size='many'"):
        MlalmLM(path=run, batch_size="many")
