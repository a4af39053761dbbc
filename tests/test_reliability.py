"""Reliability: a killed search resumes without losing a trial, failures stay inside their trial,
bad input gets one clear line, and concurrent searches on one store both finish."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import SMALL, cli, runs, start_search, store, wait_for
from covidsearch import tracking


KILLABLE_EPOCHS = 30  # a trial of the killable search trains this many epochs, with no early stop
EARLY = KILLABLE_EPOCHS // 3  # "early in training": at most this many epochs logged


def _epochs_logged(work: Path) -> list[tuple[Any, int]]:
    """Each trial run with the number of epochs in its loss history."""
    trials = runs(work, "trial")
    client = store(work)[0] if trials else None
    return [(run, len(client.get_metric_history(run.info.run_id, "loss"))) for run in trials]


def _early_in_training(work: Path) -> Any | None:
    """A trial run that its worker is fitting and that has most of its epochs still ahead (a kill then lands on a
    trial in flight, not on one whose worker is answering or whose record the search is logging), or None."""
    for run, epochs in _epochs_logged(work):
        if run.info.status == "RUNNING" and tracking.EPOCHS_TRAINED not in run.data.metrics and 0 < epochs <= EARLY:
            return run
    return None


def _killable(work: Path, *args: str) -> list[str]:
    """A search whose trials train KILLABLE_EPOCHS epochs each with no early stop (a fifth of a second each here):
    its first third is a window of seconds, which a poll every half second sees even on a loaded machine (a window
    of three epochs was missed by every poll on a busy CI machine), and a kill seen in it lands while that trial
    still trains."""
    text = FAILING_SPACE.replace("patience = 5", "patience = 50") % ("8", "8", "0.001, 0.0005, 0.002", "0.001")
    space = _space(work, text)
    return ["--space", str(space), *args, *SMALL[:2], "--max-epochs", str(KILLABLE_EPOCHS), *SMALL[4:]]


def _all_epochs_trained(work: Path) -> bool:
    """A trial has trained all its epochs (its record may still be waiting to be logged: the search logs it at idle
    priority while the next trials train, and on a loaded machine that came as the last trial was past its early
    epochs, so a kill that waited for a FINISHED run found no trial to land on)."""
    return any(epochs == KILLABLE_EPOCHS for _, epochs in _epochs_logged(work))


def test_sigkilled_search_resumes_with_no_trial_lost(xray_dir, workdir):
    args = _killable(workdir, "--data", str(xray_dir), "--max-trials", "3")
    proc = start_search(workdir, *args)
    wait_for(lambda: _all_epochs_trained(workdir))
    wait_for(lambda: _early_in_training(workdir))
    os.killpg(proc.pid, signal.SIGKILL)  # the search and its worker, as a preempted machine would
    proc.wait()
    finished_before = {r.info.run_id for r in runs(workdir, "trial") if r.info.status == "FINISHED"}

    resumed = cli("run", *args, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming search" in resumed.stderr

    searches = runs(workdir, "search")
    assert len(searches) == 1 and searches[0].info.status == "FINISHED"
    trials = runs(workdir, "trial")
    statuses = sorted(r.info.status for r in trials)
    assert statuses.count("FINISHED") == 3 and "RUNNING" not in statuses
    assert statuses.count("KILLED") == 1  # the trial in flight, recorded and then run again
    assert finished_before <= {r.info.run_id for r in trials if r.info.status == "FINISHED"}
    finished_ids = [r.data.tags["covidsearch_trial_id"] for r in trials if r.info.status == "FINISHED"]
    assert sorted(finished_ids) == ["0", "1", "2"]  # each trial finished exactly once


def test_ctrl_c_records_the_trial_as_killed_and_prints_how_to_resume(xray_dir, workdir):
    proc = start_search(workdir, *_killable(workdir, "--data", str(xray_dir), "--max-trials", "3"))
    wait_for(lambda: _early_in_training(workdir))
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert {r.info.status for r in runs(workdir, "trial")} <= {"KILLED", "FINISHED"}
    assert [r.info.status for r in runs(workdir, "search")] == ["KILLED"]


def _space(tmp: Path, text: str) -> Path:
    path = tmp / "space.toml"
    path.write_text(text)
    return path


FAILING_SPACE = """
[fixed]
model = "convnet"
patience = 5
min_delta = 0.01
[hyperparameters]
input_size = { type = "choice", values = [32], default = 32 }
filters = { type = "choice", values = [%s], default = %s }
dense_units = { type = "choice", values = [16], default = 16 }
dropout = { type = "float", min = 0.0, max = 0.5, step = 0.5, default = 0.0 }
batch_size = { type = "choice", values = [32], default = 32 }
learning_rate = { type = "choice", values = [%s], default = %s }
"""


def test_a_failing_trial_becomes_a_failed_run_and_the_search_goes_on(xray_dir, workdir):
    # filters=0 cannot build a Conv2D: that trial fails, the baseline (filters=8) succeeds.
    space = _space(workdir, FAILING_SPACE % ("8, 0", "8", "0.001", "0.001"))
    result = cli("run", "--space", str(space), "--data", str(xray_dir), "--max-trials", "2", *SMALL, cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = {r.data.params["filters"]: r for r in runs(workdir, "trial")}
    assert trials["8"].info.status == "FINISHED"
    assert trials["0"].info.status == "FAILED" and "filters" in trials["0"].data.tags["error"].lower()
    assert "Traceback (most recent call last)" in trials["0"].data.tags["mlflow.note.content"]  # the run's description


def test_nan_loss_fails_the_trial(xray_dir, workdir):
    space = _space(workdir, FAILING_SPACE % ("8", "8", "1e30", "1e30"))
    result = cli("run", "--space", str(space), "--data", str(xray_dir), "--max-trials", "1", *SMALL, cwd=workdir)
    assert result.returncode == 0
    (run,) = runs(workdir, "trial")
    assert run.info.status == "FAILED" and "NaN" in run.data.tags["error"]


def test_consecutive_failures_stop_the_search_with_a_clear_message(xray_dir, workdir):
    space = _space(workdir, FAILING_SPACE % ("0", "0", "0.001", "0.001"))
    result = cli("run", "--space", str(space), "--data", str(xray_dir), "--max-trials", "5", "--max-failures", "2",
                 *SMALL, cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("covidsearch: error: search stopped: 2 trials in a row")
    assert [r.info.status for r in runs(workdir, "trial")] == ["FAILED", "FAILED"]
    assert [r.info.status for r in runs(workdir, "search")] == ["FAILED"]


@pytest.mark.slow  # test_workers.py kills a long-lived worker in its second trial
def test_a_worker_killed_mid_trial_is_a_failed_trial_not_a_failed_search(xray_dir, workdir):
    proc = start_search(workdir, *_killable(workdir, "--data", str(xray_dir), "--max-trials", "2"))
    wait_for(lambda: _early_in_training(workdir))
    training = [pid for pid in _children(proc.pid) if _busy(pid)]
    assert training, "no worker process found"
    os.kill(training[0], signal.SIGKILL)  # what the kernel's out-of-memory killer does
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    statuses = sorted(r.info.status for r in runs(workdir, "trial"))
    assert statuses == ["FAILED", "FINISHED"]
    failed = next(r for r in runs(workdir, "trial") if r.info.status == "FAILED")
    assert "worker process died" in failed.data.tags["error"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _busy(pid: int) -> bool:
    """The worker that is training uses CPU; the standby worker waits."""
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    try:
        before = ticks()
        time.sleep(1.0)
        return ticks() - before > 20 and "covidsearch.workers" in Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_two_searches_on_one_store_at_once_both_finish(xray_dir, workdir):
    args = ["--data", str(xray_dir), "--max-trials", "2", "--max-epochs", "1", "--tuner", "random",
            "--test-per-class", "8", "--set", "input_size=32", "--quiet"]
    first, second = start_search(workdir, *args), start_search(workdir, *args)  # the very same command, twice
    for proc in (first, second):
        _, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-2000:]
    searches = runs(workdir, "search")
    assert len(searches) == 2 and {s.info.status for s in searches} == {"FINISHED"}
    client, experiment_id = store(workdir)
    for search in searches:
        trials = tracking.trial_runs(client, search.info.run_id)
        assert sorted(t.info.status for t in trials) == ["FINISHED", "FINISHED"]
