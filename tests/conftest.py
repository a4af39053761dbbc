"""Shared fixtures: small generated X-ray-like datasets and a private MLflow store per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from covidsearch import demo  # noqa: E402

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-radiography"


@pytest.fixture(scope="session")
def xray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the tutorial layout (read-only for tests)."""
    return demo.make_dataset(tmp_path_factory.mktemp("xrays"), per_class=40, size=48, seed=1)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory so the default store mlruns/ is private to the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def is_mapped(pixels) -> bool:
    """Whether an array is (a view of) a cache file mapped into memory, not a copy of it in memory."""
    import numpy as np

    while pixels is not None and not isinstance(pixels, np.memmap):
        pixels = pixels.base
    return pixels is not None


def cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run the covidsearch command as a user would, in a fresh process."""
    import subprocess

    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow sets it in-process
    return subprocess.run([sys.executable, "-m", "covidsearch.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})})


SMALL = ["--tuner", "random", "--max-epochs", "2", "--test-per-class", "8", "--set", "input_size=32", "--quiet"]


def store(work: Path):
    """The default store a command run in `work` wrote, read as a user would: (client, experiment id). Opening it
    creates nothing: a store the command is still creating raises tracking.StoreError."""
    from covidsearch import tracking

    return tracking.connect(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}", create=False)


def runs(work: Path, kind: str) -> list:
    """Runs of a kind in the store of `work`; none while the search is still creating its store."""
    from covidsearch import tracking

    try:
        client, experiment_id = store(work)
    except tracking.StoreError:
        return []
    return client.search_runs([experiment_id], f"tags.covidsearch_kind = '{kind}'")


def start_search(work: Path, *args: str):
    """`covidsearch run` in its own process group, as a user's terminal would run it, not waited for. Ctrl-C reaches
    it as at a terminal even when the tests run as a background job (`make test &`), which starts every process with
    SIGINT ignored and would leave the Ctrl-C test a search that runs to its end."""
    import signal
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "covidsearch.cli", "run", *args], cwd=work, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, timeout: float = 300) -> None:
    """Poll until `predicate()` holds; fail the test after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the search"
        time.sleep(0.5)


def small_search(work: Path, data: Path):
    """A finished 2-trial vanilla search through the CLI into `work`'s own store: (client, experiment id, output)."""
    result = cli("run", "--space", "vanilla", "--data", str(data), "--tuner", "random", "--max-trials", "2",
                 "--max-epochs", "2", "--test-per-class", "8", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return (*store(work), result.stdout)
