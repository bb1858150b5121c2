"""train.py as a user runs it: resume that never loses progress, one run per directory,
clear errors for what cannot be resumed or saved, and signals at awkward moments.

Each test reproduces the reference run's per-step losses bit for bit where it resumes
(``reference_run`` in conftest.py: the same command, uninterrupted).
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, STEPS, losses, start_and_interrupt, subprocess_env, train_cmd

pytestmark = pytest.mark.slow


def _train(tmp_path, *extra, **kw):
    return subprocess.run(
        train_cmd(tmp_path, "checkpoint.every=10", *extra),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def _error_lines(stderr):
    return [line for line in stderr.strip().splitlines() if line.strip()]


def test_a_run_stopped_before_its_first_checkpoint_is_reused_then_resumed(reference_run, tmp_path):
    """Run 1 stops before any checkpoint (a non-finite loss; metrics.jsonl exists); run 2,
    the same command, reuses the directory from step 0 and is killed after checkpoint 10,
    leaving a torn metrics row; run 3 resumes it and ends equal to the uninterrupted run.
    Before: run 2 went to r-2, and run 3 to r-3 from step 1."""
    first = _train(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=0")
    assert first.returncode == 1 and "non-finite" in first.stderr
    run = os.path.join(tmp_path, "r")
    assert os.path.isfile(os.path.join(run, "metrics.jsonl")) and not os.path.isdir(
        os.path.join(run, "checkpoints", "10")
    )
    rc, out = start_and_interrupt(tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL and "no checkpoint" in out and "from step 0" in out
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "loss": 1.2')  # killed in the middle of a row
    again = _train(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    assert sorted(os.listdir(tmp_path)) == ["r"]  # no r-2, no r-3
    assert losses(run) == losses(reference_run)


def test_resume_from_a_named_step_loads_that_step(reference_run, tmp_path):
    """train.resume=RUN/checkpoints/20 of a finished run: continues from 20 (not the newest),
    newer checkpoints and the old summary are moved aside, and the run ends as before."""
    run = os.path.join(tmp_path, "r")
    shutil.copytree(reference_run, run)
    steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    assert 20 in steps and steps[-1] == STEPS
    out = _train(tmp_path, f"train.resume={run}/checkpoints/20")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {run}/checkpoints/20 (step 20/{STEPS})" in out.stdout
    aside = os.listdir(os.path.join(run, "superseded"))
    assert len(aside) == 1 and str(STEPS) in os.listdir(os.path.join(run, "superseded", aside[0]))
    assert losses(run) == losses(reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["metadata deleted", "manifest of the wrong shape", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_in_the_trainer(reference_run, tmp_path, damage):
    """Before: the trainer read the newest checkpoint's metadata before checking for damage
    and crashed (FileNotFoundError, TypeError)."""
    run = os.path.join(tmp_path, "r")
    shutil.copytree(reference_run, run)
    os.remove(os.path.join(run, "summary.json"))  # as if killed after the last save
    newest = os.path.join(run, "checkpoints", str(STEPS))
    if damage == "metadata deleted":
        os.remove(os.path.join(newest, "meta", "metadata"))
    elif damage == "manifest of the wrong shape":
        with open(os.path.join(newest, "manifest.json"), "w") as f:
            json.dump({"files": [1, 2]}, f)
    else:
        for entry in os.listdir(newest):
            p = os.path.join(newest, entry)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    out = _train(tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "damaged" in out.stdout and f"resuming from {run}/checkpoints/30" in out.stdout
    assert os.listdir(os.path.join(run, "damaged_checkpoints"))
    assert losses(run) == losses(reference_run)


@pytest.mark.parametrize("what, message", [("file", "is a file"), ("export", "exported model")])
def test_resume_of_a_file_or_an_export_is_one_line(tmp_path, what, message):
    target = tmp_path / "target"
    if what == "file":
        target.write_text("not a checkpoint")
    else:
        target.mkdir()
        (target / "mlalm_params.json").write_text("{}")
    out = _train(tmp_path, f"train.resume={target}")
    lines = _error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_a_second_run_into_the_same_directory_is_refused_naming_the_holder(tmp_path):
    """Before: the second run deleted the first one's save in flight, and both appended to
    metrics.jsonl."""
    first = subprocess.Popen(
        train_cmd(tmp_path, "train.steps=100000", "checkpoint.every=50"),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = os.path.join(tmp_path, "r", "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.isfile(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        train_cmd(tmp_path, "train.steps=100000"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    lines = _error_lines(second.stderr)
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"in use by another training process (pid {first.pid})" in lines[0]
    assert first.returncode == 0 and "stopped by SIGTERM" in out, out[-2000:]


def _limited_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_a_failed_save_is_one_line_and_never_reported_as_saved(reference_run, tmp_path):
    """Before: the CheckpointError came after hundreds of lines of 'Event loop is closed'
    tracebacks, and the console had said 'checkpoint N saved' for the failed save."""
    out = _train(tmp_path, "train.log_every=10", preexec_fn=_limited_file_size(150_000))
    lines = _error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("error: saving checkpoint 10 ") and "EFBIG" in lines[0]
    assert "checkpoint 10 saved" not in out.stdout


def test_double_ctrl_c_during_compilation_never_crashes(tmp_path):
    """Before: a second Ctrl-C while the first step compiled crashed the interpreter (139).
    Signals that arrive while XLA compiles are handled once compilation returns (two
    Ctrl-C then count as one: a clean stop); one that comes after the first was handled
    aborts at once (exit 130)."""
    proc = subprocess.Popen(
        train_cmd(tmp_path), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
        if "compiling the train step" in line:
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        if "SIGINT: finishing this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "aborting now" in out, out[-2000:]


def test_sigterm_during_the_final_evaluation_then_the_same_command_finishes_it(reference_run, tmp_path):
    """Before: SIGTERM after the last step or during the final evaluation killed the run
    (-15) without summary.json.  Now it exits 0 with the final checkpoint saved, and the
    same command evaluates and writes the summary without training again."""
    extra = ("train.final_eval_batches=0", "train.log_every=10")
    proc = subprocess.Popen(
        train_cmd(tmp_path, "checkpoint.every=10", *extra),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "final evaluation" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    run = os.path.join(tmp_path, "r")
    assert proc.returncode == 0, out[-2000:]
    assert not os.path.exists(os.path.join(run, "summary.json"))
    again = _train(tmp_path, *extra)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {run}/checkpoints/{STEPS} (step {STEPS}/{STEPS})" in again.stdout
    assert "compiling the train step" not in again.stdout  # nothing left to train
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["val_whole_split"]
    per_step, final = losses(run)
    reference = losses(reference_run)[0]
    assert {1, 10, 20, 30, 40} <= set(per_step) and len(final) == 1
    assert per_step == {step: reference[step] for step in per_step}


def test_a_missing_dependency_is_reported_as_such():
    """Before: train.py imported inside its try and ended in UnboundLocalError."""
    code = (
        "import sys; sys.modules['optax'] = None; sys.argv = ['train.py', 'train.steps=1']; "
        f"sys.path.insert(0, {ROOT!r}); from mlalm.cli import train_main; sys.exit(train_main())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert out.returncode == 1
    assert "ModuleNotFoundError" in out.stderr and "optax" in out.stderr
    assert "UnboundLocalError" not in out.stderr
