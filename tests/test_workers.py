"""Worker processes: a long-lived worker's trials are recorded like a fresh one's, it is recycled by trial count or
memory, a killed one fails only its trial, and it runs the search's own covidsearch."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import SMALL, cli, runs, start_search, store, wait_for
from covidsearch import tracking, trial, workers


def _quick_failure(pool: workers.Pool, workdir: Path, n: int) -> workers.Reply:
    """A trial its worker answers at once: its id is not a number, so it fails before loading data."""
    client, experiment_id = tracking.connect()
    plan = trial.Plan(dataset=None, split=None, class_weights={}, cache_dir=str(workdir), objective="val_loss", seed=0)
    run_id = tracking.create_run(client, experiment_id, f"trial-{n}", {"covidsearch_kind": "trial"})
    spec = trial.Spec(f"not-a-number-{n}", run_id, {}, epochs=1, initial_epoch=0, trial_dir=str(workdir))
    return pool.run(workers.Task(spec, plan), tracking.writer(client, run_id))


def test_a_worker_outlives_the_thread_that_started_it(workdir):
    """`--workers-per-gpu` runs trials from threads that end one by one; a worker one of them started may be
    serving another's trial, and must not die with it (CI once saw such a trial killed)."""
    pool, answers = workers.Pool(trials_per_worker=2), []
    thread = threading.Thread(target=lambda: answers.append(_quick_failure(pool, workdir, 1).error))
    thread.start()
    thread.join()
    time.sleep(1)
    try:
        second = _quick_failure(pool, workdir, 2).error  # the same worker process serves it, here
    finally:
        pool.close()
    assert answers and answers[0].startswith("ValueError")
    assert second.startswith("ValueError"), second  # not "the worker process died"


