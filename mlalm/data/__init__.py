"""Data: input formats, tokenizers, the prepare step (sharded token files + manifest), the
cache of prepared raw text, and the Grain pipeline (windows, mixtures).

Names are imported on first use, so that e.g. ``mlalm.config`` can use
``mlalm.data.memory`` without importing Grain.  The prepare function is
``mlalm.data.prepare.prepare`` (the module has its name).  See ``docs/data.md``.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below imports on first use, for type checkers
    from mlalm.data.cache import cached_tokens, default_cache_dir, prepared_dir
    from mlalm.data.corpus import Corpus, load_corpus, tokenize_path
    from mlalm.data.pipeline import Windows, eval_batches, mixture_dataset, train_dataset
    from mlalm.data.shards import PreparedData, Split, TokenStream, is_prepared, verify
    from mlalm.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, get_tokenizer, load_tokenizer

_EXPORTS = {
    "Corpus": "corpus",
    "load_corpus": "corpus",
    "tokenize_path": "corpus",
    "Windows": "pipeline",
    "eval_batches": "pipeline",
    "train_dataset": "pipeline",
    "mixture_dataset": "pipeline",
    "cached_tokens": "cache",
    "default_cache_dir": "cache",
    "prepared_dir": "cache",
    "PreparedData": "shards",
    "TokenStream": "shards",
    "Split": "shards",
    "is_prepared": "shards",
    "verify": "shards",
    "BPETokenizer": "tokenizers",
    "ByteTokenizer": "tokenizers",
    "HFTokenizer": "tokenizers",
    "get_tokenizer": "tokenizers",
    "load_tokenizer": "tokenizers",
}

# a literal list (the keys of _EXPORTS, sorted), so that type checkers can read it
__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "PreparedData",
    "Split",
    "TokenStream",
    "Windows",
    "cached_tokens",
    "default_cache_dir",
    "eval_batches",
    "get_tokenizer",
    "is_prepared",
    "load_corpus",
    "load_tokenizer",
    "mixture_dataset",
    "prepared_dir",
    "tokenize_path",
    "train_dataset",
    "verify",
]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlalm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mlalm.data.{module}"), name)
    globals()[name] = value
    return value
