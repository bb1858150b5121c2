"""The command lines' shared error handling, and the ``train`` command.

Every command prints a user error (ConfigError, DataError, CheckpointError) as one line
``error: ...`` on stderr and exits 2; a non-finite training run exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_BUDGET = "1GiB"  # eval.py --memory-budget


def _quiet_background_noise() -> None:
    """Keep a failed checkpoint save to its one error line.  When a write fails (a full
    disk), Orbax logs the error with a traceback and tensorstore's pending callbacks raise
    'Event loop is closed' into the closed loop of the failed save, printed as
    unraisable errors, once per callback (hundreds of lines).  The trainer reports the
    failure itself as a CheckpointError naming the cause."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
    hook = sys.unraisablehook

    def unraisablehook(unraisable):
        if (
            isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
        ):
            return
        hook(unraisable)

    sys.unraisablehook = unraisablehook


def run_command(body, *, quiet_unraisable: bool = False) -> int:
    """Call ``body()`` (returning an exit code, or None for 0) with the shared handling.

    Imports happen inside ``body`` on purpose: a missing dependency is then reported as
    the ImportError it is, with its traceback, not hidden behind another error.
    """
    from mlalm.errors import CheckpointError, ConfigError, DataError

    if quiet_unraisable:
        _quiet_background_noise()
    try:
        rc = body()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        if quiet_unraisable:
            # a failed Orbax read or save leaves coroutines and threads whose errors Python
            # would print at exit ("Exception ignored in ..."): the line above says what failed
            sys.unraisablehook = lambda unraisable: None
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - NonFiniteError only; anything else re-raised
        from mlalm.train.report import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0 if rc is None else rc


def default_config_path() -> str | None:
    """``configs/default.yaml`` of a source checkout (next to train.py), when present."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "configs", "default.yaml")
    return path if os.path.isfile(path) else None


def train_main(argv=None) -> int:
    """``python train.py [--config FILE] [section.key=value ...]``."""
    from mlalm.config import describe_keys

    default = default_config_path()
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an MLA/MoE language model. Without --config, configs/default.yaml "
        "is used (a small MLA + MoE model); a --config file starts from the built-in "
        "defaults listed below (a dense model) unless it names a base file with "
        "'base: default.yaml'. Without data.path: the built-in corpus (this Python's "
        "standard library sources).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides (section.key=value) and their built-in defaults (configs/default.yaml "
        "changes some of them):\n" + describe_keys(),
    )
    parser.add_argument("--config", help="YAML config file (names only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    args = parser.parse_args(argv)

    def body():
        from mlalm.config import given_keys, load_config
        from mlalm.train import train

        path = args.config if args.config is not None else default
        cfg = load_config(path, args.overrides)
        name = os.path.splitext(os.path.basename(path))[0] if path else "default"
        # keys the user set: their own config file and the command line (configs/default.yaml,
        # applied when no --config is given, does not count against train.init_from's model)
        given = given_keys(args.config, args.overrides)
        train(cfg, default_name=name, given=given)

    return run_command(body, quiet_unraisable=True)


def _eval_args(argv=None):
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Evaluate a checkpoint: perplexity, bits per byte, word perplexity, KV cache, "
        "decode speed; for a model with multi-token prediction also each MTP depth's loss and "
        "top-1 agreement with the main model, and self-speculative decoding (tokens/s, "
        "acceptance rate) against plain greedy decoding.",
        epilog="Windows: one end-of-text token, then the split; windows of train.seq_len + 1 "
        "tokens every train.seq_len tokens, so every token of the split is predicted "
        "exactly once (context: the tokens before it in its window). Bits per byte: "
        "total NLL / ln 2 / UTF-8 bytes of the scored text. Word perplexity: "
        "exp(total NLL / (whitespace-separated words + lines)), the WikiText convention.",
    )
    p.add_argument(
        "path",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory (its newest checkpoint), a step directory or a params export",
    )
    p.add_argument(
        "--data",
        help="a text file, JSONL file or directory to evaluate instead of the checkpoint config's split",
    )
    p.add_argument(
        "--split",
        choices=("valid", "test"),
        default=None,
        help="the config's split (default valid); with --data, only the label of the "
        "results (default 'data')",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--batch-size", type=int, default=None, help="windows per batch (default train.batch_size)"
    )
    p.add_argument("--max-batches", type=int, default=0, help="evaluate only the first N batches (0: all)")
    p.add_argument(
        "--decode-batch", type=int, default=8, help="batch of the KV-cache measurement and decode timing"
    )
    p.add_argument(
        "--decode-context",
        type=int,
        default=None,
        help="tokens already cached (default min(1024, model.max_seq_len))",
    )
    p.add_argument(
        "--memory-budget",
        default=DEFAULT_BUDGET,
        help="bytes (e.g. 8GiB, 1.5GB) for the longest context whose KV cache fits, "
        f"at batch 1, cache only (default {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--no-decode",
        action="store_true",
        help="skip the decode-speed (and speculative decoding) measurement",
    )
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=64,
        help="models with MTP: new tokens per prompt of the speculative decoding timing",
    )
    return p.parse_args(argv)


def eval_main(argv=None) -> int:
    """``python eval.py RUN_DIR_OR_CHECKPOINT [--data PATH] [--split valid|test] [--json]``."""
    args = _eval_args(argv)

    def body():
        import contextlib
        import json

        from mlalm.errors import CheckpointError, DataError
        from mlalm.eval_report import (
            format_table,
            is_run_dir,
            parse_bytes,
            stderr_progress,
            write_run_outputs,
        )
        from mlalm.evaluate import evaluate_checkpoint

        budget = parse_bytes(args.memory_budget)  # fail fast, before loading anything
        if not os.path.exists(args.path):
            raise CheckpointError(f"{args.path}: no such run directory or checkpoint")
        if args.data is not None and not os.path.exists(args.data):
            raise DataError(f"--data: no such file or directory: {args.data}")
        log = stderr_progress()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the results
            report = evaluate_checkpoint(
                args.path,
                data=args.data,
                split=args.split,
                batch_size=args.batch_size,
                max_batches=args.max_batches,
                decode_batch=args.decode_batch,
                decode_context=args.decode_context,
                memory_budget=budget,
                decode=not args.no_decode,
                speculative_tokens=args.speculative_tokens,
                log=log,
            )
            if is_run_dir(args.path):
                written = write_run_outputs(args.path, report)
                log(
                    f"wrote {written} and TensorBoard scalars eval/{report['split']}/* "
                    f"at step {report['step']}"
                )
        print(json.dumps(report) if args.json else format_table(report))
        return 0 if report["kv_cache"]["agrees"] else 1

    return run_command(body, quiet_unraisable=True)