def _huge_pages_on_request() -> bool:
    """Linux with transparent huge pages in madvise mode: glibc asks for them only there (always: every process has
    them; never: none can)."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return mode.exists() and "[madvise]" in mode.read_text()


@pytest.mark.skipif(not _huge_pages_on_request(), reason="transparent huge pages are not in madvise mode here")
def test_a_workers_malloc_asks_for_huge_pages(workdir, monkeypatch):
    """A CPU training step's tensors are fresh blocks of tens of MB: a worker's malloc marks its memory for
    transparent huge pages (madvise: the "hg" flag in the kernel's map of the process), not 4 KB pages one by one."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # a developer's own setting would decide it
    pool = workers.Pool(trials_per_worker=2)
    try:
        reply = _quick_failure(pool, workdir, 1)
        maps = Path(f"/proc/{reply.pid}/smaps").read_text()  # the worker lives on: 1 trial of its 2
    finally:
        pool.close()
    assert any(" hg" in line for line in maps.splitlines() if line.startswith("VmFlags:"))


def test_the_users_own_malloc_settings_are_kept_and_obeyed():
    """The workers' huge pages are added to what the user set in GLIBC_TUNABLES; GLIBC_TUNABLES=glibc.malloc.hugetlb=0
    turns them off (a machine where they do not pay)."""
    assert workers.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert (workers.environment({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})["GLIBC_TUNABLES"]
            == "glibc.malloc.trim_threshold=1048576:glibc.malloc.hugetlb=1")
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert workers.environment(off)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def _trial_zero(xray_dir: Path, workdir: Path, trial_dir: Path) -> tuple[MlflowClient, str, workers.Task]:
    """Trial 0 of a search run, as the search has a worker train it: the store, the search run's id, the task."""
    from covidsearch import data, spaces

    client, experiment_id = tracking.connect()
    dataset = data.scan(xray_dir)
    parts = data.split(dataset, seed=28, test_per_class=8)
    plan = trial.Plan(dataset, parts, data.class_weights(dataset.labels[parts.train], 3), str(workdir / "cache"),
                      "val_loss", 28)
    space = spaces.load("vanilla").pin(["input_size=32"])
    config = space.config(space.defaults())
    search_id = tracking.create_run(client, experiment_id, "search", {tracking.KIND: tracking.SEARCH})
    run_id = tracking.start_trial(client, search_id, "0", "tuner0", True, config)
    trial_dir.mkdir(parents=True, exist_ok=True)  # as Keras Tuner makes it
    return client, search_id, workers.Task(trial.Spec("0", run_id, config, 2, 0, str(trial_dir)), plan)


def _worker_trial(xray_dir: Path, workdir: Path, trial_dir: Path) -> tuple[MlflowClient, str, str, workers.Reply]:
    """Trial 0 trained by a worker, with no search around it to take the result: the store, the search run's id,
    the trial run's id and the worker's reply."""
    client, search_id, task = _trial_zero(xray_dir, workdir, trial_dir)
    pool = workers.Pool()
    try:
        return client, search_id, task.spec.run_id, pool.run(task, tracking.writer(client, task.spec.run_id))
    finally:
        pool.close()


def test_a_worker_never_opens_the_store_the_search_writes_its_trials_epochs(xray_dir, workdir):
    """The search process holds the store's file and writes the epochs a worker sends it: opening the store cost a
    worker half a second of imports, which a search's first trial waited for."""
    client, _, task = _trial_zero(xray_dir, workdir, workdir / "trial_0")
    pool = workers.Pool()
    try:
        reply = pool.run(task, tracking.writer(client, task.spec.run_id))
        files = _open_files(reply.pid)
    finally:
        pool.close()
    assert reply.error is None
    store_file = str((workdir / "mlruns" / "mlflow.db").resolve())
    assert store_file in _open_files(os.getpid()) and store_file not in files  # the search's open file would show
    assert [m.step for m in client.get_metric_history(task.spec.run_id, "val_loss")] == [0, 1]  # both epochs


def test_a_note_the_store_cannot_write_fails_the_trial_with_the_stores_error_not_as_a_dead_worker(xray_dir, workdir):
    """An OSError while the search writes a trial's epoch (a full disk, a tracking server gone) is the store's, and
    says so; it once read "the worker process died", after five seconds' wait for a worker that was alive."""
    _, _, task = _trial_zero(xray_dir, workdir, workdir / "trial_0")

    def full_disk(note: tracking.Note) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    pool = workers.Pool()
    try:
        with pytest.raises(OSError, match="No space left on device"):
            pool.run(task, full_disk)
    finally:
        pool.close()


def _open_files(pid: int) -> set[str]:
    return {os.path.realpath(f) for f in Path(f"/proc/{pid}/fd").iterdir()}


def test_ctrl_c_reaches_the_search_not_its_worker_which_stays_in_the_searchs_session(xray_dir, workdir):
    """A worker has a process group of its own (Ctrl-C at the terminal goes to the search, which decides what an
    interrupt ends) but shares the search's session: Linux shares the CPU fairly between sessions (autogroups)
    before it looks at priorities, so in a session of its own the training lost a quarter of the cores to the
    search's idle-priority recorder. A write to a `stty tostop` terminal, from that background group, goes on."""
    client, _, task = _trial_zero(xray_dir, workdir, workdir / "trial_0")
    pool = workers.Pool()
    try:
        reply = pool.run(task, tracking.writer(client, task.spec.run_id))
        session, group, ignored = os.getsid(reply.pid), os.getpgid(reply.pid), _ignored_signals(reply.pid)
    finally:
        pool.close()
    assert reply.error is None
    assert session == os.getsid(0) and group != os.getpgid(0)
    assert signal.SIGTTOU in ignored


def _ignored_signals(pid: int) -> set[int]:
    """The signals a process ignores, from its SigIgn mask in /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 65) if mask >> (number - 1) & 1}
    return set()


def test_a_trial_reads_finished_only_once_the_search_has_its_result(xray_dir, workdir):
    """Ctrl-C just as a trial ends: had the worker ended its run FINISHED itself, the store would hold a FINISHED
    trial that the search never got (and ran again on resume). The worker leaves it RUNNING; the search ends it."""
    from covidsearch import recorder
    from covidsearch.progress import Progress

    client, search_id, run_id, reply = _worker_trial(xray_dir, workdir, workdir)
    assert reply.error is None and "val_loss" in reply.metrics
    assert client.get_run(run_id).info.status == "RUNNING"  # recorded in full, not yet claimed as done
    assert tracking.trial_result(client, search_id, "0") is None  # a resume would run it: nothing FINISHED
    assert recorder.finish(client, run_id, workdir / tracking.PENDING, Progress("off", 1, "val_loss"), search_id,
                           "val_loss")  # as the search
    assert tracking.trial_result(client, search_id, "0") == pytest.approx(reply.metrics)  # a resume would not


def test_a_trial_whose_model_the_killed_search_had_not_logged_yet_is_logged_on_resume(xray_dir, workdir):
    """The worker answers once its model and figures' data are on disk; the search logs them while the next trial
    trains. Killed in between, the search left the record in the trial's folder: resuming logs it first and ends
    the run FINISHED, so the trial counts as run; a record half-written when the worker died is dropped."""
    from covidsearch import recorder
    from covidsearch.progress import Progress

    project = workdir / "tuner" / "project"
    client, search_id, run_id, reply = _worker_trial(xray_dir, workdir, project / "trial_0")
    assert reply.error is None
    assert (project / "trial_0" / tracking.PENDING).is_dir() and (project / "trial_0" / tracking.KERAS_FILE).exists()
    assert tracking.logged_model(client, client.get_run(run_id)) is None  # the search was killed before logging it
    half = project / "trial_1" / f"{tracking.PENDING}.partial"
    half.mkdir(parents=True)

    recovered = recorder.recover(client, project, search_id, "val_loss", Progress("off", None, "val_loss"))

    assert recovered == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert tracking.load_keras(f"models:/{tracking.logged_model(client, run)}").count_params() > 0
    figures = {Path(a.path).name for a in client.list_artifacts(run_id, tracking.FIGURES)}
    assert figures == set(tracking.FIGURE_FILES.values())
    assert tracking.trial_result(client, search_id, "0") == pytest.approx(reply.metrics)  # not trained again
    assert client.get_run(search_id).data.tags[tracking.BEST_TRIAL] == run_id
    assert not (project / "trial_0" / tracking.PENDING).exists() and not half.exists()


class _Records:
    """Pending records of small trials of one search run, as its workers leave them: only their best val_loss and
    whether they are the baseline differ."""

    def __init__(self, workdir: Path):
        from covidsearch import data, models, plots, serving

        self.workdir = workdir
        self.client, experiment_id = tracking.connect()
        self.search_id = tracking.create_run(self.client, experiment_id, "search", {tracking.KIND: tracking.SEARCH})
        self.client.log_param(self.search_id, tracking.OBJECTIVE_DIRECTION, "min")
        self.model = models.build({"model": "convnet", "input_size": 32, "filters": 1, "dense_units": 1,
                                   "dropout": 0.0, "learning_rate": 1e-3}, 3)
        self.keras_file = workdir / tracking.KERAS_FILE
        models.save(self.model, self.keras_file)
        self.labels, self.probs = np.arange(3), np.eye(3)
        self.served = serving.Classifier.of(self.model, list(data.DEFAULT_CLASSES))
        self.cams = plots.cams(self.model, np.zeros((3, 32, 32, 3), dtype=np.uint8), self.labels, self.probs)

    def write(self, name: str, val_loss: float, baseline: bool = False, notes: tuple[tracking.Note, ...] = (),
              project: Path | None = None) -> tuple[str, Path]:
        """Trial `name`'s run, started, and its pending record in `project` (the work folder if none), written as
        its worker writes it, keeping the `notes` it sent."""
        from covidsearch import recorder

        run_id = tracking.start_trial(self.client, self.search_id, name, "tuner0", baseline, {})
        folder = (project or self.workdir) / name / tracking.PENDING
        recorder.write(folder, run_id, self.keras_file, self.served, self.cams, self.labels, self.probs,
                       {"loss": [1.0], "accuracy": [0.5]}, [{"val_loss": val_loss, "val_accuracy": 0.5}], 0, 0,
                       {"best_val_loss": val_loss}, baseline, notes)
        return run_id, folder

    def recorder(self) -> Any:
        """The search's recorder, as the search makes it, for this search run."""
        from covidsearch import recorder
        from covidsearch.progress import Progress

        return recorder.Recorder(self.client, self.search_id, "val_loss", Progress("off", None, "val_loss"))

    def log(self, trials: list[tuple[str, float, bool]]) -> dict[str, str]:
        """Each (name, val_loss, baseline) trial written, then logged by the search's recorder in that order: the
        run ids by name."""
        keep = self.recorder()
        run_ids = {}
        for name, val_loss, baseline in trials:
            run_ids[name], folder = self.write(name, val_loss, baseline)
            keep.hold(run_ids[name], folder)
        keep.close()
        return run_ids

    def figures(self, run_id: str) -> set[str]:
        return {Path(a.path).name for a in self.client.list_artifacts(run_id, tracking.FIGURES)}


def test_a_trial_that_does_not_improve_the_best_gets_its_figures_and_model_when_asked(workdir):
    """The search draws figures and packages the MLflow model at once only for the trials a user looks at: each new
    best and the baseline. Any other trial keeps its scores and its data (checkpoint, predictions, Grad-CAM sample)
    and gets the rest from them on request: here `covidsearch figures`, as promote, predict or serve would."""
    import keras

    from covidsearch import registry

    records = _Records(workdir)
    client = records.client
    trials = records.log([("first", 0.5, False), ("worse", 0.7, False), ("better", 0.4, False),
                          ("baseline", 0.9, True), ("worst", 0.95, False)])
    keras.backend.clear_session()

    made = {name: (records.figures(run_id), tracking.logged_model(client, client.get_run(run_id)) is not None)
            for name, run_id in trials.items()}
    everything = set(tracking.FIGURE_FILES.values())
    assert made == {"first": (everything, True), "worse": (set(), False), "better": (everything, True),
                    "baseline": (everything, True), "worst": (set(), False)}
    worse = client.get_run(trials["worse"])
    assert worse.info.status == "FINISHED" and "test_accuracy" in worse.data.metrics
    assert tracking.load_keras(tracking.keras_uri(client, worse)).count_params() == records.model.count_params()

    result = cli("figures", trials["worse"], cwd=workdir)

    assert result.returncode == 0, result.stderr[-2000:]
    assert records.figures(trials["worse"]) == everything
    assert f"models:/{tracking.logged_model(client, worse)}" in result.stdout
    promoted = registry.promote(client, trials["worst"])  # made on the way, as predict, evaluate and serve do
    worst = client.get_run(trials["worst"])
    version = registry.model_version(client, promoted.name, promoted.version)
    assert version.source == f"models:/{tracking.logged_model(client, worst)}"
    assert records.figures(trials["worst"]) == everything


def test_a_trial_whose_mlflow_model_holds_its_checkpoint_does_not_store_it_twice(workdir):
    """A new best's (or the baseline's) MLflow model holds its .keras file, so its trial data carries no second copy
    (an InceptionV3 trial's is about 90 MB); a trial whose model is left for later keeps it there. Both load."""
    records = _Records(workdir)
    client = records.client
    trials = records.log([("best", 0.5, False), ("worse", 0.7, False)])

    stored = {name: {Path(a.path).name for a in client.list_artifacts(run_id, tracking.TRIAL_DATA)}
              for name, run_id in trials.items()}
    data_files = {tracking.TRIAL_ARRAYS, tracking.TRIAL_FACTS}
    assert stored == {"best": data_files, "worse": data_files | {tracking.KERAS_FILE}}
    for run_id in trials.values():
        uri = tracking.keras_uri(client, client.get_run(run_id))
        assert tracking.load_keras(uri).count_params() == records.model.count_params()


def test_a_better_trial_whose_model_cannot_be_logged_is_never_named_the_best(workdir, monkeypatch):
    """A trial that beats the best gets its figures and MLflow model at once; when they cannot be made (here the
    disk fills while drawing), its run fails, and the search run, which the UI and `promote` read, must not name a
    FAILED trial its best even for a while: the best is named once the run is FINISHED."""
    from covidsearch import plots, recorder
    from covidsearch.progress import Progress

    records = _Records(workdir)
    first, first_folder = records.write("first", 0.5)
    better, better_folder = records.write("better", 0.4)
    progress = Progress("off", None, "val_loss")
    assert recorder.finish(records.client, first, first_folder, progress, records.search_id, "val_loss")

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "write_trial_figures", disk_full)
    assert not recorder.finish(records.client, better, better_folder, progress, records.search_id, "val_loss")

    run = records.client.get_run(better)
    assert run.info.status == "FAILED"
    assert {"test_accuracy", "best_val_loss"} <= set(run.data.metrics)  # what it scored stays with it
    search = records.client.get_run(records.search_id).data
    assert search.tags[tracking.BEST_TRIAL] == first
    assert search.metrics["best_val_loss"] == 0.5


