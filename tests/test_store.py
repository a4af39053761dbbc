"""The store as a newcomer meets it: created once however many processes open it, found by run id in any
experiment, shown by MLflow's UI as trials side by side, and a UI that goes away when told."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from covidsearch import cli, server, tracking
from covidsearch.cli import main


def test_the_ui_creates_a_new_store_before_mlflow_touches_it(workdir, monkeypatch):
    """`covidsearch ui` beside a starting search: MLflow's UI server migrates a new SQLite file without any lock, so
    the store must already be there, tables and all, before that server starts."""
    seen = {}

    class NoServer:
        def __init__(self, cmd, **kwargs):
            db = workdir / "mlruns" / "mlflow.db"
            seen["tables"] = db.exists() and b"experiments" in db.read_bytes()
            self.pid = os.getpid()

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(server.subprocess, "Popen", NoServer)
    monkeypatch.setattr(server, "end_group", lambda process: None)
    assert main(["ui", "--port", "5999"]) == 0
    assert seen == {"tables": True}


def test_processes_that_first_open_a_new_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    program = ("import sys, time\nfrom covidsearch import tracking\nstart = float(sys.argv[2])\n"
               "time.sleep(max(0.0, start - time.time()))\ntracking.connect(sys.argv[1], 'shared')\n")
    start = f"{time.time() + 3:.3f}"  # every process past its imports, then all at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", program, uri, start], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-800:] for e in errors]
    client, experiment_id = tracking.connect(uri, "shared")
    assert [e.name for e in client.search_experiments()].count("shared") == 1


def test_the_experiment_opens_on_its_runs_and_runs_say_who_ran_them(workdir):
    client, experiment_id = tracking.connect()
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI view
    run = client.get_run(tracking.create_run(client, experiment_id, "search-x", {tracking.KIND: tracking.SEARCH}))
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"].startswith("covidsearch")


def test_the_search_run_names_its_best_trial_as_each_trial_is_recorded(workdir):
    """What the UI shows of a running search: its best trial so far, in the objective's direction, a worse trial
    leaving it be."""
    client, experiment_id = tracking.connect()
    for objective, direction, scores, best in (("val_loss", "min", [0.9, 0.5, 0.7], 1),
                                               ("val_accuracy", "max", [0.6, 0.8, 0.7], 1)):
        search_id = tracking.create_run(client, experiment_id, "search", {tracking.KIND: tracking.SEARCH})
        client.log_param(search_id, tracking.OBJECTIVE_DIRECTION, direction)
        trials = [tracking.start_trial(client, search_id, str(i), "tuner0", False, {}) for i in range(len(scores))]
        named = []
        for run_id, score in zip(trials, scores):
            tracking.note_best(client, search_id, objective, run_id, score)
            named.append(client.get_run(search_id).data.tags[tracking.BEST_TRIAL])
        assert named == [trials[0], trials[best], trials[best]]
        assert client.get_run(search_id).data.metrics[f"{tracking.BEST}{objective}"] == scores[best]


def test_a_trial_whose_objective_is_not_a_number_is_never_the_best(workdir):
    """A validation split without COVID-19 images leaves val_sensitivity_covid_19 undefined: such a trial, even the
    first, is not named the search's best."""
    client, experiment_id = tracking.connect()
    search_id = tracking.create_run(client, experiment_id, "search", {tracking.KIND: tracking.SEARCH})
    client.log_param(search_id, tracking.OBJECTIVE_DIRECTION, "max")
    assert not tracking.new_best(client, search_id, "val_sensitivity_covid_19", float("nan"))
    assert tracking.new_best(client, search_id, "val_sensitivity_covid_19", 0.9)


def test_a_search_in_another_experiment_is_found_by_its_run_id_alone(workdir, capsys):
    client, experiment_id = tracking.connect(experiment="ablation")
    search_id = tracking.create_run(client, experiment_id, "search-x", {tracking.KIND: tracking.SEARCH})
    client.log_param(search_id, "objective", "val_loss")
    client.set_terminated(search_id, "FINISHED")

    assert main(["runs", "--search", search_id]) == 0
    assert f"search {search_id}: 0 trial(s)" in capsys.readouterr().out
    assert main(["report", search_id, "--out", str(workdir / "page.html")]) == 0
    assert search_id in (workdir / "page.html").read_text()
    assert main(["report", "0" * 32, "--out", str(workdir / "none.html")]) == 2
    assert "unknown run id" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """Every process started by pid, and by those, and so on."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_the_ui_ends_its_mlflow_server(workdir):
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "covidsearch.cli", "ui", "--port", str(port)], cwd=workdir,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _answers(port):
        assert time.monotonic() < deadline and ui.poll() is None, "the UI never answered"
        time.sleep(1)
    servers = _descendants(ui.pid)
    assert servers, "MLflow's UI runs in processes of its own"
    ui.send_signal(signal.SIGTERM)
    ui.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in servers if _alive(pid)], "MLflow's server processes outlived `covidsearch ui`"
    assert not _answers(port)


def test_the_demo_names_a_command_that_works_as_printed(monkeypatch):
    monkeypatch.setattr(sys, "argv", [os.path.join(".venv", "bin", "covidsearch"), "demo"])
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)  # not on PATH, as after `make demo`
    assert cli._self_command() == os.path.join(".venv", "bin", "covidsearch")


def test_worker_ids_differ_per_project_dir_and_stay_with_it(tmp_path):
    from covidsearch import projects

    first, second = projects.worker_id(tmp_path / "gpu0"), projects.worker_id(tmp_path / "gpu1")
    assert first != second and first.startswith(socket.gethostname().split(".")[0])
    assert projects.worker_id(tmp_path / "gpu0") == first  # a restarted worker keeps its id


def test_a_worker_id_training_a_trial_right_now_is_refused(workdir):
    import pytest

    from covidsearch import SearchError, distributed

    client, experiment_id = tracking.connect()
    search_id = tracking.create_run(client, experiment_id, "search-x", {tracking.KIND: tracking.SEARCH})
    run_id = tracking.start_trial(client, search_id, "0", "box-1", False, {})
    distributed.check_not_running(client, search_id, "box-1")  # RUNNING, but no process says it is alive: a restart
    with tracking.heartbeat(client, run_id):
        with pytest.raises(SearchError, match="worker id box-1 is training trial run"):
            distributed.check_not_running(client, search_id, "box-1")
        distributed.check_not_running(client, search_id, "box-2")
