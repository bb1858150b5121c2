"""Run by tests/test_sharding.py in a subprocess with several (simulated) CPU devices.

python tests/sharding_worker.py steps OPTIM       -> JSON: per mesh, losses/grad norms
python tests/sharding_worker.py train KEY=VAL...  -> runs mlalm.train.train
"""

import json
import sys

import jax
import numpy as np

from mlalm.config import from_dict
from mlalm.optim import build_optimizer
from mlalm.sharding import Placement
from mlalm.train import init_state, make_train_step

MESHES = {
    "single": dict(data=1),
    "data8": dict(data=8),
    "fsdp2_tensor2_expert2": dict(data=1, fsdp=2, tensor=2, expert=2),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
}


def config(optim, mesh):
    return from_dict(
        {
            "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "ffn_dim": 64, "max_seq_len": 64},
            "attention": {
                "kind": "mla",
                "n_heads": 4,
                "kv_lora_rank": 16,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4,
                "v_head_dim": 8,
                "q_lora_rank": 12,
            },
            "moe": {
                "n_routed_experts": 4,
                "top_k": 2,
                "expert_ffn_dim": 16,
                "first_k_dense_replace": 1,
                "dispatch": "dropless",
            },
            "optim": {"name": optim, "warmup_steps": 0, "lr": 1e-2, "schedule": "constant"},
            "train": {"batch_size": 16, "seq_len": 16},
            "mesh": mesh,
        }
    )


def spec(x):
    """A PartitionSpec as JSON: one entry per dimension, None / 'axis' / ['a', 'b']."""
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def steps(optim):
    out = {}
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 64, (16, 17)).astype(np.int32)] * 3  # one batch: the loss must fall
    # AdamW is elementwise: the mesh with every axis suffices; Muon's orthogonalisation of
    # sharded matrices runs on all four
    meshes = MESHES if optim == "muon" else {k: MESHES[k] for k in ("single", "fsdp2_tensor2_expert2")}
    for name, mesh in meshes.items():
        cfg = config(optim, mesh)
        tx, schedule = build_optimizer(cfg, 10)
        graphdef, state = init_state(cfg, tx, seed=0)
        devices = jax.devices()[:1] if name == "single" else None
        pl = Placement(cfg, state, devices)
        state = pl.put_state(state)
        step = make_train_step(graphdef, tx, schedule, cfg, pl)
        losses, norms = [], []
        for b in batches:
            batch = pl.global_rows(b)
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        p = state.params
        specs = {
            "embed_VD": spec(p["embed_VD"].get_value()),
            "wkv_b_RNU": spec(p["blocks"][1]["attn"]["wkv_b_RNU"].get_value()),
            "wq_b_QNH": spec(p["blocks"][1]["attn"]["wq_b_QNH"].get_value()),
            "w_gate_EDF": spec(p["blocks"][1]["ffn"]["w_gate_EDF"].get_value()),
            "w_gate_DF": spec(p["blocks"][0]["ffn"]["w_gate_DF"].get_value()),
            "batch": spec(batch),
            "n_batch_shards": len({str(s.index) for s in batch.addressable_shards}),
        }
        # optimizer state: every moment with the shape of w_gate_EDF is sharded like it
        opt_specs = sorted(
            {
                json.dumps(spec(x))
                for x in jax.tree.leaves(state.opt_state)
                if getattr(x, "shape", None) == (4, 32, 16)
            }
        )
        specs["opt_w_gate_EDF"] = opt_specs
        out[name] = {"losses": losses, "grad_norms": norms, "specs": specs}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps(sys.argv[2])
    else:
        from mlalm.config import load_config
        from mlalm.train import train

        train(load_config(None, sys.argv[2:]), log=lambda *a: print(*a, flush=True))
