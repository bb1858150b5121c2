#!/usr/bin/env python
"""Export a trained model for inference.

    python scripts/export.py RUN_DIR_OR_CHECKPOINT OUT_DIR --format hf [--dtype bfloat16]
    python scripts/export.py RUN_DIR_OR_CHECKPOINT OUT_DIR --format params [--dtype bfloat16]

hf:      config.json + model.safetensors that transformers' DeepseekV3ForCausalLM loads
         (MLA models), plus tokenizer.json / tokenizer_config.json when the run used BPE.
params:  a parameters-only Orbax checkpoint (no optimizer state) in the chosen dtype, with
         the config and tokenizer; eval.py and scripts/generate.py load it.

The input is a run directory (its newest complete checkpoint), a checkpoint step
directory, or a params export.  OUT_DIR must not exist or be empty.
"""

import argparse
import json
import os
import sys

from mlalm.cli import run_command


def export_hf(path: str, out_dir: str, dtype: str | None) -> str:
    from mlalm.errors import ConfigError
    from mlalm.hf import save_pretrained
    from mlalm.inference import load_for_inference

    model, cfg, tokenizer = load_for_inference(path)
    if cfg.attention.kind != "mla":
        raise ConfigError(
            f"--format hf writes DeepSeek-V3 checkpoints, which need attention.kind=mla; "
            f"this model uses {cfg.attention.kind} (use --format params)"
        )
    save_pretrained(model, cfg, out_dir, dtype=dtype, eos_token_id=tokenizer.eos_id)
    if tokenizer.name != "byte":  # tokenizer.json + tokenizer_config.json (its real end-of-text)
        tokenizer.save(out_dir)
        path = os.path.join(out_dir, "tokenizer_config.json")
        with open(path) as f:
            tokenizer_config = json.load(f)
        tokenizer_config["model_max_length"] = cfg.model.max_seq_len
        with open(path, "w") as f:
            json.dump(tokenizer_config, f, indent=2)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="run directory, checkpoint step directory, or params export")
    parser.add_argument("out_dir", help="where to write (must not exist or be empty)")
    parser.add_argument("--format", choices=["hf", "params"], required=True)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="parameter dtype (default: float32 for params, the model's for hf)",
    )
    args = parser.parse_args(argv)

    def body():
        from mlalm.errors import CheckpointError
        from mlalm.inference import export_params

        if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
            raise CheckpointError(f"{args.out_dir} exists and is not empty; choose a new directory")
        if args.format == "hf":
            export_hf(args.source, args.out_dir, args.dtype)
        else:
            export_params(args.source, args.out_dir, dtype=args.dtype or "float32")
        total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out_dir) for f in fs)
        print(f"wrote {args.out_dir} ({args.format}, {total / 1e6:.1f} MB)")

    return run_command(body, quiet_unraisable=True)


if __name__ == "__main__":
    sys.exit(main())