def test_a_record_left_by_an_older_version_is_logged_on_resume(workdir):
    """Killed, upgraded, resumed: the pending record an older covidsearch left names its checkpoint instead of
    holding it and has no baseline flag; it is logged all the same, the model included, and not trained again."""
    import json

    from covidsearch import recorder
    from covidsearch.progress import Progress

    records = _Records(workdir)
    project = workdir / "project"
    run_id, folder = records.write("trial_0", 0.5)
    facts = json.loads((folder / tracking.TRIAL_FACTS).read_text())
    del facts["baseline"]
    facts["keras_file"] = str(records.keras_file)
    (folder / tracking.TRIAL_FACTS).write_text(json.dumps(facts))
    (folder / tracking.KERAS_FILE).unlink()
    project.mkdir()
    folder.parent.rename(project / "trial_0")

    recovered = recorder.recover(records.client, project, records.search_id, "val_loss",
                                 Progress("off", None, "val_loss"))

    assert recovered == [run_id]
    run = records.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert tracking.load_keras(tracking.keras_uri(records.client, run)).count_params() == records.model.count_params()
    assert records.client.get_run(records.search_id).data.tags[tracking.BEST_TRIAL] == run_id


def test_the_oldest_record_is_weighed_against_the_best_by_the_epoch_its_worker_logged_itself(workdir):
    """Killed, upgraded, resumed: the oldest pending records had no closing metrics (their workers logged them to the
    run themselves); such a trial that beats the search's best still gets its figures and MLflow model at once."""
    import json

    from covidsearch import recorder
    from covidsearch.progress import Progress

    records = _Records(workdir)
    run_id, folder = records.write("trial_0", 0.5)
    facts = json.loads((folder / tracking.TRIAL_FACTS).read_text())
    del facts["closing"]
    (folder / tracking.TRIAL_FACTS).write_text(json.dumps(facts))
    records.client.log_metric(run_id, "best_val_loss", 0.5)
    (workdir / "project").mkdir()
    folder.parent.rename(workdir / "project" / "trial_0")

    assert recorder.recover(records.client, workdir / "project", records.search_id, "val_loss",
                            Progress("off", None, "val_loss")) == [run_id]

    run = records.client.get_run(run_id)
    assert tracking.logged_model(records.client, run) is not None
    assert {a.path for a in records.client.list_artifacts(run_id, tracking.FIGURES)}


