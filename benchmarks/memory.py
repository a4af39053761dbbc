"""Memory across trials (issue 5): does a 20-trial search grow memory?

The same vanilla random search runs twice in this process, each into a private MLflow store:
  default     covidsearch's defaults: long-lived worker processes, each replaced after 20 trials or once
              its memory after a trial is 10% above that after its largest (--max-worker-growth)
  unbounded   one worker process for every trial, never replaced, as in plain Keras Tuner, where memory
              leaks from trial to trial (keras-team/keras-tuner #395, #873)
Per trial it records, in MB:
  worker    VmHWM (peak RSS) of the worker that ran the trial, read from /proc while it lives;
            for a worker that ran earlier trials it is the peak so far, which is what a leak grows
  mlflow    the trial's worker_peak_rss_mb metric (the worker's VmHWM after the trial), for comparison
  search    VmRSS of this (the search) process just after the trial ended
and prints the growth from trial 2 to the last trial against the target of at most 10%.

Every trial has the tutorial's input size, filters, dense units and batch size (only dropout
and learning rate are searched), so a trial's memory does not depend on the point drawn and
growth means a leak. The default search runs first and fills the shared pixel cache, so no trial
of the unbounded search decodes images. Figures are printed, never asserted:

    .venv/bin/python benchmarks/memory.py [--data DIR] [--trials 20] [--epochs 2]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from covidsearch import search, tracking  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-radiography"
PINS = ["input_size=50", "filters=32", "dense_units=256", "batch_size=250"]
TARGET = 10.0  # percent growth from trial 2 to the last trial
INTERVAL = 0.2  # seconds between /proc samples
PACKAGES = ("keras", "tensorflow", "keras-tuner", "mlflow")


@dataclass
class Row:
    """One trial's memory, in MB."""

    trial: int
    worker: float
    mlflow: float
    search: float


@dataclass
class Samples:
    """What /proc showed over time: this process's VmRSS and every worker's VmHWM, in MB."""

    search: list[tuple[float, float]] = field(default_factory=list)
    workers: dict[tuple[int, int], list[tuple[float, float]]] = field(default_factory=dict)

    def take(self) -> None:
        """One sample; a worker that exits while being read is simply not seen this time."""
        now = time.time()
        self.search.append((now, _status_mb(Path("/proc/self/status"), "VmRSS")))
        for pid in _children():
            proc = Path(f"/proc/{pid}")
            try:
                if b"covidsearch.workers" not in (proc / "cmdline").read_bytes():
                    continue  # not a trial worker
                started = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19])
                peak = _status_mb(proc / "status", "VmHWM")
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            self.workers.setdefault((started, pid), []).append((now, peak))

    def of(self, pid: int) -> list[tuple[float, float]]:
        """The samples of the worker process with this pid (the one a trial run's tag names)."""
        return [sample for (_, found), samples in self.workers.items() if found == pid for sample in samples]


def _status_mb(path: Path, key: str) -> float:
    """A kB line of /proc/PID/status in MB; ValueError for a zombie, which has none."""
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {key} in {path}")


def _children() -> list[int]:
    """Child pids of every thread of this process (workers are started by the search's thread)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # the thread ended
    return pids


@contextmanager
def sampled() -> Iterator[Samples]:
    """Sample /proc in a thread while the block runs: a worker's own peak is visible only while it lives."""
    samples, done = Samples(), threading.Event()

    def loop() -> None:
        while not done.wait(INTERVAL):
            samples.take()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()
        samples.take()  # so the last trial has a search-process sample after it


