#!/usr/bin/env python
"""Prepare text for training: tokenize it once into a directory of sharded token files.

    python scripts/prepare.py INPUT [INPUT ...] --out DIR [--tokenizer byte|bpe|PATH/tokenizer.json]
    python scripts/prepare.py --verify DIR

INPUT: files, directories (read recursively, sorted, hidden files skipped) or globs of
text files (one file = one document), JSON Lines / JSON (.jsonl, .ndjson, .json: one
record = one document), parquet (one row = one document), text and JSON also as .gz or
.zst.  DIR then holds train-*.bin / val-*.bin token files, tokenizer.json and
manifest.json; train with ``data.path=DIR``.  Rerunning the command starts afresh, or
returns at once when DIR is already complete for the same inputs and settings.
See docs/data.md.
"""

import argparse
import sys

from mlalm.cli import run_command


def parse_args(argv=None):
    from mlalm.data.prepare import DEFAULT_BPE_SAMPLE, DEFAULT_MAX_MEMORY, DEFAULT_SHARD_BYTES

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories or globs")
    p.add_argument("--out", help="the prepared directory to write")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (default), bpe (trained on a sample of the training split), or the "
        "path of a Hugging Face tokenizer.json",
    )
    p.add_argument("--bpe-vocab-size", type=int, default=8192, help="BPE vocabulary (default 8192)")
    p.add_argument(
        "--bpe-sample",
        default=str(DEFAULT_BPE_SAMPLE),
        help=f"text the BPE is trained on, at most (default {DEFAULT_BPE_SAMPLE // 10**6} MB "
        f"of the training split, spread over the input)",
    )
    p.add_argument("--eos-token", help="the tokenizer's end-of-text token (default: found by name)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="documents held out for validation (default 0.1; 0: none; one document: its last bytes)",
    )
    p.add_argument("--text-key", default="text", help="JSON field / parquet column of the text")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="encoding processes (default 0: one per core, as many as --max-memory allows)",
    )
    p.add_argument(
        "--max-memory",
        default=DEFAULT_MAX_MEMORY,
        help=f"peak memory of all processes together (default {DEFAULT_MAX_MEMORY})",
    )
    p.add_argument(
        "--shard-mb",
        type=int,
        default=DEFAULT_SHARD_BYTES // 2**20,
        help=f"size of each token file in MiB (default {DEFAULT_SHARD_BYTES // 2**20})",
    )
    p.add_argument("--force", action="store_true", help="prepare again even when DIR is complete")
    p.add_argument(
        "--verify", metavar="DIR", help="check every token file of DIR against its manifest (CRC-32) and exit"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    args = p.parse_args(argv)
    if args.verify is None and (not args.inputs or not args.out):
        p.error("give INPUT ... --out DIR, or --verify DIR")
    return args


def _summary(manifest: dict, path: str) -> str:
    tok = manifest["tokenizer"]
    lines = [
        f"{path}: {tok['name']} tokenizer ({tok['vocab_size']:,} tokens, end-of-text "
        f"{tok['eos_token']!r} = {tok['eos_id']}), {manifest['dtype']}"
    ]
    for split, s in manifest["splits"].items():
        lines.append(
            f"  {split:<5} {s['documents']:>12,} documents {s['text_bytes']:>16,} bytes "
            f"{s['tokens']:>15,} tokens in {len(s['shards'])} files"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from mlalm.data.prepare import prepare
        from mlalm.data.shards import verify
        from mlalm.utils import parse_size

        if args.verify is not None:
            data = verify(args.verify)
            print(_summary(data.manifest, args.verify))
            print("every token file matches its size and CRC-32 in the manifest")
            return 0
        log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
        manifest = prepare(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            bpe_vocab_size=args.bpe_vocab_size,
            bpe_sample_bytes=parse_size(args.bpe_sample, key="--bpe-sample"),
            eos_token=args.eos_token,
            val_fraction=args.val_fraction,
            text_key=args.text_key,
            workers=args.workers,
            max_memory=args.max_memory,
            shard_bytes=args.shard_mb * 2**20,
            force=args.force,
            progress=not args.quiet,
            key="INPUT",
            log=log,
        )
        print(_summary(manifest, args.out))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
