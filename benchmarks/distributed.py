"""Wall time of one distributed search with one worker and with two (issue 6).

The same 8-trial search (vanilla space, random tuner, seed 28: the same 8 points on every side,
baseline first; --max-epochs 2, --set input_size=50) runs against one `covidsearch server`
(SQLite) as a chief (`run --oracle`) plus N workers (`worker`), each its own process, as a team
would start them. Every process shares one pixel cache, filled before the clock starts, so no
side decodes images. Per side it reports:
  wall        chief start to chief exit: data scan, search run, every trial, the end
  trials      the sum of the trials' trial_seconds (MLflow): the training work done
  per trial   their mean, and what the wall time is divided among (trials / wall = parallelism)
  CPU         CPU seconds of the chief, the workers and their trial processes (not the server),
              and that over wall x cores: how busy the side kept the machine
Sides run in turn, `--rounds` times; figures are printed, never asserted:

    .venv/bin/python benchmarks/distributed.py [--data DIR] [--workers 1 2] [--rounds 1]
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow.tracking import MlflowClient  # noqa: E402

from covidsearch import data  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-radiography"
SEARCH = ["--space", "vanilla", "--tuner", "random", "--max-trials", "8", "--max-epochs", "2",
          "--set", "input_size=50", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(work: Path, name: str, *args: str) -> subprocess.Popen:
    """A covidsearch command in its own directory and process group, output to work/name.log."""
    (work / name).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "covidsearch.cli", *args], cwd=work / name, text=True,
                            stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"{log.name} failed:\n{log.read_text()[-3000:]}")


def _server(work: Path) -> tuple[subprocess.Popen, str]:
    """`covidsearch server` on SQLite in `work`; its URI once it answers /health."""
    proc = _start(work, "server", "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                  "--artifacts-destination", str(work / "artifacts"), "--port", str(_free_port()), "--workers", "1")
    log = work / "server.log"
    while "--tracking-uri " not in log.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"the server failed:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc, log.read_text().split("--tracking-uri ")[1].split()[0]


def _children_cpu() -> float:
    """CPU seconds of every ended process this one started, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _search_running(client: MlflowClient, experiment: str) -> bool:
    found = client.get_experiment_by_name(experiment)
    return bool(found and client.search_runs([found.experiment_id], "tags.covidsearch_kind = 'search' and "
                                                                    "attributes.status = 'RUNNING'"))


def side(work: Path, uri: str, data_dir: str, cache: Path, workers: int) -> dict:
    """One search with `workers` workers; its wall time and its trials' seconds."""
    client, experiment = MlflowClient(uri), f"bench-{workers}w-{uuid.uuid4().hex[:6]}"
    args = ["--data", data_dir, *SEARCH, "--cache-dir", str(cache), "--tracking-uri", uri, "--experiment", experiment,
            "--oracle", f"127.0.0.1:{_free_port()}"]
    name = f"{experiment}-chief"
    cpu = _children_cpu()
    started = time.perf_counter()
    chief = _start(work, name, "run", *args)
    while not _search_running(client, experiment):
        if chief.poll() is not None:
            _wait(chief, work / f"{name}.log")
        time.sleep(0.5)
    procs = {f"{experiment}-w{i}": _start(work, f"{experiment}-w{i}", "worker", *args, "--worker-id", f"w{i}")
             for i in range(workers)}
    for worker_name, proc in procs.items():
        _wait(proc, work / f"{worker_name}.log")
    _wait(chief, work / f"{name}.log")
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    trials = client.search_runs([experiment_id], "tags.covidsearch_kind = 'trial' and attributes.status = 'FINISHED'")
    seconds = [t.data.metrics["trial_seconds"] for t in trials]
    return {"wall": wall, "cpu": cpu, "trials": len(trials), "trial_sum": sum(seconds),
            "trial_mean": statistics.mean(seconds),
            "by_worker": {w: sum(t.data.tags["covidsearch_worker_id"] == w for t in trials)
                          for w in sorted({t.data.tags["covidsearch_worker_id"] for t in trials})}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=1)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="covidsearch-distributed-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        data.arrays(data.scan(opts.data, cache_dir=cache, sizes=[(50, "rgb")]), 50, "rgb", cache)
        server, uri = _server(work)
        results: dict[int, list[dict]] = {n: [] for n in opts.workers}
        try:
            for round_ in range(opts.rounds):
                for n in opts.workers:
                    load = os.getloadavg()[0]
                    result = side(work, uri, opts.data, cache, n)
                    results[n].append(result)
                    print(f"round {round_ + 1}, {n} worker(s): wall {result['wall']:.0f} s, {result['trials']} "
                          f"trials, trial seconds {result['trial_sum']:.0f} (mean {result['trial_mean']:.1f}), "
                          f"CPU {result['cpu']:.0f} s, "
                          f"by worker {result['by_worker']}, load average at start {load:.1f}", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    print(f"\nmedians over {opts.rounds} round(s), {os.cpu_count()} CPU cores")
    print("workers | wall, s | trial seconds, sum | mean per trial, s | parallelism (sum / wall) | CPU, s | "
          "CPU busy | speed-up")
    base = statistics.median(r["wall"] for r in results[opts.workers[0]])
    for n, rows in results.items():
        wall = statistics.median(r["wall"] for r in rows)
        total = statistics.median(r["trial_sum"] for r in rows)
        mean = statistics.median(r["trial_mean"] for r in rows)
        cpu = statistics.median(r["cpu"] for r in rows)
        busy = cpu / (wall * os.cpu_count())
        print(f"{n:7d} | {wall:7.0f} | {total:18.0f} | {mean:17.1f} | {total / wall:24.2f} | {cpu:6.0f} | "
              f"{busy:8.0%} | {base / wall:7.2f}x")


if __name__ == "__main__":
    main()
