#!/usr/bin/env python
"""Evaluate a checkpoint: python eval.py RUN_DIR_OR_CHECKPOINT [--data PATH] [--split valid|test] [--json]

Reports perplexity, bits per byte and word-level perplexity over the whole split,
the KV-cache footprint (formula and allocated) and cached decode speed.  A run
directory also gets eval_<split>.json and TensorBoard scalars eval/<split>/*.
"""

import argparse
import contextlib
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].split(": ", 1)[0] + ".",
        epilog="Windows: one end-of-text token, then the split; windows of train.seq_len + 1 "
               "tokens every train.seq_len tokens, so every token of the split is predicted "
               "exactly once (context: the tokens before it in its window). Bits per byte: "
               "total NLL / ln 2 / UTF-8 bytes of the scored text. Word perplexity: "
               "exp(total NLL / (whitespace-separated words + lines)), the WikiText convention.")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest checkpoint), a step directory or a params export")
    p.add_argument("--data", help="a text file, JSONL file or directory to evaluate instead of "
                                  "the checkpoint config's split")
    p.add_argument("--split", choices=("valid", "test"), default=None,
                   help="the config's split (default valid); with --data, only the label of the "
                        "results (default 'data')")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (default train.batch_size)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate only the first N batches (0: all)")
    p.add_argument("--decode-batch", type=int, default=8, help="batch of the KV-cache measurement and decode timing")
    p.add_argument("--decode-context", type=int, default=None,
                   help="tokens already cached (default min(1024, model.max_seq_len))")
    p.add_argument("--memory-budget", default="1GiB",
                   help="bytes (e.g. 8GiB, 1.5GB) for the longest context whose KV cache fits, "
                        "at batch 1, cache only (default 1GiB)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-speed measurement")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlalm.errors import CheckpointError, ConfigError, DataError
    try:
        from mlalm.evaluate import parse_bytes
        budget = parse_bytes(args.memory_budget)  # fail fast, before loading anything
        if not os.path.exists(args.path):
            raise CheckpointError(f"{args.path}: no such run directory or checkpoint")
        if args.data is not None and not os.path.exists(args.data):
            raise DataError(f"--data: no such file or directory: {args.data}")
        from mlalm.evaluate import (evaluate_checkpoint, format_table, is_run_dir,
                                    stderr_progress, write_run_outputs)
        log = stderr_progress()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the results
            report = evaluate_checkpoint(
                args.path, data=args.data, split=args.split, batch_size=args.batch_size,
                max_batches=args.max_batches, decode_batch=args.decode_batch,
                decode_context=args.decode_context, memory_budget=budget,
                decode=not args.no_decode, log=log)
            if is_run_dir(args.path):
                written = write_run_outputs(args.path, report)
                log(f"wrote {written} and TensorBoard scalars eval/{report['split']}/* "
                    f"at step {report['step']}")
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        # a failed Orbax restore leaves reader coroutines whose errors Python would print
        # at exit ("Exception ignored in ..."): the line above already says what is wrong
        sys.unraisablehook = lambda unraisable: None
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report) if args.json else format_table(report))
    return 0 if report["kv_cache"]["agrees"] else 1


if __name__ == "__main__":
    sys.exit(main())