def measure(root: Path, trials: int, epochs: int, workers: dict, store: Path, cache: Path) -> tuple[list[Row], float]:
    """One search with these worker options; its rows and the search process's peak RSS (MB) when it ended."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    opts = search.Options(data=str(root), space="vanilla", sets=PINS, tuner="random", max_trials=trials,
                          max_epochs=epochs, tracking_uri=uri, project_dir=str(store / "tuner"), cache_dir=str(cache),
                          resume="never", **workers)
    with sampled() as samples:
        result = search.run(opts)
    client, experiment_id = tracking.connect(uri)
    runs = sorted(tracking.trial_runs(client, result.search_run_id),
                  key=lambda r: int(r.data.tags["covidsearch_trial_id"]))
    failed = [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    if failed or len(runs) != trials:
        sys.exit(f"memory.py: {len(runs)} trial runs, not finished: {failed}")
    rows = []
    for i, run in enumerate(runs):
        until = runs[i + 1].info.start_time / 1000 if i + 1 < len(runs) else float("inf")
        worker = max(mb for t, mb in samples.of(int(run.data.tags[tracking.WORKER_PID])) if t < until)
        after = next(mb for t, mb in samples.search if t >= run.info.end_time / 1000)
        rows.append(Row(i + 1, worker, run.data.metrics[tracking.WORKER_PEAK], after))
    return rows, _status_mb(Path("/proc/self/status"), "VmHWM")


def growth(rows: list[Row], column: str) -> float:
    """Percent change of a column from trial 2 to the last trial."""
    return (getattr(rows[-1], column) / getattr(rows[1], column) - 1) * 100


def table(results: dict[str, list[Row]]) -> str:
    """Per-trial rows of every mode side by side, then each mode's growth."""
    head = "trial" + "".join(f"  {m + ' ' + c:>18}" for m in results for c in ("worker", "mlflow", "search"))
    lines = [head]
    for i in range(len(next(iter(results.values())))):
        lines.append(f"{i + 1:>5}" + "".join(f"  {getattr(rows[i], c):>18.0f}" for rows in results.values()
                                             for c in ("worker", "mlflow", "search")))
    lines.append("growth" + "".join(f" {growth(rows, c):>+17.1f}%" for rows in results.values()
                                     for c in ("worker", "mlflow", "search")))
    return "\n".join(lines)


def verdict(rows: list[Row], trials: int) -> str:
    """The target applies to the default mode: neither the workers nor the search process may grow."""
    worst = max(growth(rows, "worker"), growth(rows, "search"))
    met = "MET" if worst <= TARGET else "NOT MET"
    return (f"target (growth from trial 2 to trial {trials} at most {TARGET:.0f}%, default workers): {met}, "
            f"worst growth {worst:+.1f}%")


def main() -> None:
    """Both searches in turn, then one table, so the modes are compared on the same machine and data."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    if args.trials < 2:
        p.error("--trials must be at least 2: growth is measured from trial 2")
    print(f"{os.cpu_count()} CPUs, {_status_mb(Path('/proc/meminfo'), 'MemTotal') / 1024:.1f} GiB RAM; "
          + ", ".join(f"{n} {version(n)}" for n in PACKAGES) + f"; backend {keras.backend.backend()}")
    print(f"data {args.data}; vanilla space, random tuner, {args.trials} trials of {args.epochs} epoch(s); "
          f"pinned {' '.join(PINS)}")
    results, peaks = {}, {}
    with tempfile.TemporaryDirectory(prefix="covidsearch-memory-") as tmp:
        for mode, workers in (("default", {}), ("unbounded", {"trials_per_worker": args.trials,
                                                               "max_worker_growth": math.inf})):
            started = time.perf_counter()
            results[mode], peaks[mode] = measure(args.data, args.trials, args.epochs, workers, Path(tmp) / mode,
                                                 Path(tmp) / "cache")
            print(f"{mode}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("\nMB per trial (worker: peak RSS of the trial's worker from /proc; mlflow: its worker_peak_rss_mb; "
          "search: search-process RSS after the trial)")
    print(table(results))
    print("\nsearch process peak RSS when each search ended: "
          + ", ".join(f"{m} {mb:.0f} MB" for m, mb in peaks.items()))
    print(verdict(results["default"], args.trials))


if __name__ == "__main__":
    main()
