"""Sizes written as text, and how a memory budget bounds the prepare step.

The prepare step's peak resident memory, summed over the main process and its workers, is

    main_base + in_flight * batch_bytes * IN_FLIGHT_COPIES
        + workers * (worker_base + batch_bytes * WORKER_EXPANSION)

``main_base`` and ``worker_base`` are the interpreter with numpy, tokenizers and pyarrow
imported (and a tokenizer of a large vocabulary); ``WORKER_EXPANSION`` covers one batch's
decoded text, the tokenizer's per-token encodings and the token arrays;
``IN_FLIGHT_COPIES`` covers a queued batch's raw text, its pickled copy and the tokens
coming back.  The constants are upper bounds of what ``scripts/bench_data.py`` measured
(docs/data.md): with 4 MiB batches of a byte-level BPE, a worker peaked at 165 MiB and the
main process at 100 MiB; 2 workers, the whole tree at 0.46-0.49 GiB.  :func:`plan` picks
the worker count and batch size so that the estimate stays under the budget, or raises.
Training a BPE happens before any worker starts (82 MiB for 100 MB of WikiText).
"""

from __future__ import annotations

import dataclasses
import os

from mlalm.errors import ConfigError

MAIN_BASE = 256 * 2**20  # main process: interpreter, numpy, tokenizers, pyarrow, writers
WORKER_BASE = 96 * 2**20  # one worker process before its first batch
WORKER_EXPANSION = 32  # a worker's peak per byte of batch text (tokenizer encodings)
IN_FLIGHT_COPIES = 6  # per queued batch byte: raw text, pickled copy, tokens back
MIN_BATCH = 256 * 2**10
MAX_BATCH = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
    workers: int  # worker processes (0: encode in the main process)
    batch_bytes: int  # text per batch
    in_flight: int  # batches submitted and not yet written

    def peak_estimate(self) -> int:
        encode = self.batch_bytes * WORKER_EXPANSION
        if self.workers == 0:
            return MAIN_BASE + encode
        return (
            MAIN_BASE
            + self.in_flight * self.batch_bytes * IN_FLIGHT_COPIES
            + self.workers * (WORKER_BASE + encode)
        )


def plan(
    budget: int, *, workers: int = 0, input_bytes: int | None = None, inline_below: int = 32 * 2**20
) -> Plan:
    """Worker count, batch size and queue depth that fit ``budget`` bytes.

    Args:
        workers: requested worker processes, at most as many as fit the budget; 0 picks
            one per core, or none at all (encode in the main process) when the input is
            smaller than ``inline_below`` bytes: starting processes would cost more than
            they save.
        input_bytes: total size of the input files, when known.
    Raises:
        ConfigError: the budget cannot hold one batch of the smallest size.
    """
    if workers < 0:
        raise ConfigError(f"workers={workers}: must be >= 0 (0: one per core)")
    inline = workers == 0 and input_bytes is not None and input_bytes < inline_below
    want = 0 if inline else (workers or os.cpu_count() or 1)
    batch = MAX_BATCH
    while True:
        n = want
        # fewer workers before smaller batches: a batch must stay large enough that
        # sending it costs little next to encoding it
        while n > 1 and Plan(n, batch, 2 * n).peak_estimate() > budget:
            n -= 1
        p = Plan(n, batch, 2 * n)
        if p.peak_estimate() <= budget:
            return p
        if batch <= MIN_BATCH:
            raise ConfigError(
                f"max_memory={budget:,} bytes is too small to prepare data: "
                f"{max(n, 1)} worker(s) with {MIN_BATCH // 1024} KiB batches need about "
                f"{p.peak_estimate():,} bytes"
            )
        batch //= 2
