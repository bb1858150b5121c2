#!/usr/bin/env python
"""Convert an MHA/GQA/MQA model to MLA (TransMLA / MHA2MLA) as a params export.

    python scripts/convert_to_mla.py SRC OUT --kv-lora-rank R [--rope-dim P]
        [--method transmla|mha2mla] [--dtype float32|bfloat16]
        [--calibration TEXT_FILE [--calibration-tokens N]]

SRC: an mlalm run directory, checkpoint step directory or params export, or a transformers
Llama/Mistral directory (config.json, *.safetensors, tokenizer.json).  OUT: a new
directory, a params export that eval.py, scripts/generate.py, scripts/export.py and
train.py's train.init_from=OUT read.

R is the latent width (at most min(d_model, 2·n_kv_heads·head_dim - P)); P the shared
rope key's width (default the head dim; it must divide it).  The KV cache per token per
layer becomes R + P elements (from 2·n_kv_heads·head_dim).  MQA with P = R = head dim is
exact; otherwise the model approximates its source (each layer's kept energy is printed
and stored in OUT/mlalm_params.json) and a short fine-tune recovers most of the loss.

transmla: RoRoPE (each rope slot holds the principal direction of all kv heads' keys at
its frequencies) + balanced joint factorisation; mha2mla: partial RoPE by the 2-norm
criterion + joint SVD.  --calibration: measure each layer's input statistics on a text
file instead of using the weights alone.  See mlalm/convert/mla.py.
"""

import argparse
import sys

from mlalm.cli import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", metavar="SRC", help="run directory, checkpoint, params export or Llama/Mistral dir"
    )
    parser.add_argument("out_dir", metavar="OUT", help="where to write the params export (new or empty)")
    parser.add_argument("--kv-lora-rank", type=int, required=True, help="R, the latent width")
    parser.add_argument(
        "--rope-dim", type=int, default=None, help="P, the shared rope key's width (default head dim)"
    )
    parser.add_argument("--method", default="transmla", help="transmla (default) or mha2mla")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--calibration", default=None, help="a text file for the layers' input statistics")
    parser.add_argument(
        "--calibration-tokens", type=int, default=8192, help="tokens of it to use (default 8192)"
    )
    args = parser.parse_args(argv)

    def body():
        from mlalm.convert import convert
        from mlalm.errors import ConfigError

        if args.calibration_tokens < 1:
            raise ConfigError(f"--calibration-tokens {args.calibration_tokens}: must be positive")
        convert(
            args.source,
            args.out_dir,
            kv_lora_rank=args.kv_lora_rank,
            rope_dim=args.rope_dim,
            method=args.method,
            dtype=args.dtype,
            calibration=args.calibration,
            calibration_tokens=args.calibration_tokens,
        )

    return run_command(body, quiet_unraisable=True)


if __name__ == "__main__":
    sys.exit(main())
