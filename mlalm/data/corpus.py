"""``load_corpus(data_cfg)``: the tokenizer and token streams a run trains and evaluates on.

* ``data.path`` a prepared directory (it holds ``manifest.json``): opened directly; its
  manifest supplies the tokenizer and the split (``val_fraction``, ``text_key``,
  ``bpe_vocab_size`` are not used; ``data.tokenizer``, when a tokenizer.json, must be the
  directory's).
* ``data.path`` text (a file, directory or glob in any input format), or unset (the
  built-in corpus): prepared into the cache (:mod:`mlalm.data.cache`) once, then opened.
* ``data.val_path`` / ``data.test_path``: every document of them is evaluated -- a
  prepared directory's train split followed by its val split, or raw text prepared with
  the training tokenizer.  With ``data.val_path`` set, raw ``data.path`` text is not split
  (all of it trains) and a prepared directory's own val split is not used.
* ``data.mix``: ``[{path, weight}, ...]`` -- prepared directories (or raw text, prepared
  through the cache, when the tokenizer is 'byte' or a tokenizer.json) with one tokenizer;
  training batches mix them in proportion to the weights; validation is ``data.val_path``
  or, when unset, the sources' val splits one after another.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from mlalm.data.cache import builtin_files, default_cache_dir, prepared_dir
from mlalm.data.pipeline import mixture_dataset, train_dataset
from mlalm.data.shards import PreparedData, Split, TokenStream, concat, is_prepared
from mlalm.errors import DataError

if TYPE_CHECKING:
    from mlalm.data.tokenizers import ByteTokenizer, HFTokenizer


@dataclasses.dataclass
class MixSource:
    path: str
    weight: float
    data: PreparedData
    train: Split


@dataclasses.dataclass
class Corpus:
    tokenizer: ByteTokenizer | HFTokenizer
    train: TokenStream | None  # None for a mixture (see ``sources``)
    val: TokenStream
    train_bytes: int  # UTF-8 bytes of the split's text (bits per byte)
    val_bytes: int
    test: TokenStream | None = None
    test_bytes: int = 0
    train_documents: int = 0
    val_documents: int = 0
    test_documents: int = 0
    sources: list | None = None  # list[MixSource] when data.mix is set

    def train_dataset(
        self,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
        prefetch: int = 2,
        num_threads: int = 1,
        with_source: bool = False,
    ):
        """The training batches: :func:`~mlalm.data.pipeline.train_dataset`, or
        :func:`~mlalm.data.pipeline.mixture_dataset` for a mixture (``with_source``: batches
        are ``(rows, source ids)``, the ids indexing ``sources``)."""
        kw: dict[str, Any] = dict(
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
            prefetch=prefetch,
            num_threads=num_threads,
            with_source=with_source,
        )
        if self.sources is None:
            return train_dataset(self.train, **kw)
        return mixture_dataset(
            [s.train.tokens for s in self.sources],
            [s.weight for s in self.sources],
            names=[f"training split of {s.path}" for s in self.sources],
            **kw,
        )


def _common(d, log, progress) -> dict:
    return dict(
        cache_dir=d.cache_dir or default_cache_dir(),
        text_key=d.text_key,
        eos_token=getattr(d, "eos_token", None),
        workers=getattr(d, "prepare_workers", 0),
        max_memory=getattr(d, "max_memory", "2GB"),
        shard_bytes=int(getattr(d, "shard_mb", 256)) * 2**20,
        log=log,
        progress=progress,
    )


def _same_tokenizer(a: PreparedData, b: PreparedData, what: str) -> None:
    if a.fingerprint != b.fingerprint:
        raise DataError(
            f"{what}: {b.path} was prepared with a different tokenizer ({b.fingerprint}) "
            f"than {a.path} ({a.fingerprint}); prepare both with one tokenizer "
            f"(e.g. --tokenizer {a.path}/tokenizer.json)"
        )


def tokenize_path(path, tokenizer, *, key: str = "--data", **common) -> Split:
    """Every document of ``path`` (text in any input format, or a prepared directory made
    with the same tokenizer) as token ids of ``tokenizer``, through the cache.

    ``common``: cache_dir, text_key, workers, max_memory, shard_bytes, log, progress.
    """
    if is_prepared(path):
        data = PreparedData.open(path)
        if data.fingerprint != tokenizer.fingerprint():
            raise DataError(
                f"{key}: {path} was prepared with a different tokenizer "
                f"({data.fingerprint}) than the model's ({tokenizer.fingerprint()})"
            )
        return data.whole()
    common = {k: v for k, v in common.items() if k != "eos_token"}
    return prepared_dir(path, tokenizer=tokenizer, key=key, val_fraction=0.0, **common).whole()


def load_corpus(
    data_cfg, *, tokenizer_path: str | None = None, tokenizer=None, log=None, progress: bool = False
) -> Corpus:
    """Tokenizer and token streams for a DataConfig (module docstring).

    Args:
        tokenizer_path: with ``data.tokenizer=bpe``, a tokenizer.json to use instead of
            training one (e.g. the run directory's).
        tokenizer: a tokenizer object to use instead of ``data.tokenizer`` (e.g. a
            checkpoint's own, for evaluation); ignored for a prepared ``data.path``.
        log: ``log(str)`` for preparation messages; progress: a progress bar on stderr
            while raw text is prepared.
    Raises:
        DataError: unreadable or empty data, mismatched tokenizers, no validation split.
    """
    d = data_cfg
    common = _common(d, log, progress)
    if tokenizer is None:
        tokenizer = d.tokenizer
    if tokenizer == "bpe" and tokenizer_path and os.path.isfile(tokenizer_path):
        from mlalm.data.tokenizers import BPETokenizer, load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path, eos_token=common["eos_token"], cls=BPETokenizer)
    own_split = 0.0 if d.val_path else d.val_fraction

    if getattr(d, "mix", None):
        sources = []
        for i, entry in enumerate(d.mix):
            path, weight = entry["path"], float(entry["weight"])
            if not is_prepared(path) and tokenizer == "bpe":
                raise DataError(
                    f"data.mix[{i}]: {path} is not a prepared directory; with "
                    f"data.tokenizer=bpe prepare the sources with scripts/prepare.py "
                    f"(the first with --tokenizer bpe, the others with its tokenizer.json)"
                )
            data = prepared_dir(
                path,
                tokenizer=tokenizer,
                key=f"data.mix[{i}].path",
                val_fraction=own_split,
                bpe_vocab_size=d.bpe_vocab_size,
                **common,
            )
            if sources:
                _same_tokenizer(sources[0].data, data, "data.mix")
            sources.append(MixSource(path, weight, data, data.split("train")))
        first = sources[0].data
        tok = first.tokenizer
        if d.val_path:
            val = tokenize_path(d.val_path, tok, key="data.val_path", **common)
        else:
            splits = [s.data.split("val") for s in sources]
            val = Split(
                concat([s.tokens for s in splits if len(s.tokens)]),
                sum(s.bytes for s in splits),
                sum(s.documents for s in splits),
                "val splits of data.mix",
            )
        train = None
        train_bytes = sum(s.train.bytes for s in sources)
        train_docs = sum(s.train.documents for s in sources)
    else:
        if d.path is None and d.val_path is not None:
            raise DataError("data.val_path is set but data.path is not")
        inputs = d.path if d.path is not None else builtin_files()
        data = prepared_dir(
            inputs,
            tokenizer=tokenizer,
            key="data.path",
            val_fraction=own_split,
            bpe_vocab_size=d.bpe_vocab_size,
            **common,
        )
        tok = data.tokenizer
        if is_prepared(d.path) and d.tokenizer not in ("byte", "bpe"):
            from mlalm.data.tokenizers import load_tokenizer

            want = load_tokenizer(d.tokenizer, eos_token=d.eos_token).fingerprint()
            if want != data.fingerprint:
                raise DataError(
                    f"data.path: {d.path} was prepared with another tokenizer "
                    f"({data.fingerprint}) than data.tokenizer={d.tokenizer} ({want})"
                )
        split = data.split("train")
        train, train_bytes, train_docs, sources = split.tokens, split.bytes, split.documents, None
        val = (
            tokenize_path(d.val_path, tok, key="data.val_path", **common) if d.val_path else data.split("val")
        )
    if not len(val.tokens):
        raise DataError(f"{val.name}: no validation text (prepared with val fraction 0?); set data.val_path")
    test = tokenize_path(d.test_path, tok, key="data.test_path", **common) if d.test_path else None
    return Corpus(
        tokenizer=tok,
        train=train,
        val=val.tokens,
        train_bytes=train_bytes,
        val_bytes=val.bytes,
        test=test.tokens if test else None,
        test_bytes=test.bytes if test else 0,
        train_documents=train_docs,
        val_documents=val.documents,
        test_documents=test.documents if test else 0,
        sources=sources,
    )
