#!/usr/bin/env python
"""Export a trained model for inference.

    python scripts/export.py RUN_DIR_OR_CHECKPOINT OUT_DIR --format hf [--dtype bfloat16]
    python scripts/export.py RUN_DIR_OR_CHECKPOINT OUT_DIR --format params [--dtype bfloat16]
    python scripts/export.py RUN_DIR_OR_CHECKPOINT OUT --format gguf [--dtype f32|f16|bf16|q8_0]
    python scripts/export.py RUN_DIR_OR_CHECKPOINT OUT_DIR --format llama [--dtype bfloat16]

hf:      config.json + model.safetensors that transformers' DeepseekV3ForCausalLM loads
         (MLA models), plus tokenizer.json / tokenizer_config.json when the run used BPE.
llama:   config.json + model.safetensors that transformers' LlamaForCausalLM loads (dense
         MHA/GQA/MQA models, e.g. a baseline trained for comparison; mlalm.llama), plus the
         tokenizer files when the run used BPE.
params:  a parameters-only Orbax checkpoint (no optimizer state) in the chosen dtype, with
         the config and tokenizer; eval.py and scripts/generate.py load it.
gguf:    one GGUF file, llama.cpp's deepseek2 architecture with the tokenizer inside (MLA
         models; mlalm.gguf), that llama.cpp and llama-cpp-python load.  OUT is the file
         when it ends in .gguf, else a directory that gets OUT/model.gguf.  Default f32;
         f16, bf16 and q8_0 keep norms, the router and its bias in float32.  Needs the
         gguf package: pip install -e ".[gguf]".

The input is a run directory (its newest complete checkpoint), a checkpoint step
directory, or a params export.  OUT_DIR must not exist or be empty.

hf and gguf exports of an MLA model print one warning line (stderr) per common serving
kernel that does not support its dimensions (mlalm.gguf.engines): FlashMLA and FlashInfer
need kv_lora_rank 512 and qk_rope_head_dim 64, vLLM's MLA backends a sum of 576 or 320,
llama.cpp's CUDA flash attention 576/512.
"""

import argparse
import json
import os
import sys

from mlalm.cli import run_command


def export_hf(path: str, out_dir: str, dtype: str | None, fmt: str = "hf") -> str:
    """--format hf (DeepSeek-V3, MLA models) or llama (Llama, dense MHA/GQA/MQA models)."""
    from mlalm.errors import ConfigError
    from mlalm.inference import load_for_inference

    model, cfg, tokenizer = load_for_inference(path)
    if fmt == "hf":
        from mlalm.hf import save_pretrained

        if cfg.attention.kind != "mla":
            llama_ok = cfg.moe.n_routed_experts == 0
            raise ConfigError(
                f"--format hf writes DeepSeek-V3 checkpoints, which need attention.kind=mla; "
                f"this model uses {cfg.attention.kind} (use --format {'llama' if llama_ok else 'params'})"
            )
    else:
        from mlalm.llama import save_pretrained
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


def export_gguf(path: str, out: str, dtype: str | None) -> str:
    from mlalm.checkpoint import find_checkpoint
    from mlalm.gguf import check_exportable, require_gguf, write_gguf
    from mlalm.inference import checkpoint_config, load_for_inference

    require_gguf()  # before anything is read
    dtype = {"float32": "f32", "bfloat16": "bf16", None: "f32"}.get(dtype, dtype)
    check_exportable(checkpoint_config(find_checkpoint(path)), dtype)  # before the weights are read
    model, cfg, tokenizer = load_for_inference(path)
    if not out.endswith(".gguf"):
        out = os.path.join(out, "model.gguf")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    name = os.path.basename(os.path.normpath(path)) or "mlalm"
    return write_gguf(model, cfg, tokenizer, out, dtype=dtype, name=name)


def warn_serving(path: str, fmt: str) -> None:
    """One stderr line per serving kernel that will not run the exported model's dimensions."""
    from mlalm.checkpoint import find_checkpoint
    from mlalm.gguf import serving_warnings
    from mlalm.inference import checkpoint_config

    for line in serving_warnings(checkpoint_config(find_checkpoint(path)), fmt):
        print(f"warning: {line}", file=sys.stderr)


DTYPES = {
    "params": ("float32", "bfloat16"),
    "hf": ("float32", "bfloat16"),
    "llama": ("float32", "bfloat16"),
    "gguf": ("f32", "f16", "bf16", "q8_0"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="run directory, checkpoint step directory, or params export")
    parser.add_argument("out_dir", help="where to write (must not exist or be empty)")
    parser.add_argument("--format", choices=["hf", "llama", "params", "gguf"], required=True)
    parser.add_argument(
        "--dtype",
        default=None,
        help="params, hf, llama: float32 | bfloat16 (default: float32 for params, the model's "
        "for hf and llama); gguf: f32 | f16 | bf16 | q8_0 (default f32)",
    )
    args = parser.parse_args(argv)

    def body():
        from mlalm.errors import CheckpointError, ConfigError
        from mlalm.inference import export_params

        valid = DTYPES[args.format] + (("float32", "bfloat16") if args.format == "gguf" else ())
        if args.dtype is not None and args.dtype not in valid:
            raise ConfigError(
                f"--dtype {args.dtype}: --format {args.format} takes {' | '.join(DTYPES[args.format])}"
            )
        if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
            what = "file" if os.path.isfile(args.out_dir) else "directory"
            raise CheckpointError(f"{args.out_dir} exists and is not empty; choose a new {what}")
        if args.format in ("hf", "llama"):
            export_hf(args.source, args.out_dir, args.dtype, args.format)
        elif args.format == "gguf":
            export_gguf(args.source, args.out_dir, args.dtype)
        else:
            export_params(args.source, args.out_dir, dtype=args.dtype or "float32")
        if args.format in ("hf", "gguf"):
            warn_serving(args.source, args.format)
        if os.path.isfile(args.out_dir):
            total = os.path.getsize(args.out_dir)
        else:
            total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out_dir) for f in fs)
        print(f"wrote {args.out_dir} ({args.format}, {total / 1e6:.1f} MB)")

    return run_command(body, quiet_unraisable=True)


if __name__ == "__main__":
    sys.exit(main())