def _trials_by_id(work: Path) -> dict[str, Any]:
    return {r.data.tags[tracking.TRIAL_ID]: r for r in runs(work, "trial")}


def test_a_recycled_workers_trials_are_recorded_like_any_other(xray_dir, workdir):
    """Trial 1 is its worker's second trial, trial 2 the first of the worker that replaced it: both are recorded as
    the fresh worker's first trial is (with --figures every, each in full), and each run says which process ran it."""
    result = cli("run", "--data", str(xray_dir), "--max-trials", "3", "--trials-per-worker", "2", "--figures", "every",
                 *SMALL, cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    client, _ = store(workdir)
    trials = _trials_by_id(workdir)
    assert sorted(trials) == ["0", "1", "2"] and {r.info.status for r in trials.values()} == {"FINISHED"}
    tags = {i: r.data.tags for i, r in trials.items()}
    assert tags["0"][tracking.WORKER_PID] == tags["1"][tracking.WORKER_PID] != tags["2"][tracking.WORKER_PID]
    assert [tags[i][tracking.WORKER_TRIAL] for i in "012"] == ["1", "2", "1"]
    assert tags["1"][tracking.WORKER_RECYCLED] == "after 2 trials" and tracking.WORKER_RECYCLED not in tags["0"]
    first = trials["0"]
    for run in trials.values():
        assert set(run.data.metrics) == set(first.data.metrics)
        assert tracking.logged_model(client, run) is not None
        figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, tracking.FIGURES)}
        assert figures == set(tracking.FIGURE_FILES.values())
        assert run.data.metrics[tracking.WORKER_RSS] > 0
        parts = {k for k in run.data.metrics if k.startswith(tracking.SETUP)}
        assert {f"{tracking.SETUP}{p}" for p in (tracking.PART_WORKER_START, tracking.PART_DATA, tracking.PART_BUILD,
                                                 tracking.PART_FIT, tracking.PART_TEST, tracking.PART_MODEL,
                                                 tracking.PART_FIGURES, tracking.PART_MLFLOW)} == parts


