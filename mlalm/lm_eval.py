"""An lm-evaluation-harness model for any mlalm run, checkpoint or params export.

    python -m mlalm.lm_eval --model_args path=RUN_DIR --tasks hellaswag --batch_size 16

runs lm-eval's own command line (every option of ``lm-eval run``) with this model
registered as ``mlalm``; in Python, ``import mlalm.lm_eval`` registers it, after which
``lm_eval.simple_evaluate(model="mlalm", model_args="path=RUN_DIR", ...)`` works.  A plain
``lm_eval --model mlalm`` does not: lm-eval finds models only in its own registry, filled
by importing the modules that define them, and loads no plugins.

Model arguments: ``path`` (required; anything :func:`mlalm.inference.load_for_inference`
reads), ``max_length`` (context of a scoring window, default the trained
``train.seq_len``, at most ``model.max_seq_len``), ``dtype`` (float32 or bfloat16
parameters), ``max_gen_toks`` (default 256, at most half the model's context).
``--batch_size`` sets the sequences per forward pass ('auto': 16).

What each request computes (float32 logits, dropless MoE routing, so a sequence's
scores never depend on the others in its batch):

* ``loglikelihood(context, continuation)``: Σ log p(continuation tokens | preceding
  tokens) over the last ``max_length`` + 1 tokens of context + continuation (a
  continuation longer than ``max_length`` is a ConfigError), and whether
  every continuation token is the argmax (lm-eval's TemplateLM encodes the pair; an empty
  context is the end-of-text token).
* ``loglikelihood_rolling(text)``: lm-eval's windowing (``get_rolling_token_windows``,
  context 1): the text's tokens after one end-of-text token, in windows of ``max_length``
  predictions; every token is predicted once.  Up to its last window this is exactly
  ``eval.py``'s scheme (windows of T + 1 tokens every T after one end-of-text token); the
  last, partial window differs: lm-eval gives it a full ``max_length`` of context from the
  previous window, ``eval.py`` starts it at its own boundary with less.  For a text of a
  multiple of ``max_length`` tokens the two are equal (``tests/test_lm_eval.py``).  eval.py
  also scores the end-of-text token after each document; lm-eval does not.
* ``generate_until(context, gen_kwargs)``: :func:`mlalm.generate.generate` with the KV
  cache (greedy unless ``do_sample``), batched, up to ``max_gen_toks`` new tokens or the
  end-of-text token; the text is cut at the first ``until`` string.  The context keeps
  its last ``model.max_seq_len - max_gen_toks`` tokens.
"""

from __future__ import annotations

import functools
import json
import sys

try:
    from lm_eval.api.model import TemplateLM  # pyright: ignore[reportMissingImports]
    from lm_eval.api.registry import register_model  # pyright: ignore[reportMissingImports]
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # pyright: ignore[reportMissingImports]
except ImportError as e:  # pragma: no cover - exercised only without the extra
    if __name__ == "__main__":
        print('error: mlalm.lm_eval needs lm-eval: pip install -e ".[lm-eval]"', file=sys.stderr)
        sys.exit(2)
    raise ImportError('mlalm.lm_eval needs lm-eval: pip install -e ".[lm-eval]"') from e

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlalm.errors import ConfigError
from mlalm.utils import round_up

DEFAULT_BATCH = 16


@functools.lru_cache(maxsize=8)
def _scorer(graphdef):
    """jit(state, tokens_BT, targets_BT) -> (log p(target) [B, T] float32, target is argmax [B, T])."""

    @jax.jit
    def score(state, tokens_BT, targets_BT):
        logits_BTV = nnx.merge(graphdef, state)(tokens_BT)
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
        logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT

    return score


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size={value!r}: expected a positive integer or 'auto'") from None
    if n < 1:
        raise ConfigError(f"batch_size={n}: must be >= 1")
    return n


