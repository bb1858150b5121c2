"""The one train state: parameters, optimizer state, non-trainable variables, step.

Everything that builds or restores a train state goes through :func:`init_state` or
:func:`abstract_state`, so the structure a checkpoint is restored into always matches the
structure the trainer saves.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mlalm.config import Config


@struct.dataclass
class TrainState:
    """A pytree; ``rest`` holds the non-trainable model variables (MoE balancing biases)."""

    params: nnx.State
    opt_state: object
    rest: nnx.State
    step: jax.Array  # int32 scalar: optimizer steps taken


def split_model(model: nnx.Module):
    """``(graphdef, params, rest)``: the trainable ``nnx.Param``s and everything else."""
    return nnx.split(model, nnx.Param, ...)


def param_bytes(cfg: Config) -> int:
    """Bytes the model's parameters take, from shapes alone (nothing allocated)."""
    from mlalm.model import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(abstract)))


def init_state(cfg: Config, tx, *, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh model (initialised from ``seed``) and its optimizer state at step 0."""
    from mlalm.model import Transformer

    graphdef, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(seed)))
    return graphdef, TrainState(
        params=params, opt_state=tx.init(params), rest=rest, step=jnp.zeros((), jnp.int32)
    )


def abstract_state(cfg: Config, tx) -> tuple[nnx.GraphDef, TrainState]:
    """``init_state``'s structure as ``jax.ShapeDtypeStruct``s, without allocating."""
    from mlalm.model import Transformer

    graphdef, params, rest = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, TrainState(
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        rest=rest,
        # abstract like every leaf here: a ShapeDtypeStruct where init_state has an array
        step=cast(jax.Array, jax.ShapeDtypeStruct((), jnp.int32)),
    )


def available_memory() -> int | None:
    """Bytes the first device can still hold: the accelerator's free memory, or the
    host's available memory (/proc/meminfo) on CPU; None when unknown."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: Config, *, copies: float = 4.0) -> None:
    """Fail before allocating when the train state cannot fit: parameters plus optimizer
    state take about ``copies`` times the parameters' bytes (AdamW: params, two moments,
    gradients).  Sharded runs split this over the devices.

    Raises:
        ConfigError: naming the parameter count, the bytes needed and those available.
    """
    from mlalm.errors import ConfigError

    need = param_bytes(cfg) * copies / max(1, jax.device_count())
    have = available_memory()
    if have is not None and need > have:
        m = cfg.model
        raise ConfigError(
            f"the model needs about {need / 2**30:.1f} GiB per device for parameters and optimizer "
            f"state ({param_bytes(cfg) / 2**30:.2f} GiB of parameters; the embedding alone is "
            f"model.vocab_size={m.vocab_size} x model.d_model={m.d_model}), but only "
            f"{have / 2**30:.1f} GiB is available; use a smaller model"
        )