def test_a_search_run_from_python_gives_the_callers_garbage_collector_back_as_it_found_it(xray_dir, workdir):
    """The search exempts what is alive from garbage collection while it runs (its figures would otherwise set off
    collections of TensorFlow's objects); a notebook that runs one search after another must get those objects
    back, or every search's tuner and records would stay in its memory for good."""
    import gc

    from covidsearch import search

    frozen = gc.get_freeze_count()
    result = search.run(search.Options(data=str(xray_dir), tuner="random", max_trials=1, max_epochs=1,
                                       test_per_class=8, sets=["input_size=32"], progress="off"))
    assert result.trials == 1 and result.best_run_id is not None
    assert gc.get_freeze_count() == frozen


def test_the_records_logged_while_trials_train_run_their_numpy_on_one_thread(xray_dir, workdir, monkeypatch):
    """A trial's record is scored (bootstrap intervals) and drawn while the next trial trains: OpenBLAS's second
    thread sped none of that and spun after each call on the core the training needed. The caller's BLAS is given
    back as it was."""
    import threadpoolctl

    from covidsearch import recorder, search

    def pools() -> dict[str, int]:
        return {pool["filepath"]: pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                if pool["user_api"] == "blas"}

    before = pools()
    if max(before.values(), default=1) == 1:
        pytest.skip("this machine's BLAS has one thread already")
    seen = []
    log_pending = recorder.log_pending

    def spy(*args: Any, **kwargs: Any) -> float | None:
        seen.append(pools())
        return log_pending(*args, **kwargs)

    monkeypatch.setattr(recorder, "log_pending", spy)
    result = search.run(search.Options(data=str(xray_dir), tuner="random", max_trials=3, max_epochs=1,
                                       test_per_class=8, sets=["input_size=32"], progress="off"))
    assert result.trials == 3
    assert set(seen[0].values()) == {1}  # trial 0's record, logged while trial 1 trained
    assert pools() == before


