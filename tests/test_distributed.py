"""Scale out: `covidsearch server` for the team, a chief (`run --oracle`) and workers that join it,
each in its own directory as on separate machines, checked the way a user would: in MLflow."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli
from covidsearch import demo, spaces, tracking, trial

SMALL = ["--tuner", "random", "--max-epochs", "1", "--test-per-class", "8", "--set", "input_size=32", "--quiet"]
POSTGRES_ENV = "COVIDSEARCH_TEST_POSTGRES_URI"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_store(backend: str, tmp: Path) -> str:
    """SQLite in a temporary directory, or the PostgreSQL database CI provides (.ci/run)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp / 'mlflow.db'}"
    uri = os.environ.get(POSTGRES_ENV)
    if not uri and os.environ.get("CI") == "true":
        pytest.fail(f"CI runs the PostgreSQL variant: {POSTGRES_ENV} is not set (see .ci/run)")
    if not uri:
        pytest.skip(f"PostgreSQL variant: set {POSTGRES_ENV}=postgresql://USER:PASSWORD@HOST:PORT/DB")
    return uri


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_what_is_left() -> Iterator[None]:
    """A failed test leaves no chief waiting for workers (or server) behind."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(log: Path, *args: str, cwd: Path) -> subprocess.Popen:
    """A covidsearch command in its own directory and process group; its output goes to log.out/log.err."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "covidsearch.cli", *args], cwd=cwd, text=True,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"),
                            start_new_session=True)
    _STARTED.append(proc)
    return proc


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    """Wait for a command to succeed and return what it printed on stdout."""
    proc.wait(timeout)
    assert proc.returncode == 0, log.with_suffix(".err").read_text()[-3000:]
    return log.with_suffix(".out").read_text()


def _chief_and_worker_mid_trial(client: MlflowClient, experiment: str, args: list[str], tmp_path: Path,
                                worker_log: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A chief, and worker-a once the search run exists; returns when worker-a is training a trial."""
    chief = _start(tmp_path / "chief", "run", *args, cwd=tmp_path / "chief")
    _wait_for(lambda: _runs(client, experiment, "tags.covidsearch_kind = 'search' and attributes.status = 'RUNNING'"),
              chief, tmp_path / "chief")
    worker = _start(worker_log, "worker", *args, "--worker-id", "worker-a", cwd=tmp_path / "worker-a")
    _wait_for(lambda: _runs(client, experiment, "tags.covidsearch_kind = 'trial' and attributes.status = 'RUNNING'"),
              worker, worker_log)
    return chief, worker


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until predicate() holds; fails at once if the process it waits on has exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, log.with_suffix(".err").read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting on {log.name}"
        time.sleep(1)


# A whole chief-and-two-workers search (three minutes here): a slow scenario on both backends, which CI runs.
@pytest.fixture(scope="module", params=[pytest.param("sqlite", marks=pytest.mark.slow),
                                        pytest.param("postgresql", marks=pytest.mark.slow)])
def tracking_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`covidsearch server` on a free port of 127.0.0.1, on each database backend; yields the URI it prints."""
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    store = _backend_store(request.param, tmp)
    log = tmp / "server"
    proc = _start(log, "server", "--backend-store-uri", store, "--artifacts-destination", str(tmp / "artifacts"),
                  "--port", str(_free_port()), "--workers", "1", cwd=tmp)
    try:
        _wait_for(lambda: "--tracking-uri" in log.with_suffix(".out").read_text(), proc, log)
        uri = log.with_suffix(".out").read_text().split("--tracking-uri ")[1].split()[0]
        with urllib.request.urlopen(f"{uri}/health") as answer:
            assert answer.read() == b"OK"
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)


def _experiment(client: MlflowClient, name: str) -> str | None:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else None


def _runs(client: MlflowClient, experiment: str, where: str) -> list:
    """Runs of the experiment matching `where`; none while the chief is still creating it."""
    experiment_id = _experiment(client, experiment)
    return client.search_runs([experiment_id], where) if experiment_id else []


