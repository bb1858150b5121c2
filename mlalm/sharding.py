"""Device mesh and the one table that maps logical axes to mesh axes.

Every parameter carries logical axis names (``nnx.Param(..., axes=('embed', 'mlp'))``);
no module knows the mesh.  ``RULES`` below is the only place that decides which mesh axis
shards which logical axis:

  batch                 -> ('data', 'fsdp')   data parallel over data x fsdp
  embed                 -> 'fsdp'             ZeRO-3 style: parameters split over fsdp
  heads, kv_heads       -> 'tensor'           attention heads (incl. MLA's up-projections)
  mlp, expert_mlp       -> 'tensor'           FFN width
  experts               -> 'expert'           routed experts
  everything else       -> replicated

A logical axis whose size is not divisible by its mesh axis is replicated instead (e.g.
a byte-level vocabulary of 257), and a mesh axis is used at most once per array.  The
train step is ``jax.jit`` with these shardings as in/out shardings (pjit semantics): XLA's
SPMD partitioner inserts the collectives.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlalm.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "expert")

RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert_mlp": "tensor",
    "experts": "expert",
}


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor, expert) with one -1 resolved; ConfigError if they
    do not multiply to the device count."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, mesh_cfg.expert]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh: the fixed sizes multiply to {known}, which does not divide the "
                f"{n_devices} devices; adjust mesh.data/fsdp/tensor/expert"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} x expert={sizes[3]} "
            f"= {int(np.prod(sizes))} devices, but {n_devices} are available; set one size to -1 "
            f"for 'the rest'"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def logical_to_spec(axes, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array with logical ``axes`` under ``RULES`` on ``mesh``."""
    used, spec = set(), []
    for name, dim in zip(axes, shape):
        rule = RULES.get(name)
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding for every leaf: by its Variable's logical axes, else replicated.

    Works for parameters and for optimizer state alike, because optax's per-parameter
    moments keep the Param nodes (and their ``axes`` metadata) of the parameter tree.
    """

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("axes")
            value = x.get_value()
            if axes is not None and len(axes) == np.ndim(value):
                return x.replace(NamedSharding(mesh, logical_to_spec(axes, np.shape(value), mesh)))
            return x.replace(NamedSharding(mesh, P()))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [B, T+1]: the batch axis split over data x fsdp."""
    return NamedSharding(
        mesh, logical_to_spec(("batch", None), (mesh.shape["data"] * mesh.shape["fsdp"], 1), mesh)
    )


def global_batch(local_batch: np.ndarray, sharding: NamedSharding, global_batch_size: int):
    """A global jax.Array from this process's rows (its slice of the global batch)."""
    global_shape = (global_batch_size,) + local_batch.shape[1:]
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.make_array_from_process_local_data(sharding, local_batch, global_shape)


class Placement:
    """Where the train state and batches live: the mesh, and NamedShardings from ``RULES``.

    Args:
        cfg: the run's Config (``mesh`` section; ``train.batch_size``/``grad_accum`` must
            split over the data-parallel devices).
        state: the train state (or its abstract structure) whose leaves carry logical axes.
    """

    def __init__(self, cfg, state, devices=None):
        self.mesh = make_mesh(cfg.mesh, devices)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.train.batch_size % (dp * cfg.train.grad_accum):
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by mesh data x fsdp "
                f"({dp}) x train.grad_accum ({cfg.train.grad_accum})"
            )
        self.state_sh = tree_shardings(state, self.mesh)
        self.batch_sh = batch_sharding(self.mesh)
        self.repl = NamedSharding(self.mesh, P())

    def put_state(self, state):
        return jax.device_put(state, self.state_sh)

    def global_rows(self, rows: np.ndarray):
        """A global array from a host array holding every row (each process keeps its slice)."""
        n, p = jax.process_count(), jax.process_index()
        per = rows.shape[0] // n
        return global_batch(rows[p * per : (p + 1) * per], self.batch_sh, rows.shape[0])


def to_host(x):
    """Host value of a replicated (possibly multi-process) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def maybe_initialize_distributed(mesh_cfg) -> None:
    """``jax.distributed.initialize`` when a multi-process run is configured.

    From config (``mesh.coordinator``, ``mesh.num_processes``, ``mesh.process_id``) or the
    usual variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``); on SLURM and TPU pods, ``mesh.distributed=auto`` lets JAX detect
    the cluster.  A single-process run does nothing.
    """
    coordinator = mesh_cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = mesh_cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    if mesh_cfg.distributed == "off" or (mesh_cfg.distributed == "env" and not coordinator):
        return
    if mesh_cfg.distributed == "auto":
        jax.distributed.initialize()
        return
    pid = (
        mesh_cfg.process_id if mesh_cfg.process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
    )
    if not num:
        raise ConfigError("mesh.coordinator is set but mesh.num_processes (or JAX_NUM_PROCESSES) is not")
    # CPU devices of different processes talk through gloo (no effect on GPU/TPU)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
