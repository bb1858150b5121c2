"""The run-directory policy (which directory, what to resume), the lock and metrics rows.

Pure file-system logic: no JAX, no training.  Every case is a directory layout built by
hand and the plan the rule in mlalm/train/run_dir.py's docstring prescribes for it.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import tiny
from mlalm.errors import CheckpointError, ConfigError
from mlalm.train.run_dir import RunLock, plan_run, set_aside_after, truncate_metrics, write_json_atomic


def _cfg(runs, resume="auto", name="r"):
    return tiny(train={"run_dir": str(runs), "name": name, "resume": resume})


def _run(path, steps=(), finished=False, metrics=True):
    """A run directory as a run leaves it: metrics rows, checkpoints, maybe a summary."""
    os.makedirs(path, exist_ok=True)
    if metrics:
        with open(os.path.join(path, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    for s in steps:
        os.makedirs(os.path.join(path, "checkpoints", str(s), "state"))
        os.makedirs(os.path.join(path, "checkpoints", str(s), "meta"))
    if finished:
        write_json_atomic(os.path.join(path, "summary.json"), {"val_loss": 1.0})
    return str(path)


def test_auto_fresh_directory(tmp_path):
    plan = plan_run(_cfg(tmp_path), "default")
    assert plan.run_dir == str(tmp_path / "r") and plan.checkpoints is None and plan.note is None


def test_auto_reuses_a_run_killed_before_its_first_checkpoint(tmp_path):
    _run(tmp_path / "r")
    plan = plan_run(_cfg(tmp_path), "default")
    assert plan.run_dir == str(tmp_path / "r") and plan.checkpoints is None
    assert "no checkpoint" in plan.note and "from step 0" in plan.note


def test_auto_resumes_an_unfinished_run(tmp_path):
    _run(tmp_path / "r", steps=[10, 20])
    plan = plan_run(_cfg(tmp_path), "default")
    assert plan.run_dir == str(tmp_path / "r")
    assert plan.checkpoints == str(tmp_path / "r" / "checkpoints") and plan.step is None


def test_auto_starts_the_next_directory_after_a_finished_run_and_says_why(tmp_path):
    _run(tmp_path / "r", steps=[10], finished=True)
    plan = plan_run(_cfg(tmp_path), "default")
    assert plan.run_dir == str(tmp_path / "r-2") and plan.checkpoints is None
    assert "finished" in plan.note and "train.resume=" in plan.note and "train.steps" in plan.note


def test_auto_continues_the_newest_run_of_the_series(tmp_path):
    """r finished; r-2 was killed after checkpoints: the same command resumes r-2 (it once
    went to r-3 from step 1, abandoning r-2's progress)."""
    _run(tmp_path / "r", steps=[10], finished=True)
    _run(tmp_path / "r-2", steps=[10])
    plan = plan_run(_cfg(tmp_path), "default")
    assert plan.run_dir == str(tmp_path / "r-2") and plan.checkpoints.endswith("r-2/checkpoints")
    _run(tmp_path / "r-3")  # killed before its first checkpoint: reused from the start
    plan = plan_run(_cfg(tmp_path), "default")
    assert plan.run_dir == str(tmp_path / "r-3") and plan.checkpoints is None


def test_a_summary_that_is_not_complete_json_does_not_count_as_finished(tmp_path):
    _run(tmp_path / "r", steps=[10])
    with open(tmp_path / "r" / "summary.json", "w") as f:
        f.write('{"val_loss": 1.')  # torn
    assert plan_run(_cfg(tmp_path), "default").run_dir == str(tmp_path / "r")


def test_never_takes_the_next_free_name(tmp_path):
    _run(tmp_path / "r", steps=[10])
    plan = plan_run(_cfg(tmp_path, "never"), "default")
    assert plan.run_dir == str(tmp_path / "r-2") and plan.checkpoints is None and "never" in plan.note


def test_a_step_directory_resumes_exactly_that_step(tmp_path):
    run = _run(tmp_path / "r", steps=[10, 20, 30])
    plan = plan_run(_cfg(tmp_path, f"{run}/checkpoints/20"), "default")
    assert (plan.run_dir, plan.checkpoints, plan.step) == (run, os.path.join(run, "checkpoints"), 20)


def test_resuming_another_run_continues_in_the_configured_directory_and_says_so(tmp_path):
    other = _run(tmp_path / "other", steps=[10])
    plan = plan_run(_cfg(tmp_path, other), "default")
    assert plan.run_dir == str(tmp_path / "r") and plan.checkpoints == os.path.join(other, "checkpoints")
    assert "train.name=other" in plan.note


@pytest.mark.parametrize(
    "what, message",
    [
        ("missing", "no such checkpoint or run directory"),
        ("file", "is a file"),
        ("params export", r"exported model .* use train\.init_from=.*src"),
        ("hf export", r"exported model .* use train\.init_from=.*src"),
        ("empty run", "holds no checkpoint"),
    ],
)
def test_resume_paths_that_cannot_be_resumed(tmp_path, what, message):
    path = tmp_path / "src"
    if what == "file":
        path.write_text("x")
    elif what == "params export":
        path.mkdir()
        (path / "mlalm_params.json").write_text("{}")
    elif what == "hf export":
        path.mkdir()
        (path / "config.json").write_text("{}")
    elif what == "empty run":
        _run(path)
    with pytest.raises(CheckpointError, match=message) as e:
        plan_run(_cfg(tmp_path, str(path)), "default")
    assert "\n" not in str(e.value)


def test_set_aside_moves_newer_checkpoints_and_the_summary(tmp_path):
    run = _run(tmp_path / "r", steps=[10, 20, 30], finished=True)
    set_aside_after(run, 10, log=lambda *_: None)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["10"]
    (aside,) = os.listdir(os.path.join(run, "superseded"))
    assert sorted(os.listdir(os.path.join(run, "superseded", aside))) == ["20", "30", "summary.json"]


def test_truncate_metrics_drops_later_rows_the_final_row_and_a_torn_line(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 10, 20, 30)] + [{"step": 30, "final": True}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "lo')
    assert truncate_metrics(str(tmp_path), 20) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    assert truncate_metrics(str(tmp_path), 0) == 3  # a run reused from the start
    assert path.read_text() == ""


def test_the_lock_names_its_holder_and_is_released_on_exit(tmp_path):
    run = str(tmp_path / "r")
    with RunLock(run):
        with pytest.raises(ConfigError, match=rf"in use by another training process \(pid {os.getpid()}\)"):
            RunLock(run).__enter__()
    with RunLock(run):  # released
        pass


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    run = str(tmp_path / "r")
    code = (
        "import sys, time; from mlalm.train.run_dir import RunLock; RunLock(sys.argv[1]).__enter__(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, run], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
        RunLock(run).__enter__()
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    with RunLock(run):
        pass
