"""MLflow store and runs: one parent run per search, one nested child run per trial.

The default store is SQLite at mlruns/mlflow.db with artifacts under mlruns/ (MLflow 3
refuses the old file store); --tracking-uri or MLFLOW_TRACKING_URI point elsewhere.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import UserError

DEFAULT_EXPERIMENT = "covidsearch"
STORE_DIR = Path("mlruns")


class StoreError(UserError, RuntimeError):
    """The tracking store cannot be used; shown as a one-line error."""


def store_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else SQLite under ./mlruns."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(STORE_DIR / 'mlflow.db').resolve()}"


def _is_default_local(uri: str) -> bool:
    return uri == f"sqlite:///{(STORE_DIR / 'mlflow.db').resolve()}"


def connect(tracking_uri: str | None = None, experiment: str | None = None,
            create: bool = True) -> tuple[MlflowClient, str]:
    """Point MLflow at the store and return a client and the experiment id."""
    uri = store_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        # A tracking server's client prints two links per ended run on stdout, amid covidsearch's own output;
        # set here, before any trial process starts, so those inherit it.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        return _experiment(MlflowClient(uri), uri, experiment or DEFAULT_EXPERIMENT, create)
    db = Path(uri[len("sqlite:///"):])
    if not create and not db.exists():
        raise StoreError(f"no tracking store at {db} yet: start a search with `covidsearch run`")
    _check_writable_sqlite(db)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process creates the tables and the experiment; others wait
        return _experiment(MlflowClient(uri), uri, experiment or DEFAULT_EXPERIMENT, create)


def _experiment(client: MlflowClient, uri: str, name: str, create: bool) -> tuple[MlflowClient, str]:
    """The experiment's id, created with artifacts under mlruns/ when the store is the default one."""
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return client, found.experiment_id
        if not create:
            raise StoreError(f"no experiment {name!r} in {uri}")
        location = (STORE_DIR / "artifacts").resolve().as_uri() if _is_default_local(uri) else None
        return client, client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        raise StoreError(f"cannot use tracking store {uri}: {str(err).splitlines()[0]}") from None


def _check_writable_sqlite(db: Path) -> None:
    """Fail early and clearly when the SQLite store cannot be created or written."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS covidsearch_probe (x INTEGER)")
            conn.execute("DROP TABLE covidsearch_probe")
    except (OSError, sqlite3.Error) as err:
        raise StoreError(f"cannot write tracking store {db}: {err}") from None


def create_run(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str],
               parent_id: str | None = None) -> str:
    """A new RUNNING run; a trial run is nested under its search run."""
    tags = {"mlflow.runName": name, **tags}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def end_run(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """Terminate a run, recording the error text on failure."""
    if error:
        client.set_tag(run_id, "error", error[-4900:])
        client.set_tag(run_id, "mlflow.note.content", f"```\n{error[-20000:]}\n```")
    client.set_terminated(run_id, status=status)


def close_orphans(client: MlflowClient, experiment_id: str, parent_id: str, status: str = "KILLED",
                  worker_id: str | None = None) -> list[str]:
    """Runs of this search (or of one worker) left RUNNING by a killed process: end them so none stays RUNNING."""
    runs = client.search_runs([experiment_id], _children(parent_id, worker_id) + " and attributes.status = 'RUNNING'",
                              max_results=1000)
    for run in runs:
        end_run(client, run.info.run_id, status, "the process running this trial ended before it finished")
    return [r.info.run_id for r in runs]


def trial_runs(client: MlflowClient, experiment_id: str, parent_id: str,
               worker_id: str | None = None) -> list[mlflow.entities.Run]:
    """Every child run of a search, or those one worker of a distributed search ran."""
    return client.search_runs([experiment_id], _children(parent_id, worker_id), max_results=10000)


def _children(parent_id: str, worker_id: str | None) -> str:
    worker = f" and tags.covidsearch_worker_id = '{worker_id}'" if worker_id else ""
    return f"tags.mlflow.parentRunId = '{parent_id}'{worker}"


def trial_model(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str) -> str | None:
    """The logged model of a search's FINISHED trial, wherever it ran (a Hyperband round continues from it)."""
    runs = client.search_runs([experiment_id], f"{_children(parent_id, None)} and attributes.status = 'FINISHED' "
                                               f"and tags.covidsearch_trial_id = '{trial_id}'", max_results=1)
    if not runs:
        return None
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{runs[0].info.run_id}'",
                                         max_results=1)
    return models[0].model_id if models else None


def latest_search(client: MlflowClient, experiment_id: str) -> str:
    """The most recent search run of the experiment."""
    runs = client.search_runs([experiment_id], "tags.covidsearch_kind = 'search'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise StoreError("no search in this store yet: start one with `covidsearch run`")
    return runs[0].info.run_id


def get_run(client: MlflowClient, run_id: str) -> mlflow.entities.Run:
    """A run by id, or a one-line error naming it."""
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise StoreError(f"unknown run id {run_id!r} in {mlflow.get_tracking_uri()}") from None


def leaderboard(client: MlflowClient, experiment_id: str, search_id: str) -> list[dict[str, Any]]:
    """Trials of a search, best objective first, with what a user compares."""
    parent = get_run(client, search_id)
    objective = parent.data.params.get("objective", "val_loss")
    direction = parent.data.params.get("objective_direction", "min")
    rows = []
    for run in trial_runs(client, experiment_id, search_id):
        m, p = run.data.metrics, run.data.params
        rows.append({
            "run_id": run.info.run_id,
            "trial": run.data.tags.get("covidsearch_trial_id", ""),
            "status": run.info.status,
            "baseline": run.data.tags.get("baseline") == "true",
            "params": {k: v for k, v in p.items()},
            "objective": m.get(f"best_{objective}"),
            "test_accuracy": m.get("test_accuracy"),
            "test_sensitivity_covid_19": m.get("test_sensitivity_covid_19"),
            "epochs": m.get("epochs_trained"),
        })
    sign = 1 if direction == "min" else -1
    rows.sort(key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0.0)))
    return rows

