"""Sharded training on simulated CPU devices equals the single-device run.

The device count is fixed when JAX starts, so each check runs ``tests/sharding_worker.py``
in a subprocess with ``--xla_force_host_platform_device_count``.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS
from mlalm import ConfigError
from mlalm.config import from_dict
from mlalm.sharding import logical_to_spec, mesh_shape

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sharding_worker.py")


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _result(stdout):
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module", params=["adamw", "muon"])
def mesh_runs(request):
    r = subprocess.run(
        [sys.executable, WORKER, "steps", request.param],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return request.param, _result(r.stdout)


@pytest.mark.slow  # subprocesses with 8 simulated devices
def test_meshes_match_single_device(mesh_runs):
    optim, runs = mesh_runs
    ref = runs["single"]
    for name in sorted(set(runs) - {"single"}):  # Muon: three meshes; AdamW: the full one
        np.testing.assert_allclose(
            runs[name]["losses"], ref["losses"], rtol=0, atol=1e-5, err_msg=f"{optim} {name}"
        )
        np.testing.assert_allclose(
            runs[name]["grad_norms"], ref["grad_norms"], rtol=1e-5, atol=1e-6, err_msg=f"{optim} {name}"
        )
    assert ref["losses"][-1] < ref["losses"][0]  # the steps did train


@pytest.mark.slow  # subprocesses with 8 simulated devices
def test_arrays_are_sharded_as_the_rules_say(mesh_runs):
    _, runs = mesh_runs
    s = runs["fsdp2_tensor2_expert2"]["specs"]
    assert s["embed_VD"] == [None, "fsdp"]  # vocab 64: embed over fsdp
    assert s["wkv_b_RNU"] == [None, "tensor", None]  # MLA up-projection: heads
    assert s["wq_b_QNH"] == [None, "tensor", None]
    assert s["w_gate_EDF"] == ["expert", "fsdp", "tensor"]  # experts over expert
    assert s["w_gate_DF"] == ["fsdp", "tensor"]
    assert s["opt_w_gate_EDF"] == ['["expert", "fsdp", "tensor"]']  # moments too
    assert s["batch"] == ["fsdp", None] and s["n_batch_shards"] == 2
    if "data8" not in runs:  # the AdamW run has the full mesh only
        return
    d = runs["data8"]["specs"]
    assert d["batch"] == ["data", None] and d["n_batch_shards"] == 8
    assert d["w_gate_EDF"] == [None, None, None]  # pure data parallel: replicated
    f = runs["fsdp4_tensor2"]["specs"]
    assert f["batch"] == ["fsdp", None] and f["n_batch_shards"] == 4


def test_logical_rules_fall_back_to_replication():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 4, "tensor": 2, "expert": 1}

    assert tuple(logical_to_spec(("vocab", "embed"), (257, 64), FakeMesh())) == (None, "fsdp")
    assert tuple(logical_to_spec(("embed", "mlp"), (30, 64), FakeMesh())) == (None, "tensor")
    assert tuple(logical_to_spec(("batch", None), (16, 5), FakeMesh())) == (("data", "fsdp"), None)
    assert tuple(logical_to_spec(("experts", "embed", "expert_mlp"), (4, 64, 8), FakeMesh())) == (
        None,
        "fsdp",
        "tensor",
    )


def test_mesh_that_does_not_fit_is_a_config_error():
    assert mesh_shape(from_dict({"mesh": {"data": -1, "tensor": 2}}).mesh, 8) == (4, 1, 2, 1)
    with pytest.raises(ConfigError, match="8 are available"):
        mesh_shape(from_dict({"mesh": {"data": 2, "fsdp": 2, "tensor": 1}}).mesh, 8)
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        mesh_shape(from_dict({"mesh": {"data": -1, "tensor": 3}}).mesh, 8)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # subprocesses with 8 simulated devices
def test_two_processes_equal_one(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300))
    (tmp_path / "c.txt").write_text(text)
    common = [
        f"data.path={tmp_path / 'c.txt'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.d_model=32",
        "model.n_layers=2",
        "model.ffn_dim=64",
        "attention.n_heads=4",
        "attention.kv_lora_rank=16",
        "attention.qk_nope_head_dim=8",
        "attention.qk_rope_head_dim=4",
        "attention.v_head_dim=8",
        "moe.n_routed_experts=4",
        "moe.expert_ffn_dim=16",
        "moe.dispatch=dropless",
        "train.steps=3",
        "train.batch_size=8",
        "train.seq_len=16",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.final_eval_batches=2",
        "train.progress=false",
        "mesh.data=4",
        "mesh.fsdp=2",
    ]
    one = subprocess.run(
        [sys.executable, WORKER, "train", *common, f"train.run_dir={tmp_path / 'one'}", "train.name=r"],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "train",
                *common,
                f"train.run_dir={tmp_path / 'two'}",
                "train.name=r",
                f"mesh.coordinator=127.0.0.1:{port}",
                "mesh.num_processes=2",
                f"mesh.process_id={i}",
            ],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    def losses(d):
        rows = [json.loads(x) for x in open(d / "r" / "metrics.jsonl")]
        return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if r.get("final")]

    l1, v1 = losses(tmp_path / "one")
    l2, v2 = losses(tmp_path / "two")
    assert len(l1) == 3
    np.testing.assert_allclose(l2, l1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=0, atol=1e-5)
    assert "2 processes" in outs[0][0]  # process 0 logged the run ...
    for marker in ("run dir", "step 1/", "done:"):  # ... process 1 stayed silent (gloo's own
        assert marker not in outs[1][0]  # connection notes aside)
