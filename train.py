#!/usr/bin/env python
"""Train a model: python train.py [--config FILE] [section.key=value ...]  (see --help)."""

import sys

from mlalm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
