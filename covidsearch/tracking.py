"""The MLflow record: one parent run per search, one nested child run per trial, evaluations beside them.

This module is the only one that writes runs, and the one home of their tag, artifact and metric
names. The default store is SQLite at mlruns/mlflow.db with artifacts under mlruns/ (MLflow 3
refuses the old file store); --tracking-uri or MLFLOW_TRACKING_URI point elsewhere.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import getpass
import io
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from . import UserError, text

DEFAULT_EXPERIMENT = "covidsearch"
STORE_DIR = Path("mlruns")
SQLITE = "sqlite:///"

# Tags
KIND = "covidsearch_kind"  # what a run is: one of the kinds below
SEARCH, TRIAL, EVALUATION = "search", "trial", "evaluation"
ENSEMBLE = "ensemble"  # a child run of a search whose model averages its best trials (ensembles.py)
MEMBERS = "ensemble_members"  # an ensemble's member trial run ids, comma-separated
TRIAL_ID = "covidsearch_trial_id"  # Keras Tuner's trial id
WORKER_ID = "covidsearch_worker_id"  # the tuner id that ran a trial
WORKER_PID = "covidsearch_worker_pid"  # the worker process that trained a trial (workers.py)
WORKER_TRIAL = "covidsearch_worker_trial"  # which of that process's trials it was: 1 for its first
WORKER_RECYCLED = "covidsearch_worker_recycled"  # why that process was replaced after this trial
SEARCH_KEY = "covidsearch_search_key"  # identity of a search's settings and data: how workers find their chief
ORACLE = "covidsearch_oracle"  # where a chief serves its oracle ("none" for a local search)
BUDGET = "covidsearch_budget_minutes"  # the --budget a search was (last) run with
BASELINE = "baseline"  # "true" on the trial of the tutorial's configuration
WARM_START = "warm_start"  # where a Hyperband continuation took its weights from
ERROR = "error"
HEARTBEAT = "covidsearch_heartbeat"  # when the process waiting on a trial last said it is alive (epoch seconds)
HEARTBEAT_SECONDS = 10
BEST_TRIAL = "best_trial_run_id"
OBJECTIVE_DIRECTION = "objective_direction"  # a search run's param: "min" or "max"
# The operating point (operating.py): on trials, ensembles and registered versions; on evaluations as eval_ tags
TARGET_SENSITIVITY = "target_sensitivity"  # the COVID-19 sensitivity the threshold was chosen for on validation
THRESHOLD_REACHED = "covid_threshold_reached"  # "false": no threshold reached the target there; argmax kept
DATA_FINGERPRINT = "data_fingerprint"
PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"
# MLflow 3's UI opens an experiment of this kind on its runs (trials side by side), not on GenAI traces.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# Artifacts
SEARCH_RECORDS = "search"  # folder of the search run: the files below
DATASET, LEAKAGE, MANIFEST, SKIPPED = "dataset.json", "leakage.json", "split_manifest.csv", "skipped_files.csv"
MODEL = "model"  # the name each trial's logged model has: a pyfunc (serving.Classifier) that takes image files
MODEL_AT_OP = "model_at_op"  # a trial's model logged again by `promote --target-sensitivity`, with its threshold
KERAS_ARTIFACT, KERAS_FILE = "keras_model", "model.keras"  # the trial's Keras model inside it: artifact key, file
KERAS_PATH = f"artifacts/{KERAS_FILE}"  # where MLflow keeps that file in the logged model (load_keras)
FIGURES = "figures"  # folder of a trial's PNG figures
TRIAL_DATA = "trial_data"  # folder of a trial: what its figures and MLflow model are made of, and its .keras
# checkpoint where no MLflow model holds it yet
TRIAL_ARRAYS, TRIAL_FACTS = "figures.npz", "record.json"  # in it: test predictions and Grad-CAM sample; the rest
PENDING = "pending-record"  # folder in a trial's directory: the same files until the search logs them
FIGURE_FILES = {"curves": "curves.png", "confusion": "confusion_matrix.png", "roc": "roc.png", "gradcam": "gradcam.png"}
CONFUSION = "confusion_matrix.json"
REPORT = "report/report.html"

# Metrics
BEST = "best_"  # prefix: a trial's best epoch's validation metrics, and the search's best score
TEST = "test_"  # prefix of the held-out test metrics
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"  # suffixes of a metric's bootstrap 95% interval (metrics.interval_metrics)
EPOCHS_TRAINED = "epochs_trained"
RECORD_SECONDS = "record_seconds"  # logging a trial's record, in the search process, off the trial's path
FIGURES_SECONDS = "figures_seconds"  # drawing its figures, part of that (when they were drawn then)
SETUP = "setup_seconds_"  # prefix: a trial's fixed cost by part, the seconds it spent outside its epochs, in:
PART_WORKER_START = "worker_start"  # the start-up of its worker process that it waited for
PART_DATA, PART_BUILD = "data", "build"  # its pixels from the cache; its model built and compiled
PART_FIT = "fit"  # model.fit outside the epochs' own seconds (train_seconds + val_seconds)
PART_TEST, PART_FIGURES = "test", "figures"  # scoring the test split; the Grad-CAM heatmaps of the figures
PART_MODEL, PART_MLFLOW = "model", "mlflow"  # saving the model once (its checkpoint, logged by the recorder); its notes
WORKER_RSS = "worker_rss_mb"  # the worker's resident memory after the trial, Keras state cleared
WORKER_PEAK = "worker_peak_rss_mb"  # the worker's peak memory (VmHWM) up to the end of the trial
COVID_THRESHOLD = "covid_threshold"  # COVID-19 is called from this probability on (also the models' metadata key)
AT_OP = "_at_op"  # suffix of the metrics at that threshold (metrics.at_threshold): test_sensitivity_covid_19_at_op


class StoreError(UserError, RuntimeError):
    """The tracking store cannot be used; shown as a one-line error."""


# ---------------------------------------------------------------- the store


def store_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else SQLite under ./mlruns."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"{SQLITE}{(STORE_DIR / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store URI; None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def _is_default_local(uri: str) -> bool:
    return uri == f"{SQLITE}{(STORE_DIR / 'mlflow.db').resolve()}"


def client(tracking_uri: str | None = None, create: bool = True) -> MlflowClient:
    """A client on the store; a new SQLite store is created by one process at a time (MLflow's schema migration
    crashes when two processes create the same file at once)."""
    uri = store_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is None:
        # A tracking server's client prints two links per ended run on stdout, amid covidsearch's own output;
        # set here, before any trial process starts, so those inherit it.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        return MlflowClient(uri)
    if not db.exists() and not create:
        raise StoreError(f"no tracking store at {db} yet: start a search with `covidsearch run`")
    _check_writable_sqlite(db)
    with store_lock(db):
        found = MlflowClient(uri)
        try:
            found.search_experiments(max_results=1)  # creates and migrates the tables, under the lock
        except MlflowException as err:
            raise StoreError(f"cannot use tracking store {uri}: {str(err).splitlines()[0]}") from None
        return found


@contextlib.contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """Exclusive use of a SQLite store's lock file: what must not happen in two processes at once."""
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def connect(tracking_uri: str | None = None, experiment: str | None = None,
            create: bool = True) -> tuple[MlflowClient, str]:
    """A client on the store and the experiment's id (created, as a model-training experiment, when asked)."""
    found = client(tracking_uri, create)
    db = sqlite_path(store_uri(tracking_uri))
    with store_lock(db) if db else contextlib.nullcontext():  # one process creates the experiment; others wait
        return found, _experiment(found, store_uri(tracking_uri), experiment or DEFAULT_EXPERIMENT, create)


