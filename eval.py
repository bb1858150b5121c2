#!/usr/bin/env python
"""Evaluate a checkpoint: python eval.py RUN_DIR_OR_CHECKPOINT [--data PATH] [--split valid|test] [--json]

Reports perplexity, bits per byte and word-level perplexity over the whole split,
the KV-cache footprint (formula and allocated) and cached decode speed.  A run
directory also gets eval_<split>.json and TensorBoard scalars eval/<split>/*.
"""

import sys

from mlalm.cli import eval_main as main

if __name__ == "__main__":
    sys.exit(main())
