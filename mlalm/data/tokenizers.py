"""Tokenizers: byte-level (default), BPE trained here, and any Hugging Face ``tokenizer.json``.

Every tokenizer has ``name`` ('byte', 'bpe' or 'pretrained'), ``vocab_size``, ``eos_id``
and ``eos_token`` (the end-of-text token written after every document), ``encode``,
``encode_batch``, ``decode``, ``fingerprint()`` (equal fingerprints = identical token
ids), ``save(directory)`` and ``token_bytes()`` (the bytes each id spells, for bits per
byte).

Text rule (one for preparing, training and evaluation): the byte tokenizer takes any
bytes; the others read UTF-8 text only, and text that is not UTF-8 is a DataError naming
the file and byte offset.  Special-token strings inside a document (e.g. a literal
``<|endoftext|>``) are encoded as ordinary text, so a document cannot forge a boundary.

The end-of-text token of a ``tokenizer.json`` is, in order: ``data.eos_token`` when set;
the ``eos_token`` of a ``tokenizer_config.json`` next to the file; the first of
:data:`EOS_NAMES` in the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TypeVar

import numpy as np

from mlalm.errors import ConfigError, DataError

EOS = "<|endoftext|>"
EOS_NAMES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "<|end|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "[SEP]",
)


def check_utf8(data: bytes, where: str, offset: int = 0) -> str:
    """``data`` decoded as UTF-8, or a DataError naming ``where`` and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte "
            f"offset {offset + e.start:,}); only the byte tokenizer reads arbitrary "
            f"bytes"
        ) from None


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one special, <|endoftext|> = 256, between documents.

    Any byte string is valid input (non-UTF-8 bytes included); decoding replaces invalid
    UTF-8 sequences.
    """

    name = "byte"
    strict_utf8 = False  # reads any bytes
    prefix_space = False  # adds nothing before a document
    eos_token = EOS

    def __init__(self):
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1"

    def save(self, directory: str) -> None:
        """Nothing to write: the byte tokenizer is defined by its name."""

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b""] * (self.vocab_size - 256)


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what ``tokenizers``' ByteLevel uses): char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _components(node) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder description and the members of its Sequence."""
    if not node:
        return []
    inner = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers")
    return [node] + [c for sub in (inner or []) for c in _components(sub)]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (any model: BPE, Unigram, WordPiece, WordLevel)."""

    strict_utf8 = True

    def __init__(
        self, tok, *, name: str = "pretrained", eos_token: str | None = None, where: str = "tokenizer"
    ):
        self.tok, self.name, self.where = tok, name, where
        self._spec = json.loads(tok.to_str())
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        if eos_token is not None:
            if tok.token_to_id(eos_token) is None:
                raise DataError(
                    f"{where}: the end-of-text token {eos_token!r} (data.eos_token) is not in the vocabulary"
                )
        else:
            eos_token = next((n for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
            if eos_token is None:
                raise DataError(
                    f"{where}: no end-of-text token found (tried {', '.join(EOS_NAMES)}); "
                    f"set data.eos_token (or --eos-token) to its name"
                )
        self.eos_token, self.eos_id = eos_token, tok.token_to_id(eos_token)
        # text is text: special-token strings in a document are not special
        tok.encode_special_tokens = True

    # -- encoding --------------------------------------------------------------------

    def _text(self, text: str | bytes) -> str:
        return check_utf8(bytes(text), "text") if isinstance(text, (bytes, bytearray)) else text

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self.tok.encode(self._text(text), add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        encs = self.tok.encode_batch_fast([self._text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.tok.to_str().encode())
        h.update(f"\0eos={self.eos_id}".encode())
        return "hf-" + h.hexdigest()[:16]

    def save(self, directory: str) -> None:
        """``tokenizer.json`` and a ``tokenizer_config.json`` naming the end-of-text token."""
        os.makedirs(directory, exist_ok=True)
        for name, text in (
            ("tokenizer.json", self.tok.to_str(pretty=True)),
            (
                "tokenizer_config.json",
                json.dumps(
                    {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}, indent=2
                ),
            ),
        ):
            path = os.path.join(directory, name)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)

    # -- bytes of tokens -------------------------------------------------------------

    @property
    def prefix_space(self) -> bool:
        """Whether encoding adds a space before a text that does not start with one
        (sentencepiece-style ``Metaspace``/``Prepend``, ByteLevel ``add_prefix_space``)."""
        parts = _components(self._spec.get("pre_tokenizer")) + _components(self._spec.get("normalizer"))
        for p in parts:
            t = p.get("type")
            if t == "ByteLevel" and p.get("add_prefix_space"):
                return True
            if t == "Metaspace":
                scheme = p.get("prepend_scheme") or ("always" if p.get("add_prefix_space", True) else "never")
                if scheme != "never":
                    return True
            if t == "Prepend":
                return True
        return False

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id spells (special tokens: ``b''``).

        Byte-level tokenizers map their 256-character alphabet back to bytes;
        sentencepiece-style ones map ``▁`` to a space and ``<0xNN>`` to byte NN.
        Raises:
            DataError: a tokenizer whose tokens do not determine the text (e.g. WordPiece,
                WordLevel after whitespace splitting).
        """
        decoders = {c.get("type") for c in _components(self._spec.get("decoder"))}
        replaces = [c for c in _components(self._spec.get("decoder")) if c.get("type") == "Replace"]
        metaspace = "Metaspace" in decoders or any(
            (c.get("pattern") or {}).get("String") == "▁" for c in replaces
        )
        if "ByteLevel" not in decoders and not metaspace:
            raise DataError(
                f"{self.where}: its tokens cannot be mapped to bytes (decoder: "
                f"{', '.join(sorted(d for d in decoders if d)) or 'none'}); byte-level "
                f"and sentencepiece-style tokenizers can"
            )
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
        chars = _byte_level_chars()
        fallback = "ByteFallback" in decoders
        table = []
        for i in range(self.vocab_size):
            s = self.tok.id_to_token(i)
            if i in special or s is None:
                table.append(b"")
            elif i in added:
                table.append(added[i].encode("utf-8"))
            elif "ByteLevel" in decoders:
                table.append(bytes(chars[c] for c in s) if all(c in chars for c in s) else s.encode())
            elif fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", s):
                table.append(bytes([int(s[3:5], 16)]))
            else:
                table.append(s.replace("▁", " ").encode("utf-8"))
        return table


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained with the `tokenizers` library."""

    def __init__(self, tok, *, eos_token: str | None = None, where: str = "tokenizer"):
        super().__init__(tok, name="bpe", eos_token=eos_token, where=where)

    @classmethod
    def train(cls, texts, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=EOS)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        return load_tokenizer(path, cls=cls)


def _config_eos(path: str) -> str | None:
    cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


_HF = TypeVar("_HF", bound=HFTokenizer)


def load_tokenizer(path: str, *, eos_token: str | None = None, cls: type[_HF] = HFTokenizer) -> _HF:
    """A ``tokenizer.json`` (or a directory holding one) as an :class:`HFTokenizer` (or
    the subclass ``cls``).

    Raises:
        DataError: missing or unparsable file; no end-of-text token (see the module doc).
    """
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
        raise DataError(f"{path}: not a readable tokenizer file ({str(e).splitlines()[0]})") from None
    if eos_token is None:
        eos_token = _config_eos(path)
        if eos_token is not None and tok.token_to_id(eos_token) is None:
            eos_token = None  # a stale tokenizer_config.json: fall back to the names
    return cls(tok, eos_token=eos_token, where=path)


def get_tokenizer(
    name: str,
    *,
    train_texts=None,
    vocab_size: int = 8192,
    path: str | None = None,
    eos_token: str | None = None,
):
    """The tokenizer ``name``: 'byte', 'bpe', or a path to a ``tokenizer.json``.

    For 'bpe', ``path`` (a tokenizer.json) is loaded when it exists, else one is trained
    on ``train_texts`` (an iterable of strings) with ``vocab_size`` tokens.
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if path and os.path.isfile(path):
            return load_tokenizer(path, eos_token=eos_token, cls=BPETokenizer)
        if train_texts is None:
            raise DataError("BPE tokenizer: no tokenizer.json to load and no text to train on")
        return BPETokenizer.train(train_texts, vocab_size)
    if os.path.exists(name):
        return load_tokenizer(name, eos_token=eos_token)
    raise ConfigError(
        f"data.tokenizer: unknown tokenizer {name!r} (valid: 'byte', 'bpe', or the path of a tokenizer.json)"
    )


def token_byte_table(tokenizer) -> list[bytes]:
    """The bytes each token id of ``tokenizer`` spells (special tokens: ``b''``)."""
    return tokenizer.token_bytes()


def spelled_documents(ids, tokenizer) -> list[bytes]:
    """The text of a token stream, one bytes object per end-of-text-separated piece.

    For tokenizers that add a space before every document (``prefix_space``), one leading
    space of each piece is dropped (a document that really began with a space then
    spells one byte less).
    """
    table = tokenizer.token_bytes()
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == tokenizer.eos_id)
    pieces, start = [], 0
    strip = getattr(tokenizer, "prefix_space", False)
    for end in [*cuts.tolist(), len(ids)]:
        if end > start:
            piece = b"".join(table[i] for i in ids[start:end].tolist())
            pieces.append(piece[1:] if strip and piece.startswith(b" ") else piece)
        start = end + 1
    return pieces