@register_model("mlalm")
class MlalmLM(TemplateLM):
    """lm-eval's ``LM`` over an mlalm model (see the module docstring)."""

    def __init__(
        self,
        path: str | None = None,
        batch_size=None,
        max_length=None,
        dtype: str | None = None,
        max_gen_toks=None,
        max_batch_size=None,
        device=None,
    ):
        super().__init__()
        from mlalm.inference import load_for_inference

        if not path:
            raise ConfigError("model_args: path=RUN_DIR (a run, checkpoint or params export) is required")
        if dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"model_args dtype={dtype!r}: expected float32 or bfloat16")
        self.model, self.cfg, self.tok = load_for_inference(path, dtype=dtype)
        limit = self.cfg.model.max_seq_len
        self._max_length = int(max_length) if max_length is not None else min(self.cfg.train.seq_len, limit)
        if not 1 <= self._max_length <= limit:
            raise ConfigError(
                f"model_args max_length={self._max_length}: must be in [1, {limit}] (model.max_seq_len)"
            )
        self.max_gen_toks = int(max_gen_toks) if max_gen_toks is not None else min(256, limit // 2)
        if not 1 <= self.max_gen_toks < limit:
            raise ConfigError(f"model_args max_gen_toks={self.max_gen_toks}: must be in [1, {limit - 1}]")
        self.batch_size = _batch_size(batch_size)
        self._graphdef, self._state = nnx.split(self.model)

    # -- what TemplateLM needs ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"mlalm-{self.tok.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(t) for t in self.tok.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # -- scoring ----------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(Σ log p, all greedy) of each continuation after its context, in batches of
        similar length (longest first), returned in the order given."""
        L = self._max_length
        rows = []
        for context, continuation in pairs:
            if not continuation or len(continuation) > L:
                raise ConfigError(
                    f"a loglikelihood continuation of {len(continuation)} tokens: it must have 1 to "
                    f"max_length={L} (model_args max_length, at most model.max_seq_len)"
                )
            whole = (list(context) + list(continuation))[-(L + 1) :]
            rows.append((whole, len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        score = _scorer(self._graphdef)
        B = self.batch_size
        for start in range(0, len(order), B):
            idx = order[start : start + B]
            T = min(round_up(len(rows[idx[0]][0]) - 1, 16), L)  # shape buckets: few compilations
            x = np.zeros((B, T), np.int32)
            y = np.zeros((B, T), np.int32)
            for r, i in enumerate(idx):
                whole = rows[i][0]
                x[r, : len(whole) - 1] = whole[:-1]
                y[r, : len(whole) - 1] = whole[1:]
            logp, greedy = (np.asarray(a) for a in score(self._state, jnp.asarray(x), jnp.asarray(y)))
            for r, i in enumerate(idx):
                n, k = len(rows[i][0]) - 1, rows[i][1]  # k continuation targets end at n
                out[i] = (
                    float(logp[r, n - k : n].astype(np.float64).sum()),
                    bool(greedy[r, n - k : n].all()),
                )
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._score(pairs)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mlalm.generate import generate

        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one generate() call per distinct gen_kwargs
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        limit = self.cfg.model.max_seq_len
        for members in groups.values():
            kw = dict(requests[members[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kw.get("max_gen_toks", self.max_gen_toks)), limit - 1)
            temperature, top_k, top_p = 0.0, 0, 1.0
            if kw.get("do_sample"):
                temperature = float(kw.get("temperature", 1.0))
                top_k, top_p = int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0)
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                prompts = []
                for i in idx:
                    ids = self.tok_encode(requests[i].args[0])[-(limit - max_new) :]
                    prompts.append(ids or [self.eot_token_id])
                new = generate(
                    self.model,
                    prompts,
                    max_new,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_id=self.eot_token_id,
                )
                for i, ids in zip(idx, new):
                    text = self.tok_decode([t for t in ids if t != self.eot_token_id])
                    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                    out[i] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main(argv=None) -> int:
    """lm-eval's command line with the ``mlalm`` model registered (``--model mlalm`` is
    added when no ``--model`` is given)."""
    from lm_eval.__main__ import cli_evaluate  # pyright: ignore[reportMissingImports]

    from mlalm.cli import run_command

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("ls", "validate"):
        sys.argv = ["lm-eval", *args]
    else:
        if args and args[0] == "run":
            args = args[1:]
        if not any(a == "--model" or a.startswith("--model=") for a in args):
            args = ["--model", "mlalm", *args]
        sys.argv = ["lm-eval", "run", *args]
    return run_command(cli_evaluate, quiet_unraisable=True)


if __name__ == "__main__":
    sys.exit(main())