def _experiment(found: MlflowClient, uri: str, name: str, create: bool) -> str:
    """The experiment's id, created with artifacts under mlruns/ when the store is the default one."""
    try:
        existing = found.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        if not create:
            raise StoreError(f"no experiment {name!r} in {uri}")
        location = (STORE_DIR / "artifacts").resolve().as_uri() if _is_default_local(uri) else None
        return found.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as err:
        raise StoreError(f"cannot use tracking store {uri}: {str(err).splitlines()[0]}") from None


def _check_writable_sqlite(db: Path) -> None:
    """Fail early and clearly when the SQLite store cannot be created or written."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        probe = f"covidsearch_probe_{os.getpid()}"  # a process's own: another one's DROP cannot take it away
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {probe} (x INTEGER)")
            conn.execute(f"DROP TABLE {probe}")
    except (OSError, sqlite3.Error) as err:
        raise StoreError(f"cannot write tracking store {db}: {err}") from None


# ---------------------------------------------------------------- runs


def create_run(found: MlflowClient, experiment_id: str, name: str, tags: dict[str, str],
               parent_id: str | None = None) -> str:
    """A new RUNNING run with its source and user (the UI's columns); a trial run is nested under its search."""
    tags = {RUN_NAME: name, "mlflow.user": _user(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"covidsearch {sys.argv[1] if len(sys.argv) > 1 else ''}".strip(), **tags}
    if parent_id:
        tags[PARENT] = parent_id
    return found.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        return str(os.getuid())


def end_run(found: MlflowClient, run_id: str, status: str, error: str | None = None,
            detail: str | None = None) -> None:
    """Terminate a run, recording the error text on failure (and its traceback, `detail`, as the run's note)."""
    if error:
        found.set_tag(run_id, ERROR, error[-4900:])
        found.set_tag(run_id, NOTE, f"```\n{(detail or error)[-20000:]}\n```")
    found.set_terminated(run_id, status=status)


def get_run(found: MlflowClient, run_id: str) -> mlflow.entities.Run:
    """A run by id in any experiment of the store, or a one-line error naming it."""
    try:
        return found.get_run(run_id)
    except MlflowException:
        raise StoreError(f"unknown run id {run_id!r} in {found.tracking_uri}") from None


def metrics(values: dict[str, float], step: int = 0, **link: Any) -> list[Metric]:
    """MLflow metrics of the finite values, at one time and step (link: model_id, dataset_name, dataset_digest)."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, **link) for k, v in values.items() if v is not None and math.isfinite(v)]


def params(values: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)) for k, v in sorted(values.items())]


@dataclass
class Note:
    """Metrics (an epoch's at its step) and tags for a run, in one write; a trial's worker hands its notes to the
    search process, which writes them (`writer`, in the background: recorder.Recorder.notes), so that a worker
    never opens the store."""

    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0
    tags: dict[str, str] = field(default_factory=dict)


def log_note(found: MlflowClient, run_id: str, note: Note) -> None:
    """A note's metrics and tags written to the run in one call."""
    found.log_batch(run_id, metrics=metrics(note.metrics, note.step), tags=[RunTag(k, v) for k, v in note.tags.items()])


def writer(found: MlflowClient, run_id: str) -> Callable[[Note], None]:
    """The notes of a run written to the store as they come."""
    return functools.partial(log_note, found, run_id)


# ---------------------------------------------------------------- searches


def provenance() -> dict[str, str]:
    """Git commit, Python, Keras backend and package versions: what a result can be traced back to."""
    import keras

    commit = _git_commit()
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "python": sys.version.split()[0],
            "keras_backend": keras.backend.backend()}
    for package in ("covidsearch", "keras", "keras-tuner", "mlflow", "tensorflow", "jax", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            tags[f"version.{package}"] = version(package)
    return tags


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def start_search(found: MlflowClient, experiment_id: str, name: str, settings: dict[str, Any], fingerprint: str,
                 records: Path) -> str:
    """The search's parent run with its settings, provenance and the files in `records` (data summary, split)."""
    run_id = create_run(found, experiment_id, name, {KIND: SEARCH, DATA_FINGERPRINT: fingerprint, **provenance()})
    found.log_batch(run_id, params=params(settings))
    found.log_artifacts(run_id, str(records), SEARCH_RECORDS)
    return run_id


def mark_search(found: MlflowClient, run_id: str, key: str, oracle: str | None, budget: float | None = None) -> None:
    """RUNNING again (a resumed search) with the key and oracle address workers find it by, and its budget."""
    found.update_run(run_id, "RUNNING")
    found.set_tag(run_id, SEARCH_KEY, key)
    found.set_tag(run_id, ORACLE, oracle or "none")
    found.set_tag(run_id, BUDGET, "none" if budget is None else f"{budget / 60:g}")


def latest_search(found: MlflowClient, experiment_id: str) -> str:
    """The most recent search run of the experiment."""
    runs = found.search_runs([experiment_id], f"tags.{KIND} = '{SEARCH}'", max_results=1,
                             order_by=["attributes.start_time DESC"])
    if not runs:
        raise StoreError("no search in this store yet: start one with `covidsearch run`")
    return runs[0].info.run_id


def search_id(found: MlflowClient, experiment: str | None, given: str | None) -> str:
    """The search run given by id (in whichever experiment it is), else the experiment's latest."""
    if given:
        run = get_run(found, given)
        if run.data.tags.get(KIND) != SEARCH:
            raise StoreError(f"run {given} is not a search run: pass a search run id (see `covidsearch runs`)")
        return given
    experiment_id = _experiment(found, found.tracking_uri, experiment or DEFAULT_EXPERIMENT, create=False)
    return latest_search(found, experiment_id)


def running_chiefs(found: MlflowClient, experiment_id: str) -> list[mlflow.entities.Run]:
    """RUNNING search runs whose chief serves an oracle (a distributed search workers may join)."""
    runs = found.search_runs([experiment_id], f"tags.{KIND} = '{SEARCH}' and attributes.status = 'RUNNING'",
                             max_results=1000)
    return [r for r in runs if r.data.tags.get(ORACLE, "none") != "none"]


def end_search(found: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """The search run ends; no trial of it stays RUNNING."""
    close_orphans(found, run_id, "FAILED" if status == "FAILED" else "KILLED")
    end_run(found, run_id, status, error)


def record_best(found: MlflowClient, search_run_id: str, objective: str) -> None:
    """The search run's best trial id and score, from all its trials: when it ends or resumes (note_best keeps them
    current in between)."""
    rows = [r for r in leaderboard(found, search_run_id) if r["status"] == "FINISHED" and r["objective"] is not None]
    if rows:
        found.set_tag(search_run_id, BEST_TRIAL, rows[0]["run_id"])
        found.log_metric(search_run_id, f"{BEST}{objective}", rows[0]["objective"])


def new_best(found: MlflowClient, search_run_id: str, objective: str, score: float | None) -> bool:
    """Whether a trial's score (its best_ objective; NaN, an objective its validation could not define, never)
    beats the search run's best so far: one read whatever the number of trials, where record_best reads every trial,
    which a long search would pay for each."""
    if score is None or not math.isfinite(score):
        return False
    search = get_run(found, search_run_id).data
    best = search.metrics.get(f"{BEST}{objective}")
    sign = 1 if minimised(search.params) else -1
    return best is None or sign * score < sign * best


def note_best(found: MlflowClient, search_run_id: str, objective: str, trial_run_id: str, score: float) -> None:
    """Name a finished trial the search run's best, with its score, if it beats the best so far (asked again here:
    another worker's trial may have beaten it meanwhile): what the UI shows of a running search stays current."""
    if new_best(found, search_run_id, objective, score):
        log_note(found, search_run_id, Note({f"{BEST}{objective}": score}, tags={BEST_TRIAL: trial_run_id}))


# ---------------------------------------------------------------- trials


def start_trial(found: MlflowClient, search_run_id: str, trial_id: str, worker_id: str, baseline: bool,
                config: dict[str, Any], warm_start: str | None = None) -> str:
    """A trial's RUNNING child run with its hyperparameters and settings, before its worker trains it."""
    parent = get_run(found, search_run_id)
    tags = {KIND: TRIAL, TRIAL_ID: trial_id, WORKER_ID: worker_id, BASELINE: str(baseline).lower()}
    if warm_start is not None:
        tags[WARM_START] = warm_start
    run_id = create_run(found, parent.info.experiment_id, f"trial-{trial_id}", tags, parent_id=search_run_id)
    found.log_batch(run_id, params=params(config))
    return run_id


def start_ensemble(found: MlflowClient, search_run_id: str, members: list[str], settings: dict[str, Any]) -> str:
    """An ensemble's RUNNING child run of the search, with its member trials and settings."""
    parent = get_run(found, search_run_id)
    run_id = create_run(found, parent.info.experiment_id, f"ensemble-top{len(members)}",
                        {KIND: ENSEMBLE, MEMBERS: ",".join(members)}, parent_id=search_run_id)
    found.log_batch(run_id, params=params(settings))
    return run_id


def finish_trial(found: MlflowClient, run_id: str) -> None:
    """FINISHED, once the search has the trial's result: a trial never reads FINISHED to a search that lost it."""
    found.set_terminated(run_id, "FINISHED")


def record_worker(found: MlflowClient, run_id: str, reply: Any) -> None:
    """Which worker process trained the trial (a workers.Reply) and which of its trials it was, its memory after it
    and its peak, the start-up the trial waited for, and why the worker was replaced after it: recycling, visible
    trial by trial."""
    tags = {WORKER_PID: str(reply.pid), WORKER_TRIAL: str(reply.nth),
            **({WORKER_RECYCLED: reply.recycled} if reply.recycled else {})}
    log_note(found, run_id, Note({WORKER_RSS: reply.rss_mb, WORKER_PEAK: reply.peak_mb,
                                  f"{SETUP}{PART_WORKER_START}": reply.waited}, tags=tags))


def fail_trial(found: MlflowClient, run_id: str, error: str, detail: str | None = None) -> None:
    """FAILED with the error (and `detail`, its traceback, as the run's note), unless it has ended already."""
    if found.get_run(run_id).info.status == "RUNNING":
        end_run(found, run_id, "FAILED", error, detail)


def trial_result(found: MlflowClient, search_run_id: str, trial_id: str) -> dict[str, float] | None:
    """The best validation metrics of this trial's FINISHED run, if one was already recorded (a search
    interrupted between the record and Keras Tuner's own state): so no trial runs twice."""
    runs = _search(found, search_run_id, f"{_children(search_run_id, None)} and attributes.status = 'FINISHED' "
                                         f"and tags.{TRIAL_ID} = '{trial_id}'")
    if not runs:
        return None
    return {k[len(BEST):]: v for k, v in runs[0].data.metrics.items() if k.startswith(BEST)}


@contextlib.contextmanager
def heartbeat(found: MlflowClient, run_id: str) -> Iterator[None]:
    """While the block runs, the trial run's HEARTBEAT tag says every HEARTBEAT_SECONDS that its process lives:
    a second worker claiming the same id can then tell a live trial from one a killed worker left RUNNING."""
    done = threading.Event()

    def beat() -> None:
        with contextlib.suppress(MlflowException, OSError):  # a missed beat only makes the trial look older
            found.set_tag(run_id, HEARTBEAT, f"{time.time():.0f}")

    def beating() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            beat()

    beat()
    thread = threading.Thread(target=beating, daemon=True, name=f"heartbeat-{run_id[:8]}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def live_trials(found: MlflowClient, search_run_id: str, worker_id: str) -> list[str]:
    """RUNNING trial runs of this worker id whose process still beats: a recent heartbeat that beats again within
    one period is a live worker's; one that does not was left by a worker that was killed (a restart)."""
    def beats() -> dict[str, str]:
        runs = _search(found, search_run_id, _children(search_run_id, worker_id) + " and attributes.status = 'RUNNING'")
        return {r.info.run_id: r.data.tags.get(HEARTBEAT, "0") for r in runs}

    before = {k: v for k, v in beats().items() if float(v) >= time.time() - 3 * HEARTBEAT_SECONDS}
    if not before:
        return []
    time.sleep(HEARTBEAT_SECONDS + 2)
    after = beats()
    return [run_id for run_id, beat in before.items() if after.get(run_id, beat) != beat]


def wait_for_trials(found: MlflowClient, parent_id: str, seconds: float = 120) -> None:
    """Wait up to `seconds` while trial runs of the search are RUNNING: a distributed search's workers log each
    trial's model and figures after its result reached the chief (recorder.py)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _search(found, parent_id, f"{_children(parent_id, None)} and "
                                                                    "attributes.status = 'RUNNING'"):
        time.sleep(1)


def close_orphans(found: MlflowClient, parent_id: str, status: str = "KILLED",
                  worker_id: str | None = None) -> list[str]:
    """Runs of this search (or of one worker) left RUNNING by a killed process: end them so none stays RUNNING."""
    runs = _search(found, parent_id, _children(parent_id, worker_id) + " and attributes.status = 'RUNNING'")
    for run in runs:
        end_run(found, run.info.run_id, status, "the process running this trial ended before it finished")
    return [r.info.run_id for r in runs]


def trial_runs(found: MlflowClient, parent_id: str, worker_id: str | None = None) -> list[mlflow.entities.Run]:
    """Every child run of a search, or those one worker of a distributed search ran."""
    return _search(found, parent_id, _children(parent_id, worker_id))


def _search(found: MlflowClient, parent_id: str, filter_string: str) -> list[mlflow.entities.Run]:
    """Runs of the parent's experiment that match the filter."""
    return found.search_runs([get_run(found, parent_id).info.experiment_id], filter_string, max_results=10000)


def _children(parent_id: str, worker_id: str | None) -> str:
    worker = f" and tags.{WORKER_ID} = '{worker_id}'" if worker_id else ""
    return f"tags.{PARENT} = '{parent_id}'{worker}"


def trial_model(found: MlflowClient, parent_id: str, trial_id: str, wait: float = 120) -> str | None:
    """The URI of a search's FINISHED trial's .keras checkpoint, wherever it ran (a Hyperband round continues from
    it). A run still RUNNING is waited for up to `wait` seconds: its search logs the checkpoint after the trial's
    result."""
    deadline = time.monotonic() + wait
    while True:
        runs = _search(found, parent_id, f"{_children(parent_id, None)} and tags.{TRIAL_ID} = '{trial_id}'")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            return keras_uri(found, finished[0])
        if all(r.info.status != "RUNNING" for r in runs) or time.monotonic() > deadline:
            return None
        time.sleep(1)


def logged_model(found: MlflowClient, run: mlflow.entities.Run) -> str | None:
    """The READY logged model a trial saved, if any (a failed trial usually has none)."""
    models = found.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run.info.run_id}' AND name = '{MODEL}'"))
    ready = [m for m in models if m.status == "READY"]
    return ready[0].model_id if ready else None


def checkpoint_uri(found: MlflowClient, run: mlflow.entities.Run) -> str | None:
    """The trial's checkpoint among its logged trial data (runs:/...), if it has any."""
    if any(Path(a.path).name == KERAS_FILE for a in found.list_artifacts(run.info.run_id, TRIAL_DATA)):
        return f"runs:/{run.info.run_id}/{TRIAL_DATA}/{KERAS_FILE}"
    return None


def keras_uri(found: MlflowClient, run: mlflow.entities.Run) -> str | None:
    """Where a finished trial's Keras model can be loaded from (load_keras): its checkpoint in its trial data, or its
    logged model (which holds the checkpoint of a trial whose model was made at once, or recorded before trials had
    logged data)."""
    checkpoint = checkpoint_uri(found, run)
    if checkpoint:
        return checkpoint
    model_id = logged_model(found, run)
    return f"models:/{model_id}" if model_id else None


def load_keras(uri: str) -> Any:
    """The Keras model of a trial's checkpoint (runs:/.../model.keras) or of a logged or registered model
    (models:/...) without the pyfunc around it: only its .keras file is downloaded. A model logged with the keras
    flavour (before serving.Classifier) loads as such."""
    import keras
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    with tempfile.TemporaryDirectory() as tmp:
        if uri.startswith("runs:/"):
            return keras.saving.load_model(mlflow.artifacts.download_artifacts(uri, dst_path=tmp), compile=False)
        if "keras" in mlflow.models.get_model_info(uri).flavors:
            return mlflow.keras.load_model(uri)
        return keras.saving.load_model(ModelsArtifactRepository(uri).download_artifacts(KERAS_PATH, dst_path=tmp),
                                       compile=False)


def leaderboard(found: MlflowClient, search_run_id: str) -> list[dict[str, Any]]:
    """Trials of a search, best objective first, with what a user compares."""
    parent = get_run(found, search_run_id)
    objective = parent.data.params.get("objective", "val_loss")
    rows = []
    for run in trial_runs(found, search_run_id):
        m = run.data.metrics
        rows.append({
            "run_id": run.info.run_id,
            "trial": run.data.tags.get(TRIAL_ID, run.data.tags.get(KIND, "")),  # an ensemble has no trial id
            "status": run.info.status,
            "baseline": run.data.tags.get(BASELINE) == "true",
            "params": dict(run.data.params),
            "objective": m.get(f"{BEST}{objective}"),
            "test_accuracy": m.get(f"{TEST}accuracy"),
            "test_sensitivity_covid_19": m.get(f"{TEST}sensitivity_covid_19"),
            "test_accuracy_ci": interval(m, f"{TEST}accuracy"),
            "test_sensitivity_covid_19_ci": interval(m, f"{TEST}sensitivity_covid_19"),
            "test_images": m[f"{TEST}tp"] + m[f"{TEST}fn"] if f"{TEST}tp" in m and f"{TEST}fn" in m else None,
            "epochs": m.get(EPOCHS_TRAINED),
        })
    sign = 1 if minimised(parent.data.params) else -1
    rows.sort(key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0.0)))
    return rows


def minimised(params: dict[str, str]) -> bool:
    """Whether a search's objective is better lower, from its run's params (lower when not recorded: val_loss's)."""
    return params.get(OBJECTIVE_DIRECTION, "min") == "min"


def interval(values: dict[str, float], name: str) -> tuple[float, float] | None:
    """A metric's recorded 95% interval; None for a trial recorded before intervals, or a metric never defined."""
    low, high = values.get(f"{name}{CI_LOW}"), values.get(f"{name}{CI_HIGH}")
    return None if low is None or high is None else (low, high)


def baseline_lead(rows: list[dict[str, Any]]) -> str | None:
    """Whether the best trial's test accuracy lies inside the baseline's 95% interval: on tens of test images a lead
    of one or two images is noise, not a better model. None without a finished baseline with an interval."""
    finished = [r for r in rows if r["status"] == "FINISHED" and r["objective"] is not None]
    baseline = next((r for r in finished if r["baseline"]), None)
    if baseline is None or None in (baseline["test_accuracy"], baseline["test_accuracy_ci"],
                                    finished[0]["test_accuracy"]):
        return None
    best, base, (low, high) = finished[0]["test_accuracy"], baseline["test_accuracy"], baseline["test_accuracy_ci"]
    span = f"95% interval {text.span(baseline['test_accuracy_ci'])}"
    images = f" ({baseline['test_images']:.0f} test images)" if baseline["test_images"] else ""
    if finished[0] is baseline:
        return f"the best trial is the baseline: test accuracy {base:.3f}, {span}{images}"
    if low <= best <= high:
        verdict = f"inside the baseline's {span}, so the difference may be noise"
    elif best > high:
        verdict = f"above the baseline's {span}, so the lead is more than noise"
    else:
        verdict = f"below the baseline's {span}, so the baseline does better on the test images"
    return f"the best trial's test accuracy {best:.3f} vs the baseline's {base:.3f}: {verdict}{images}"


class TrialRecord:
    """What a trial writes to its run while it trains, its epochs and its operating point, handed to `write`: a
    worker sends it to the search process, which has the store open already (opening it costs a process half a
    second of imports, which a search's first trial would wait for). The run stays RUNNING (the search ends it once it
    has the result, and with a failed trial's traceback). It also keeps the clock of the trial's fixed cost: its own
    calls time themselves, `lap` charges the time between to a part."""

    def __init__(self, write: Callable[[Note], None]):
        self.parts: dict[str, float] = {}  # seconds by part of the trial (SETUP names)
        self.notes: list[Note] = []  # those handed on, kept in the trial's pending record
        self._write = write
        self._lapped, self._charged = time.perf_counter(), 0.0  # the last lap; seconds since charged by calls

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Charge the block's seconds to `part`, and not to the lap it runs in."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.parts[part] = self.parts.get(part, 0.0) + seconds
            self._charged += seconds

    def lap(self, part: str) -> None:
        """Charge the seconds since the last lap to `part`, less those this record's own calls charged to theirs."""
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self._lapped - self._charged
        self._lapped, self._charged = now, 0.0

    def setup_seconds(self, epoch_seconds: float) -> dict[str, float]:
        """The parts as SETUP metrics; the fit's less its epochs, which are training, not setup."""
        parts = {**self.parts, PART_FIT: self.parts.get(PART_FIT, 0.0) - epoch_seconds}
        return {f"{SETUP}{part}": seconds for part, seconds in parts.items()}

    def write(self, note: Note) -> None:
        """Hand a note on, its seconds charged to the trial's `mlflow` part."""
        with self._timed(PART_MLFLOW):
            self._write(note)
        self.notes.append(note)


def log_keras(found: MlflowClient, run_id: str, model: Any, served: Any, requirements: list[str],
              name: str = MODEL) -> str:
    """A Keras model in memory saved as a trial saves it (models.save, imported here so that commands that only read
    the store do not load Keras) and logged as log_model logs its file; returns its models:/ URI."""
    from .models import save

    with tempfile.TemporaryDirectory() as tmp:
        keras_file = Path(tmp) / KERAS_FILE
        save(model, keras_file)
        return log_model(found, run_id, keras_file, served, requirements, name)


def log_model(found: MlflowClient, run_id: str, keras_file: Path, served: Any, requirements: list[str],
              name: str = MODEL) -> str:
    """A .keras file as an MLflow 3 logged model of the run: `served` (a serving.Classifier, the pyfunc any MLflow
    client can send image files) with the file inside for load_keras, and the package code it runs; returns its
    models:/ URI."""
    from mlflow.models import Model

    # MLflow files a logged model under the process's current experiment, whatever run it names
    mlflow.set_tracking_uri(found.tracking_uri)
    mlflow.set_experiment(experiment_id=found.get_run(run_id).info.experiment_id)
    with _quiet_model_saving():
        return Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, python_model=served, run_id=run_id,
                         artifacts={KERAS_ARTIFACT: str(keras_file)}, code_paths=[str(Path(__file__).parent)],
                         signature=served.signature(), metadata=served.metadata,
                         pip_requirements=requirements).model_uri


@contextlib.contextmanager
def _quiet_model_saving() -> Iterator[None]:
    """MLflow's advice against pickling our own class and its note that no input example was given (checking one
    costs a model load): said of every trial's model, they are noise."""
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*An input example was not provided")
        yield


# ---------------------------------------------------------------- evaluations and reports


def log_evaluation(found: MlflowClient, experiment_id: str, name: str, tags: dict[str, str], values: dict[str, float],
                   table: dict[str, list], dataset: Any, model_id: str | None) -> str:
    """An evaluation run whose metrics MLflow 3 also links to the model's LoggedModel (and the dataset)."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

    run_id = create_run(found, experiment_id, name, {KIND: EVALUATION, **tags})
    found.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")])],
                     models=[LoggedModelInput(model_id)] if model_id else None)
    found.log_batch(run_id, metrics=metrics({f"eval_{k}": v for k, v in values.items()}, model_id=model_id,
                                            dataset_name=dataset.name, dataset_digest=dataset.digest))
    log_confusion(found, run_id, table)
    found.set_terminated(run_id, "FINISHED")
    return run_id


def log_confusion(found: MlflowClient, run_id: str, table: dict[str, list]) -> None:
    """The confusion table (metrics.confusion_table) as MLflow's log_table writes it, pandas' split layout listed
    as the run's one table, without what log_table does first to append to a table already there (it lists the run's
    artifacts and reads the run back): that was a third of the search's CPU for logging a trial's record."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFUSION
        path.write_text(json.dumps({"columns": list(table), "data": [list(row) for row in zip(*table.values())]},
                                   separators=(",", ":")))
        found.log_artifact(run_id, str(path))
    found.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([{"path": CONFUSION, "type": "table"}]))