def test_a_long_lived_worker_killed_mid_trial_fails_only_that_trial(xray_dir, workdir):
    """The worker that ran trial 0 is killed as it takes or trains trial 1: trial 1 fails, and trial 2 runs in a fresh
    worker (the standby) and finishes. Trials train 12 epochs, none stopped early: trial 1's window, in which a poll
    must see it, is then some 4 s, not the 2.3 s of 4 epochs (a poll on a busy CI machine missed a 0.6 s one)."""
    proc = start_search(workdir, "--data", str(xray_dir), "--max-trials", "3", *SMALL[:2], "--max-epochs", "12",
                        *SMALL[4:], "--set", "patience=50")
    # trial 0 answered (its worker named) and trial 1 created: it is being sent, or training, in that worker
    wait_for(lambda: (lambda t: "1" in t and tracking.WORKER_PID in t["0"].data.tags)(_trials_by_id(workdir)))
    pid = int(_trials_by_id(workdir)["0"].data.tags[tracking.WORKER_PID])
    os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    trials = _trials_by_id(workdir)
    assert [trials[i].info.status for i in "012"] == ["FINISHED", "FAILED", "FINISHED"]
    assert "worker process died" in trials["1"].data.tags["error"]
    tags = {i: r.data.tags for i, r in trials.items()}
    assert tags["1"][tracking.WORKER_PID] == str(pid) and tags["1"][tracking.WORKER_TRIAL] == "2"
    assert tags["2"][tracking.WORKER_PID] != str(pid) and tags["2"][tracking.WORKER_TRIAL] == "1"


def test_a_worker_is_recycled_after_its_trials_or_once_its_memory_grew_past_the_bound():
    assert workers.recycle_reason(20, 20) == "after 20 trials" and workers.recycle_reason(1, 1) == "after 1 trial"
    assert workers.recycle_reason(3, 20) is None
    memory = workers.Memory(10.0)
    assert memory.after(1000.0, 1500.0) is None  # the first trial sets the baseline
    assert memory.after(1100.0, 1500.0) is None  # at the bound, not past it
    assert memory.after(1101.0, 1500.0).startswith("memory 1101 MB, 10% above the 1000 MB after its largest trial")


