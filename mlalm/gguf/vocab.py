"""mlalm tokenizers as a GGUF vocabulary that llama.cpp tokenizes to the same ids.

Both kinds become llama.cpp's ``gpt2`` tokenizer model (byte-level BPE, src/llama-vocab.cpp):
text is split by a pre-tokenizer regex, each piece's UTF-8 bytes are mapped to GPT-2's
byte-level characters, and the ranked merges are applied.

* BPE (``data.tokenizer=bpe``, or any tokenizer.json of the same kind): the vocabulary
  and merges of the tokenizer.json.  mlalm trains it with ``tokenizers``' ByteLevel
  pre-tokenizer, whose regex is GPT-2's; llama.cpp cannot recognise a pre-tokenizer from
  the vocabulary (its converter hashes the token ids of a test string and knows only
  published models), so the file names it: ``tokenizer.ggml.pre = gpt-2``.  Other
  tokenizer.json files (another regex, a normalizer, byte fallback, sentencepiece-style)
  are refused with a ConfigError rather than written with a tokenization that differs.
* Byte-level (``data.tokenizer=byte``: id b = byte b, 256 = <|endoftext|>): id b is
  GPT-2's byte-level character of byte b, so every byte of the text becomes its own id
  whatever the pre-tokenizer splits.  llama.cpp requires a merges array and GGUF has no
  empty arrays, so one merge that can never apply is written: "<|endoftext|>
  <|endoftext|>" (merges combine adjacent symbols, which start as single characters and
  grow only by listed merges, so a multi-character left side is never formed).

The end-of-text token is a CONTROL token (never produced from text, as in mlalm, where a
literal "<|endoftext|>" in a document is ordinary text) and is also written as BOS, with
``add_bos_token = false``: mlalm's ``generate_text`` prompts without a boundary token, and
llama.cpp's gpt2 default BOS (id 11) would otherwise name an ordinary token.  Ids past
the tokenizer's vocabulary (a padded ``model.vocab_size``) are UNUSED ``[PAD{i}]`` tokens,
as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlalm.data.tokenizers import _byte_level_chars
from mlalm.errors import ConfigError

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
INERT_MERGE = "<|endoftext|> <|endoftext|>"


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    model: str = "gpt2"
    pre: str = "gpt-2"  # llama.cpp's name for GPT-2's regex (src/llama-vocab.cpp)

    def add_to(self, w) -> None:
        """Write the tokenizer keys to a ``gguf.GGUFWriter``."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        w.add_eos_token_id(self.eos_id)
        w.add_bos_token_id(self.eos_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level character of each byte 0..255."""
    by_byte = {b: c for c, b in _byte_level_chars().items()}
    return [by_byte[b] for b in range(256)]


def _pad(tokens: list[str], types: list[int], vocab_size: int) -> None:
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)


def _byte_vocab(tokenizer, vocab_size: int) -> Vocab:
    tokens = byte_level_alphabet() + [tokenizer.eos_token]
    types = [NORMAL] * 256 + [CONTROL]
    _pad(tokens, types, vocab_size)
    return Vocab(tokens, types, [INERT_MERGE], tokenizer.eos_id)


def _check_gpt2_style(spec: dict, where: str) -> None:
    """ConfigError unless the tokenizer.json is byte-level BPE with GPT-2's pre-tokenizer."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')}")
    if spec.get("normalizer"):
        problems.append(f"a normalizer ({spec['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        problems.append(
            f"pre_tokenizer {pre.get('type')}" + ("" if pre.get("use_regex", True) else " without regex")
        )
    elif pre.get("add_prefix_space"):
        problems.append("add_prefix_space")
    for key in (
        "byte_fallback",
        "ignore_merges",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "dropout",
    ):
        if model.get(key):
            problems.append(f"{key}={model[key]}")
    if problems:
        raise ConfigError(
            f"{where}: GGUF export supports byte-level BPE tokenizers with GPT-2's pre-tokenizer "
            f"(mlalm's byte and bpe tokenizers); this one has {', '.join(problems)}"
        )


def _bpe_vocab(tokenizer, vocab_size: int) -> Vocab:
    where = getattr(tokenizer, "where", "tokenizer")
    spec = json.loads(tokenizer.tok.to_str())
    _check_gpt2_style(spec, where)
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    top = max([*by_id, *added], default=-1)
    if top >= vocab_size:
        raise ConfigError(f"{where}: token id {top} is outside model.vocab_size={vocab_size}")
    tokens, types = [], []
    for i in range(top + 1):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    _pad(tokens, types, vocab_size)
    # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    return Vocab(tokens, types, merges or [INERT_MERGE], tokenizer.eos_id)


def gguf_vocab(tokenizer, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of an mlalm tokenizer (see the module docstring)."""
    if tokenizer.name == "byte":
        return _byte_vocab(tokenizer, vocab_size)
    if not hasattr(tokenizer, "tok"):
        raise ConfigError(f"GGUF export: tokenizer {tokenizer.name!r} is not a tokenizers-library tokenizer")
    return _bpe_vocab(tokenizer, vocab_size)
