#!/usr/bin/env python
"""Train a model: python train.py [--config FILE] [section.key=value ...]"""

import argparse
import os
import sys


def main(argv=None) -> int:
    from mlalm.config import describe_keys, load_config
    parser = argparse.ArgumentParser(
        description="Train an MLA/MoE language model. Without --config, configs/default.yaml "
                    "next to this script is used; without data.path, the built-in corpus "
                    "(this Python's standard library sources).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides (section.key=value), with defaults:\n" + describe_keys())
    parser.add_argument("--config", help="YAML config file (names only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    args = parser.parse_args(argv)

    from mlalm.errors import CheckpointError, ConfigError, DataError
    path = args.config
    if path is None:
        default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")
        path = default if os.path.isfile(default) else None
    try:
        cfg = load_config(path, args.overrides)
        from mlalm.trainer import NonFiniteError, train
        name = os.path.splitext(os.path.basename(path))[0] if path else "default"
        train(cfg, default_name=name)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