@pytest.fixture(scope="module")
def distributed_search(tracking_server: str, xray_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-trial search: one chief, then two workers join it; a worker on other images is turned away."""
    tmp = tmp_path_factory.mktemp("distributed")
    client, experiment = MlflowClient(tracking_server), f"dist-{uuid.uuid4().hex[:8]}"
    oracle = f"127.0.0.1:{_free_port()}"
    args = [*SMALL, "--max-trials", "4", "--tracking-uri", tracking_server, "--experiment", experiment]
    chief = _start(tmp / "chief", "run", "--data", str(xray_dir), *args, "--oracle", oracle, cwd=tmp / "chief")
    _wait_for(lambda: _runs(client, experiment, "tags.covidsearch_kind = 'search' and attributes.status = 'RUNNING'"),
              chief, tmp / "chief")

    other_images = demo.make_dataset(tmp / "other-xrays", per_class=40, size=48, seed=2)
    refused = cli("worker", "--data", str(other_images), *args, "--oracle", oracle, cwd=tmp)

    workers = {name: _start(tmp / name, "worker", "--data", str(xray_dir), *args, "--oracle", oracle,
                            "--worker-id", name, cwd=tmp / name) for name in ("worker-a", "worker-b")}
    said = {name: _finish(proc, tmp / name) for name, proc in workers.items()}
    leaderboard = _finish(chief, tmp / "chief")
    late = cli("worker", "--data", str(xray_dir), *args, "--oracle", oracle, cwd=tmp)
    (search,) = _runs(client, experiment, "tags.covidsearch_kind = 'search'")
    return {"client": client, "experiment_id": _experiment(client, experiment), "search": search,
            "trials": tracking.trial_runs(client, search.info.run_id),
            "leaderboard": leaderboard, "workers": said, "refused": refused, "late": late, "uri": tracking_server}


def test_every_trial_is_one_finished_child_of_the_one_search(distributed_search):
    search, trials = distributed_search["search"], distributed_search["trials"]
    assert search.info.status == "FINISHED"
    assert sorted(t.data.tags["covidsearch_trial_id"] for t in trials) == ["0", "1", "2", "3"]
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert search.data.params["max_trials"] == "4" and search.data.tags["data_fingerprint"]
    assert search.data.tags["best_trial_run_id"] in {t.info.run_id for t in trials}
    for run in trials:
        assert run.info.run_id in distributed_search["leaderboard"]  # the chief prints the leaderboard
        assert "test_accuracy" in run.data.metrics
        assert tracking.keras_uri(distributed_search["client"], run)  # its checkpoint, from whichever worker ran it
    best = search.data.tags["best_trial_run_id"]  # its MLflow model made as it was recorded
    assert distributed_search["client"].search_logged_models([distributed_search["experiment_id"]],
                                                             filter_string=f"source_run_id = '{best}'")


def test_both_workers_ran_trials_and_say_how_many(distributed_search):
    by_worker = [t.data.tags["covidsearch_worker_id"] for t in distributed_search["trials"]]
    assert set(by_worker) == {"worker-a", "worker-b"}
    for name, stdout in distributed_search["workers"].items():
        assert f"worker {name} finished {by_worker.count(name)} trial(s)" in stdout


def test_no_run_is_left_running(distributed_search):
    client = distributed_search["client"]
    assert not client.search_runs([distributed_search["experiment_id"]], "attributes.status = 'RUNNING'")


def test_a_worker_on_other_images_or_after_the_end_is_turned_away_in_one_line(distributed_search):
    refused, late = distributed_search["refused"], distributed_search["late"]
    assert refused.returncode == 2 and late.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("covidsearch: error: this worker's data (fingerprint")
    assert "point --data at the same images" in refused.stderr
    assert late.stderr.strip().splitlines()[-1].startswith("covidsearch: error: no distributed search is running")


def test_a_trial_can_start_from_the_weights_of_a_model_in_mlflow(distributed_search, tmp_path):
    client, search = distributed_search["client"], distributed_search["search"]
    checkpoint = tracking.trial_model(client, search.info.run_id, "0")
    assert checkpoint is not None
    space = spaces.load("vanilla").pin(["input_size=32"])
    spec = trial.Spec("9", "not-a-run", space.config(space.defaults()), epochs=3, initial_epoch=1,
                      trial_dir=str(tmp_path), warm_start=checkpoint)  # trial 0 is the baseline
    mlflow.set_tracking_uri(distributed_search["uri"])
    continued = trial._build(spec, 3).get_weights()
    logged = tracking.load_keras(checkpoint).get_weights()
    assert len(continued) == len(logged)
    for mine, theirs in zip(continued, logged):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("tracking_server", ["sqlite"], indirect=True)
def test_a_killed_worker_restarted_with_its_id_resumes_its_trial(tracking_server, xray_dir, tmp_path):
    client, experiment = MlflowClient(tracking_server), f"kill-{uuid.uuid4().hex[:8]}"
    oracle = f"127.0.0.1:{_free_port()}"
    args = ["--data", str(xray_dir), *SMALL, "--max-trials", "2", "--tracking-uri", tracking_server,
            "--experiment", experiment, "--oracle", oracle]
    chief, worker = _chief_and_worker_mid_trial(client, experiment, args, tmp_path, tmp_path / "first")
    os.killpg(worker.pid, signal.SIGKILL)  # the machine is preempted mid-trial
    worker.wait()

    again = _start(tmp_path / "again", "worker", *args, "--worker-id", "worker-a", cwd=tmp_path / "worker-a")
    _finish(again, tmp_path / "again")
    _finish(chief, tmp_path / "chief")
    assert "was in flight when worker worker-a stopped: marked KILLED, it runs again" in (
        tmp_path / "again.err").read_text()
    trials = _runs(client, experiment, "tags.covidsearch_kind = 'trial'")
    finished = [t.data.tags["covidsearch_trial_id"] for t in trials if t.info.status == "FINISHED"]
    killed = [t.data.tags["covidsearch_trial_id"] for t in trials if t.info.status == "KILLED"]
    assert sorted(finished) == ["0", "1"] and len(killed) == 1 and killed[0] in finished
    assert "RUNNING" not in {t.info.status for t in trials}
    assert [s.info.status for s in _runs(client, experiment, "tags.covidsearch_kind = 'search'")] == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.parametrize("tracking_server", ["sqlite"], indirect=True)
def test_a_restarted_chief_resumes_the_search_and_its_workers_carry_on(tracking_server, xray_dir, tmp_path):
    client, experiment = MlflowClient(tracking_server), f"restart-{uuid.uuid4().hex[:8]}"
    args = ["--data", str(xray_dir), *SMALL, "--max-trials", "3", "--tracking-uri", tracking_server,
            "--experiment", experiment, "--oracle", f"127.0.0.1:{_free_port()}"]
    chief, worker = _chief_and_worker_mid_trial(client, experiment, args, tmp_path, tmp_path / "worker")
    os.killpg(chief.pid, signal.SIGKILL)  # the chief's machine goes down while the worker trains
    chief.wait()

    again = _start(tmp_path / "again", "run", *args, cwd=tmp_path / "chief")
    _finish(worker, tmp_path / "worker")
    _finish(again, tmp_path / "again")
    assert "resuming search" in (tmp_path / "again.err").read_text()
    trials = _runs(client, experiment, "tags.covidsearch_kind = 'trial'")
    assert sorted(t.data.tags["covidsearch_trial_id"] for t in trials) == ["0", "1", "2"]  # none run twice
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert [s.info.status for s in _runs(client, experiment, "tags.covidsearch_kind = 'search'")] == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.parametrize("tracking_server", ["sqlite"], indirect=True)
def test_a_hyperband_round_continues_from_the_previous_round_on_whichever_worker_gets_it(tracking_server, xray_dir,
                                                                                        tmp_path):
    client, experiment = MlflowClient(tracking_server), f"hyperband-{uuid.uuid4().hex[:8]}"
    # With --max-epochs 3 Hyperband runs three 1-epoch trials, then continues the best of them for 3 epochs. A worker
    # that asks while that round is unfinished gets a trial of the next bracket (two 3-epoch trials) instead, so the
    # continuation can come as late as the sixth trial, once both brackets are handed out: 6 makes it certain
    # (with no baseline, which would be a seventh, outside the brackets).
    args = ["--data", str(xray_dir), *SMALL, "--tuner", "hyperband", "--max-trials", "6", "--max-epochs", "3",
            "--no-baseline",
            "--tracking-uri", tracking_server, "--experiment", experiment, "--oracle", f"127.0.0.1:{_free_port()}"]
    chief = _start(tmp_path / "chief", "run", *args, cwd=tmp_path / "chief")
    _wait_for(lambda: _runs(client, experiment, "tags.covidsearch_kind = 'search' and attributes.status = 'RUNNING'"),
              chief, tmp_path / "chief")
    workers = {name: _start(tmp_path / name, "worker", *args, "--worker-id", name, cwd=tmp_path / name)
               for name in ("worker-a", "worker-b")}
    for name, proc in workers.items():
        _finish(proc, tmp_path / name)
    _finish(chief, tmp_path / "chief")

    trials = _runs(client, experiment, "tags.covidsearch_kind = 'trial'")
    assert {t.info.status for t in trials} == {"FINISHED"}
    continued = [t for t in trials if "warm_start" in t.data.tags]
    assert continued, "no second Hyperband round in 6 trials"
    for run in continued:
        (previous,) = [t for t in trials if t.data.params == run.data.params
                       and t.data.metrics["epochs_trained"] < run.data.metrics["epochs_trained"]]
        first_epoch = client.get_metric_history(run.info.run_id, "val_loss")[0].step
        assert first_epoch == previous.data.metrics["epochs_trained"]  # it goes on where that round stopped
        previous_id = previous.data.tags["covidsearch_trial_id"]
        if run.data.tags["covidsearch_worker_id"] == previous.data.tags["covidsearch_worker_id"]:
            assert run.data.tags["warm_start"].endswith(f"trial_{previous_id}/model.keras")
        else:  # that round ran on the other worker, whose disk this one cannot read
            search_id = run.data.tags["mlflow.parentRunId"]
            assert run.data.tags["warm_start"] == tracking.trial_model(client, search_id, previous_id)


def test_a_worker_id_with_the_word_chief_is_refused():
    result = cli("worker", "--data", "anywhere", "--oracle", "127.0.0.1:8000", "--worker-id", "chief-2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("covidsearch: error: worker id 'chief-2'")


def test_the_server_refuses_a_port_that_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("server", "--port", str(taken.getsockname()[1]), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("covidsearch: error: cannot listen on 127.0.0.1:")


def test_a_chief_that_cannot_listen_stops_before_recording_anything(xray_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("run", "--data", str(xray_dir), *SMALL, "--oracle", f"127.0.0.1:{taken.getsockname()[1]}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("covidsearch: error: cannot serve the oracle on")
    assert not (tmp_path / "mlruns").exists()


# ---------------------------------------------------------------- docker/

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    import yaml

    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_runs_the_team_stack_with_health_checks_and_named_volumes(compose):
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "chief", "worker"} <= set(services)
    for name in ("postgres", "minio", "mlflow", "chief", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert set(compose["volumes"]) == {"postgres-data", "minio-data", "chief-state"}
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert set(compose["volumes"]) <= used
    assert services["chief"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["chief"]["condition"] == "service_healthy"


def test_compose_tracking_server_keeps_runs_in_postgres_and_artifacts_in_minio(compose):
    mlflow_server = compose["services"]["mlflow"]
    command = mlflow_server["command"]
    assert command.startswith("server ") and "postgresql://" in command and "@postgres:5432/" in command
    assert "--artifacts-destination s3://mlflow/" in command and "--host 0.0.0.0" in command
    assert mlflow_server["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:*" in command  # the Host header workers send, else MLflow answers 403


def test_compose_workers_scale_with_one_gpu_each_and_find_the_chief(compose):
    chief, worker = compose["services"]["chief"], compose["services"]["worker"]
    assert "--oracle 0.0.0.0:8000" in chief["entrypoint"][-1] and "covidsearch run" in chief["entrypoint"][-1]
    assert "--oracle chief:8000" in worker["entrypoint"][-1] and "covidsearch worker" in worker["entrypoint"][-1]
    assert chief["environment"] == worker["environment"]  # the same search options, the same tracking server
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    assert "container_name" not in worker and "ports" not in worker  # either would stop --scale worker=N


def test_dockerfile_installs_the_package_on_tensorflow_gpu_as_a_non_root_user():
    lines = [line.split() for line in (DOCKER / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]
    args = {line[1].split("=")[0]: line[1].split("=", 1)[1] for line in lines if line[0] == "ARG"}
    assert args["TENSORFLOW_IMAGE"].startswith("tensorflow/tensorflow:") and args["TENSORFLOW_IMAGE"].endswith("-gpu")
    assert any(line[:3] == ["RUN", "pip", "install"] and '".[postgres,s3]"' in line for line in lines)
    users = [line[1] for line in lines if line[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ["ENTRYPOINT", '["covidsearch"]'] in lines


def test_docker_compose_accepts_the_file_where_it_is_installed(tmp_path):
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True) \
        if shutil.which("docker") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no `docker compose` here (Debian 12 packages only Compose v1); the tests above read the file")
    result = subprocess.run(["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, env={**os.environ, "DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
