"""Data: corpus sources, tokenizers, cached token arrays and the Grain pipeline."""

from mlalm.data.pipeline import Corpus, Windows, eval_batches, load_corpus, train_dataset
from mlalm.data.tokenizers import BPETokenizer, ByteTokenizer, get_tokenizer

__all__ = ["Corpus", "Windows", "eval_batches", "load_corpus", "train_dataset",
           "BPETokenizer", "ByteTokenizer", "get_tokenizer"]