def test_a_bigger_trial_raises_the_memory_baseline_and_a_leak_does_not():
    """A 32 px trial, then a 128 px one: the second leaves the allocator's pages behind, which is its size, not a
    leak, so the worker is kept. Same-size trials whose memory creeps up, after or at its peak, are a leak."""
    memory = workers.Memory(10.0)
    assert memory.after(1000.0, 1500.0) is None
    assert memory.after(1600.0, 3300.0) is None  # its peak jumped far past the last trial's: the new baseline
    assert memory.after(1500.0, 3300.0) is None  # a small trial after it
    creeping = [memory.after(1610.0, 3300.0 + 60 * k) for k in range(1, 7)]  # 60 MB more at the peak each trial
    assert creeping[:5] == [None] * 5
    assert creeping[5].startswith("peak memory 3660 MB, 11% above the 3300 MB")


def test_trials_run_the_search_processs_covidsearch_whatever_the_working_directory_holds(xray_dir, workdir):
    """A checkout of another version (or one being edited) where the command is run must not train the trials."""
    (workdir / "covidsearch").mkdir()
    (workdir / "covidsearch" / "__init__.py").write_text("raise ImportError('not the covidsearch that was run')\n")
    command = Path(sys.executable).with_name("covidsearch")  # the installed command, as a user runs it
    result = subprocess.run([str(command), "run", "--space", "vanilla", "--data", str(xray_dir), "--tuner", "random",
                             "--max-trials", "1", "--max-epochs", "1", "--test-per-class", "8"], cwd=workdir,
                            capture_output=True, text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    search = client.search_runs([client.get_experiment_by_name("covidsearch").experiment_id],
                                f"tags.{tracking.KIND} = '{tracking.SEARCH}'")[0]
    assert [r.info.status for r in tracking.trial_runs(client, search.info.run_id)] == ["FINISHED"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_a_trials_epochs_are_written_at_low_priority_and_all_in_once_its_run_is_finished(xray_dir, workdir,
                                                                                         monkeypatch):
    """Each epoch's note cost the search about 13 ms of CPU at normal priority, on the cores the training needed: the
    search's nice-19 notes thread writes them, and every epoch is in its FINISHED run, once."""
    from covidsearch import search

    niceness = []
    log_note = tracking.log_note

    def spy(found: MlflowClient, run_id: str, note: tracking.Note) -> None:
        if "loss" in note.metrics:
            niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        log_note(found, run_id, note)

    monkeypatch.setattr(tracking, "log_note", spy)
    result = search.run(search.Options(data=str(xray_dir), tuner="random", max_trials=2, max_epochs=2,
                                       test_per_class=8, sets=["input_size=32"], progress="off"))
    assert result.trials == 2
    assert len(niceness) == 4 and set(niceness) == {19}
    client, _ = store(workdir)
    trials = runs(workdir, "trial")
    assert [r.info.status for r in trials] == ["FINISHED"] * 2
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]


def test_a_trials_record_waits_for_its_notes_so_a_finished_run_has_all_its_epochs(workdir, monkeypatch):
    """The notes thread may lag behind a trial (at nice 19, on busy cores): its record, and so FINISHED, comes after."""
    from covidsearch import recorder

    records = _Records(workdir)
    run_id, folder = records.write("0", 0.5)
    written, logging = threading.Event(), threading.Event()
    log_note, log_pending = tracking.log_note, recorder.log_pending

    def slow_note(found: MlflowClient, run: str, note: tracking.Note) -> None:
        written.wait(60)
        log_note(found, run, note)

    def spy(*args: Any, **kwargs: Any) -> bool:
        logging.set()
        return log_pending(*args, **kwargs)

    monkeypatch.setattr(tracking, "log_note", slow_note)
    monkeypatch.setattr(recorder, "log_pending", spy)
    keep = records.recorder()
    notes = keep.notes(run_id)
    notes.write(tracking.Note({"loss": 1.0}, step=0))
    keep.hold(run_id, folder, notes)
    keep.release()
    assert not logging.wait(3)  # the record waits while its note is not in
    written.set()
    keep.close()
    assert records.client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in records.client.get_metric_history(run_id, "loss")] == [0]


