"""Tokenizers: byte-level (default) and BPE trained with the `tokenizers` library."""

from __future__ import annotations

import os

import numpy as np

from mlalm.errors import ConfigError, DataError

EOS = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one special, <|endoftext|> = 256, between documents.

    Any byte string is valid input (non-UTF-8 bytes included); decoding replaces invalid
    UTF-8 sequences.
    """

    name = "byte"

    def __init__(self):
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1"

    def save(self, directory: str) -> None:
        pass


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library."""

    name = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOS)

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer
        try:
            return cls(Tokenizer.from_file(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable tokenizer file ({e})")

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        import hashlib
        return "bpe-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))


def get_tokenizer(name: str, *, train_texts=None, vocab_size: int = 8192, path: str | None = None):
    """The tokenizer ``name`` ('byte' or 'bpe').

    For BPE, ``path`` (a tokenizer.json) is loaded when it exists, else one is trained
    on ``train_texts`` (an iterable of strings).
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if path and os.path.isfile(path):
            return BPETokenizer.load(path)
        if train_texts is None:
            raise DataError("BPE tokenizer: no tokenizer.json to load and no text to train on")
        return BPETokenizer.train(train_texts, vocab_size)
    raise ConfigError(f"data.tokenizer: unknown tokenizer {name!r} (valid: 'byte', 'bpe')")
