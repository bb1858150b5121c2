#!/usr/bin/env python
"""Checkpoint size and save/restore time for a config's train state (default model).

    python scripts/bench_checkpoint.py [--config configs/default.yaml] [--repeats 3]

Builds the model and optimizer state as the trainer does and, in a temporary directory,
measures: the size on disk of one checkpoint, the blocking part of an asynchronous save
(what a training step waits for), the whole save (until the checkpoint is complete and
its manifest written), a synchronous save, and a restore.  Medians over the repeats.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        default=os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.yaml"
        ),
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--vocab", type=int, default=257, help="vocabulary size when the config leaves it to the tokenizer"
    )
    args = p.parse_args(argv)

    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mlalm.checkpoint import Checkpointer, abstract_arrays
    from mlalm.config import load_config
    from mlalm.optim import build_optimizer
    from mlalm.train import abstract_state, init_state, resolve_vocab

    cfg = resolve_vocab(load_config(args.config), args.vocab)
    tx, _ = build_optimizer(cfg, cfg.train.steps)
    _, state = init_state(cfg, tx, seed=0)
    _, target = abstract_state(cfg, tx)  # what a resume restores into
    # fresh moments are zeros, which compress to nothing; fill them as training would
    rng = np.random.default_rng(0)
    fill = lambda x: (
        jnp.asarray(rng.normal(size=x.shape) * 1e-3, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim
        else x
    )  # noqa: E731
    state = state.replace(opt_state=jax.tree.map(fill, state.opt_state))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    times = {"async_blocking": [], "async_total": [], "sync": [], "restore": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            ck = Checkpointer(os.path.join(tmp, f"a{r}"), async_save=True, log=lambda *_: None)
            t0 = time.perf_counter()
            ck.save(1, state, it, {"config": cfg.to_dict()})
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            ck.close()
            times["async_blocking"].append(t1 - t0)
            times["async_total"].append(t2 - t0)
            ck = Checkpointer(os.path.join(tmp, f"s{r}"), async_save=False, log=lambda *_: None)
            t0 = time.perf_counter()
            ck.save(1, state, it, {"config": cfg.to_dict()})
            times["sync"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            restored, _ = ck.restore(abstract_arrays(target), it)
            jax.block_until_ready(restored)
            times["restore"].append(time.perf_counter() - t0)
            ck.close()
        step_dir = os.path.join(tmp, "s0", "1")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
    print(
        f"config {args.config}: {n_params / 1e6:.2f}M parameters, "
        f"train state {state_bytes / 1e6:.1f} MB in memory"
    )
    print(f"checkpoint on disk: {size / 1e6:.1f} MB")
    for k, v in times.items():
        print(f"{k:>15}: {statistics.median(v):.3f} s (median of {len(v)})")
    print(f"device: {jax.devices()[0].platform}, jax {jax.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