def test_a_note_the_store_cannot_take_stops_the_trial_at_its_next_note_and_fails_its_run(workdir, monkeypatch):
    """Written in the background, a note that failed still fails its trial: at the trial's next note (its worker is
    then stopped, not left to train on for a store that takes nothing), else when its record is logged."""
    records = _Records(workdir)
    run_id, folder = records.write("0", 0.5)

    def full_disk(found: MlflowClient, run: str, note: tracking.Note) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    keep = records.recorder()
    monkeypatch.setattr(tracking, "log_note", full_disk)
    notes = keep.notes(run_id)
    notes.write(tracking.Note({"loss": 1.0}, step=0))
    with pytest.raises(OSError, match="No space left on device"):
        for step in range(1, 100):  # the first note fails in the background; a later one says so
            time.sleep(0.1)
            notes.write(tracking.Note({"loss": 1.0}, step=step))
    assert step < 99

    last = keep.notes(run_id)
    last.write(tracking.Note({"loss": 1.0}, step=0))  # the trial's last note: its record says so
    keep.hold(run_id, folder, last)
    keep.close()
    run = records.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags[tracking.ERROR]


def test_epochs_a_killed_search_had_not_written_yet_come_from_the_record_on_resume(workdir):
    """The search writes a trial's notes in the background; killed after the worker left its record but before the
    last notes were in, it finds them in the record on resume: each epoch in the run once, tags too."""
    from covidsearch import recorder
    from covidsearch.progress import Progress

    records = _Records(workdir)
    run_id = tracking.start_trial(records.client, records.search_id, "0", "tuner0", False, {})
    notes = [tracking.Note({"loss": 0.9, "val_loss": 1.0}, step=0), tracking.Note({"loss": 0.8, "val_loss": 0.9}, step=1),
             tracking.Note({}, tags={tracking.THRESHOLD_REACHED: "false"})]
    project = workdir / "project"
    recorder.write(project / "trial_0" / tracking.PENDING, run_id, records.keras_file, records.served, records.cams,
                   records.labels, records.probs, {"loss": [0.9, 0.8], "accuracy": [0.5, 0.6]},
                   [{"val_loss": 1.0, "val_accuracy": 0.5}, {"val_loss": 0.9, "val_accuracy": 0.6}], 0, 0,
                   {"best_val_loss": 0.9}, notes=notes)
    tracking.log_note(records.client, run_id, notes[0])  # written before the kill; the rest were not

    recovered = recorder.recover(records.client, project, records.search_id, "val_loss",
                                 Progress("off", None, "val_loss"))

    assert recovered == [run_id]
    for key, values in {"loss": [0.9, 0.8], "val_loss": [1.0, 0.9]}.items():
        history = records.client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == list(enumerate(values))
    assert records.client.get_run(run_id).data.tags[tracking.THRESHOLD_REACHED] == "false"


def test_an_epoch_the_store_cannot_take_on_resume_fails_only_its_trial(workdir, monkeypatch):
    """Resuming, the search writes a killed trial's unwritten epochs from its record before logging it; one the
    store cannot take (a full disk) fails that trial's run, as its record would, and the other records are logged."""
    from covidsearch import recorder
    from covidsearch.progress import Progress

    records = _Records(workdir)
    project = workdir / "project"
    epoch = tracking.Note({"loss": 0.9, "val_loss": 1.0}, step=0)
    broken, _ = records.write("trial_0", 0.6, notes=(epoch,), project=project)
    whole, _ = records.write("trial_1", 0.5, notes=(epoch,), project=project)
    log_note = tracking.log_note

    def full_disk(client: MlflowClient, run_id: str, note: tracking.Note) -> None:
        if run_id == broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        log_note(client, run_id, note)

    monkeypatch.setattr(tracking, "log_note", full_disk)
    recovered = recorder.recover(records.client, project, records.search_id, "val_loss",
                                 Progress("off", None, "val_loss"))

    assert recovered == [whole]
    failed = records.client.get_run(broken)
    assert failed.info.status == "FAILED" and "No space left on device" in failed.data.tags[tracking.ERROR]
    assert records.client.get_run(whole).info.status == "FINISHED"
    assert [m.value for m in records.client.get_metric_history(whole, "val_loss")] == [1.0]
    assert records.client.get_run(records.search_id).data.tags[tracking.BEST_TRIAL] == whole