def log_report(found: MlflowClient, run_id: str, page: str) -> None:
    """The HTML report as the search run's REPORT artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(REPORT).name
        copy.write_text(page, encoding="utf-8")
        found.log_artifact(run_id, str(copy), str(Path(REPORT).parent))


def artifacts(found: MlflowClient, run_id: str, folder: str, names: Any) -> dict[str, bytes]:
    """The named files of a run's artifact folder that exist (older runs may lack some), as bytes."""
    present = {Path(a.path).name for a in found.list_artifacts(run_id, folder)}
    with tempfile.TemporaryDirectory() as tmp:
        return {name: Path(found.download_artifacts(run_id, f"{folder}/{name}", tmp)).read_bytes()
                for name in names if name in present}


def split_manifest(found: MlflowClient, search_run_id: str) -> list[dict[str, str]]:
    """The search's split manifest rows (file, class, split, sha256); empty when it was not recorded."""
    manifest = artifacts(found, search_run_id, SEARCH_RECORDS, [MANIFEST]).get(MANIFEST, b"").decode()
    return list(csv.DictReader(io.StringIO(manifest)))


def training_hashes(found: MlflowClient, trial_run_id: str) -> set[str]:
    """SHA-256 of the images a trial trained and validated on, from its search's split manifest (empty if unknown)."""
    parent = get_run(found, trial_run_id).data.tags.get(PARENT)
    if not parent:
        return set()
    return {row["sha256"] for row in split_manifest(found, parent) if row["split"] in ("train", "val")}


def search_records(found: MlflowClient, run_id: str) -> dict[str, Any]:
    """The search run's data summary and leakage report (empty when not recorded)."""
    files = artifacts(found, run_id, SEARCH_RECORDS, (DATASET, LEAKAGE, SKIPPED))
    return {"summary": json.loads(files.get(DATASET, b"{}")), "leakage": json.loads(files.get(LEAKAGE, b"{}")),
            "skipped": files.get(SKIPPED, b"").decode()}
