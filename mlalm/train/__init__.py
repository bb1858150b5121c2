"""Training: one TrainState, the jitted steps, the run directory, logging and the loop.

``train(cfg)`` runs a whole training job (``python train.py`` is a thin command line over
it); the parts are importable on their own (e.g. ``init_state`` + ``make_train_step`` for
a benchmark or a test).  ``train``/``TrainResult`` load the data pipeline (Grain) on first
use only, so the steps work on a machine that has JAX, flax and optax alone.
"""

from typing import TYPE_CHECKING

from mlalm.train.report import NonFiniteError
from mlalm.train.state import TrainState, abstract_state, init_state, split_model
from mlalm.train.step import lm_loss, make_eval_step, make_train_step

if TYPE_CHECKING:  # imported on first use by __getattr__ below (the loop needs Grain)
    from mlalm.train.loop import TrainResult, resolve_vocab, train

__all__ = [
    "TrainResult",
    "TrainState",
    "NonFiniteError",
    "abstract_state",
    "init_state",
    "lm_loss",
    "make_eval_step",
    "make_train_step",
    "resolve_vocab",
    "split_model",
    "train",
]


def __getattr__(name):
    if name in ("train", "TrainResult", "resolve_vocab"):
        from mlalm.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'mlalm.train' has no attribute {name!r}")
