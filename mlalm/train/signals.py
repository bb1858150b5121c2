"""SIGTERM/SIGINT during training: finish the current step, save, stop.

The first signal sets a flag the loop reads after each step (and the final evaluation
between batches); a second Ctrl-C ends the process at once with exit code 130 --
``os._exit``, not an exception, because an exception raised while XLA compiles or while
Orbax's threads write can crash the interpreter.  Checkpoints already complete are
untouched; a save cut short is a temporary directory that the next run removes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np


class StopFlag:
    """Context manager installing the handlers (main thread only); ``requested`` is the
    signal's name once one arrived."""

    def __init__(self, log):
        self.requested, self.log, self.old = None, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            sys.stderr.write("\ninterrupted again: aborting now (checkpoints already saved are kept)\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested = signal.Signals(signum).name
        self.log(
            f"{self.requested}: finishing this step, saving a checkpoint, then stopping "
            f"(Ctrl-C again aborts at once)"
        )

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def agreed(self, n_processes: int) -> bool:
        """Whether to stop now; with several processes all agree (one small all-gather)."""
        if n_processes == 1:
            return self.requested is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
        return bool(np.any(flags))
