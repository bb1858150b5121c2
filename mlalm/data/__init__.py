"""Data: input formats, tokenizers, the prepare step (sharded token files + manifest), the
cache of prepared raw text, and the Grain pipeline (windows, mixtures).

Names are imported on first use, so that e.g. ``mlalm.config`` can use
``mlalm.data.memory`` without importing Grain.  The prepare function is
``mlalm.data.prepare.prepare`` (the module has its name).  See ``docs/data.md``.
"""

import importlib

_EXPORTS = {
    "Corpus": "corpus", "load_corpus": "corpus", "tokenize_path": "corpus",
    "Windows": "pipeline", "eval_batches": "pipeline", "train_dataset": "pipeline",
    "mixture_dataset": "pipeline",
    "cached_tokens": "cache", "default_cache_dir": "cache", "prepared_dir": "cache",
    "PreparedData": "shards", "TokenStream": "shards", "Split": "shards", "is_prepared": "shards",
    "verify": "shards",
    "BPETokenizer": "tokenizers", "ByteTokenizer": "tokenizers", "HFTokenizer": "tokenizers",
    "get_tokenizer": "tokenizers", "load_tokenizer": "tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlalm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mlalm.data.{module}"), name)
    globals()[name] = value
    return value
