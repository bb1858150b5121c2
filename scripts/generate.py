#!/usr/bin/env python
"""Generate text from a trained model with the KV cache.

    python scripts/generate.py runs/default --prompt "def main(" --max-new-tokens 200
    python scripts/generate.py runs/default --prompt "import " --prompt "class " \\
        --temperature 0.8 --top-p 0.95

One prompt: its completion is printed as the tokens arrive.  Several: they are decoded
in one batch and each prompt + completion is printed at the end.  MLA models decode
with the latent cache and weight absorption unless --no-absorb is given.  stdout carries
only the text; the timing line (tokens/s, and with --speculative the acceptance rate of
the drafts) goes to stderr.

--speculative (models trained with model.mtp_depth >= 1): self-speculative decoding, the
multi-token prediction modules draft the next tokens and the model verifies them in one
pass; greedy output is identical to plain decoding, sampled output has the same
distribution.  On a model without MTP it is an error (exit status 2).

A prompt and its completion must fit in the model's context (model.max_seq_len
tokens): a --max-new-tokens that does not fit is lowered to what fits, with a warning
on stderr; a prompt that alone fills the context is an error (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mlalm.cli import run_command


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text; repeat for a batch of prompts"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=100,
        help="new tokens per prompt; lowered (with a warning on stderr) to "
        "the model's max_seq_len minus the longest prompt's tokens when "
        "larger; a prompt that alone fills max_seq_len exits with status 2",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--speculative",
        action="store_true",
        help="draft with the model's MTP modules and verify (needs model.mtp_depth >= 1)",
    )
    p.add_argument(
        "--no-absorb",
        action="store_true",
        help="MLA: cache expanded per-head keys/values instead of the latent",
    )
    return p.parse_args(argv)


def fit_max_new_tokens(model, tokenizer, prompts, max_new_tokens: int) -> int:
    """``max_new_tokens``, lowered so that the longest encoded prompt plus the new tokens
    fit in ``model.cfg.model.max_seq_len`` (one-line warning on stderr when lowered).  A
    prompt that alone fills the context raises ConfigError (nothing is printed)."""
    from mlalm.generate import check_length

    limit = model.cfg.model.max_seq_len
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    if longest >= limit:
        check_length(model, longest, max_new_tokens)  # raises: no room for any new token
    if longest + max_new_tokens <= limit:
        return max_new_tokens
    fitted = limit - longest
    print(
        f"warning: --max-new-tokens {max_new_tokens} lowered to {fitted}: the longest prompt "
        f"has {longest} tokens and the model's max_seq_len is {limit}",
        file=sys.stderr,
    )
    return fitted


def run(model, tokenizer, args, out=sys.stdout) -> list[str]:
    """Generate for ``args.prompt`` and print to ``out`` (streaming a single prompt)."""
    from mlalm.errors import ConfigError
    from mlalm.generate import generate_text

    speculative = getattr(args, "speculative", False)
    if speculative and not model.mtp_depth:
        raise ConfigError(
            "--speculative drafts with the model's multi-token prediction modules, and this "
            "model has none (model.mtp_depth=0); train with model.mtp_depth=1 or drop --speculative"
        )
    stats: dict = {}
    kw = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        absorbed=not args.no_absorb,
        speculative=speculative,
        stats=stats,
    )
    max_new_tokens = fit_max_new_tokens(model, tokenizer, args.prompt, args.max_new_tokens)
    single = len(args.prompt) == 1

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    if single:
        stream(args.prompt[0])
    t0 = time.perf_counter()
    texts = generate_text(
        model, tokenizer, args.prompt, max_new_tokens, stream=stream if single else None, **kw
    )
    seconds = time.perf_counter() - t0
    if single:
        out.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
            out.write(f"--- [{i}] ---\n{prompt}{text}\n")
    out.flush()
    line = (
        f"[{len(args.prompt)} prompt(s), up to {max_new_tokens} new tokens each, "
        f"{seconds:.2f} s including compilation, {stats['new_tokens']} tokens, "
        f"{stats['new_tokens'] / max(seconds, 1e-9):.1f} tokens/s"
    )
    if speculative:
        line += (
            f", speculative: {100 * stats['acceptance_rate']:.1f}% of {stats['drafted']} drafts "
            f"accepted, {stats['tokens_per_step']:.2f} tokens per verification"
        )
    print(line + "]", file=sys.stderr)
    return texts


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from mlalm.errors import CheckpointError

        if not os.path.exists(args.path):
            raise CheckpointError(f"{args.path}: no such checkpoint or run directory")
        from mlalm.sampling import check_sampling

        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # fail fast
        from mlalm.inference import load_for_inference

        model, _cfg, tokenizer = load_for_inference(args.path)
        run(model, tokenizer, args)

    return run_command(body, quiet_unraisable=True)


if __name__ == "__main__":
    sys.exit(main())
