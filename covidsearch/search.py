"""A search: space -> oracle proposes -> each trial runs in a worker process -> MLflow.

Keras Tuner's oracles propose the points and keep the search state on disk (so a killed
search resumes); covidsearch's Tuner runs each trial in a spawned worker process and records
it as a child run of the search's parent run.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

import keras
import keras_tuner as kt
from keras_tuner.src import config as kt_config
from keras_tuner.src.engine import base_tuner

from . import UserError, data, models, spaces, tracking, trial
from .progress import Progress

TUNERS = ("hyperband", "random", "bayesian")
kt_config.DEBUG = False  # failed trials are reported once, by covidsearch, not as tracebacks


@dataclass
class Options:
    """Everything `covidsearch run` takes; defaults not given here come from the space file."""

    data: str
    space: str = "vanilla"
    sets: list[str] = field(default_factory=list)
    tuner: str | None = None
    max_trials: int | None = None
    max_epochs: int | None = None
    objective: str | None = None
    seed: int = 28
    classes: list[str] | None = None
    test_per_class: int | None = None
    test_data: str | None = None
    dedupe: bool = False
    baseline: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None
    project_dir: str | None = None
    cache_dir: str | None = None
    precision: str = "auto"
    resume: str = "auto"  # auto: continue an unfinished identical search; never; required
    max_consecutive_failed_trials: int = 3
    trials_per_worker: int = 1
    workers_per_gpu: int = 1  # trials run at once in this process's search, sharing the device
    progress: str = "plain"  # tty, plain or off (see progress.mode_for)
    oracle: str | None = None  # HOST:PORT: `run` serves the oracle there (the chief), `work` asks it for trials
    worker_id: str | None = None  # a worker's Keras Tuner id (default: the host name)


@dataclass
class Result:
    """What a finished search reports."""

    search_run_id: str
    best_run_id: str | None
    best_score: float | None
    objective: str
    trials: int
    resumed: bool


@dataclass
class WorkerResult:
    """What a worker reports when the chief tells it to stop."""

    search_run_id: str
    worker_id: str
    trials: int  # FINISHED by this worker


class SearchError(UserError, RuntimeError):
    """The search cannot go on; shown as a one-line error (nothing recorded is lost)."""


# ---------------------------------------------------------------- oracles


class _BaselineFirst:
    """Oracle mixin: the first point proposed is the space's default point, the tutorial."""

    baseline = True

    def _default_values(self) -> dict[str, Any]:
        hps = kt.HyperParameters()
        for hp in self.hyperparameters.space:
            hps.merge([hp])
            if hps.is_active(hp):
                hps.values[hp.name] = hp.default
        return hps.values

    def _random_values(self) -> dict[str, Any] | None:
        defaults = self._default_values()
        if self.baseline and not self._duplicate(defaults):
            return defaults
        return super()._random_values()


class _KeepsWorkersTrials:
    """Oracle mixin: a restarted chief keeps each worker's trial for that worker id. Keras Tuner would queue it
    for any worker, and the worker still training it would then record it a second time."""

    keep_workers_trials = False  # set on the chief of a distributed search

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._held = dict(self.ongoing_trials)

    def reload(self) -> None:
        super().reload()
        if self.keep_workers_trials:
            self.ongoing_trials = self._held
            held = {held_trial.trial_id for held_trial in self._held.values()}
            self._retry_queue = [trial_id for trial_id in self._retry_queue if trial_id not in held]


class RandomOracle(_BaselineFirst, _KeepsWorkersTrials, kt.oracles.RandomSearchOracle):
    """Random search, tutorial first."""


class BayesianOracle(_BaselineFirst, _KeepsWorkersTrials, kt.oracles.BayesianOptimizationOracle):
    """Gaussian-process Bayesian optimisation, tutorial first."""


class HyperbandOracle(_BaselineFirst, _KeepsWorkersTrials, kt.oracles.HyperbandOracle):
    """Hyperband, tutorial first, trained as the tutorial was (max_epochs, early stopping) and outside the
    brackets: in the first bracket it would get a few epochs and understate the tutorial it stands for."""

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        defaults = self._default_values()
        if self.baseline and not self._duplicate(defaults):
            values = {**defaults, "tuner/epochs": self.max_epochs, "tuner/initial_epoch": 0}
            return {"status": "RUNNING", "values": values}
        return super().populate_space(trial_id)


def make_oracle(tuner: str, objective: str, max_trials: int, max_epochs: int, seed: int, baseline: bool,
                max_failures: int) -> kt.Oracle:
    """The Keras Tuner oracle for --tuner, stopping after max_trials trials."""
    goal = kt.Objective(objective, "max" if _maximise(objective) else "min")
    common = {"objective": goal, "seed": seed, "max_consecutive_failed_trials": max_failures}
    if tuner == "hyperband":
        oracle = HyperbandOracle(max_epochs=max_epochs, factor=3, **common)
        oracle.max_trials = max_trials
    elif tuner == "random":
        oracle = RandomOracle(max_trials=max_trials, **common)
    elif tuner == "bayesian":
        oracle = BayesianOracle(max_trials=max_trials, **common)
    else:
        raise SearchError(f"unknown tuner {tuner!r}: use {', '.join(TUNERS)}")
    oracle.baseline = baseline
    oracle.verbose = 0  # covidsearch shows its own progress; Keras Tuner's trial tables would repeat it
    return oracle


def _maximise(objective: str) -> bool:
    return not objective.endswith("loss")


# ---------------------------------------------------------------- workers


# A worker process's program: TensorFlow's start-up lines are held back while it imports the library.
_WORKER_MAIN = """import sys
from covidsearch import held_stderr
with held_stderr():
    from covidsearch.trial import serve_fd
serve_fd(*sys.argv[1:])
"""


class Workers:
    """Runs each trial in a spawned worker process; the next worker starts (imports Keras, opens the
    device) while the current trial trains, so a fresh process per trial hides its start-up where
    a core is free. `device_share` bounds the GPU memory of each of its processes."""

    def __init__(self, trials_per_worker: int = 1, device_share: float = 1.0):
        self.trials_per_worker, self.device_share = trials_per_worker, device_share
        self._current: tuple[subprocess.Popen, Connection] | None = None  # with trials left
        self._left = 0
        self._standby: tuple[subprocess.Popen, Connection] | None = None

    # A worker dies with the *thread* that started it (PR_SET_PDEATHSIG, see trial._die_with_parent), and the
    # threads of search_in_parallel end one by one, while another may still be using a worker one of them started:
    # every worker is started from this one thread, which lives as long as the search process.
    _starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidsearch-worker-starter")

    def _spawn(self) -> tuple[subprocess.Popen, Connection]:
        """A worker process, started from the one long-lived starter thread."""
        return self._starter.submit(self._start).result()

    def _start(self) -> tuple[subprocess.Popen, Connection]:
        """Start a worker in a session of its own: Ctrl-C at the terminal reaches only the search process,
        which decides what an interrupt ends (and kills the workers)."""
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", _WORKER_MAIN, str(theirs.fileno()), str(self.trials_per_worker),
                   str(self.device_share)]
        process = subprocess.Popen(command, pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        return process, Connection(ours.detach())

    def run(self, spec: trial.Spec, plan: trial.Plan) -> dict[str, float]:
        """Run one trial in a worker; a worker that dies becomes a failed trial, not a failed search."""
        if self._current is None or self._left == 0:
            self._retire()
            self._current, self._left = self._standby or self._spawn(), self.trials_per_worker
            self._standby = self._spawn()
        process, conn = self._current
        self._left -= 1
        try:
            conn.send((spec, plan))
            ok, payload = conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self._current, self._left = None, 0
            raise trial.TrialFailed(f"the worker process died (exit code {_wait(process)}: killed, or out of "
                                    "memory)") from None
        if self._left == 0:
            self._retire()
        if not ok:
            raise trial.TrialFailed(payload)
        return payload

    def _retire(self) -> None:
        if self._current is not None:
            _stop(*self._current)
            self._current = None

    def close(self) -> None:
        """Stop every worker, the standby and one still training (after an interrupt) included."""
        self._retire()
        if self._standby is not None:
            _stop(*self._standby)
            self._standby = None


def _stop(process: subprocess.Popen, conn: Connection) -> None:
    """Close a worker's pipe (an idle worker then exits by itself); kill it if it does not."""
    conn.close()
    if _wait(process) is None:
        process.kill()
        process.wait()


def _wait(process: subprocess.Popen, seconds: float = 5) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------- tuner


class Tuner(base_tuner.BaseTuner):
    """Keras Tuner's trial loop; each trial becomes a worker-process run and an MLflow child run."""

    def __init__(self, oracle: kt.Oracle, space: spaces.Space, plan: trial.Plan, max_epochs: int,
                 client: Any, experiment_id: str, search_run_id: str, workers: list[Workers], directory: str,
                 project_name: str, progress: Progress):
        super().__init__(oracle, hypermodel=None, directory=directory, project_name=project_name)
        self.space, self.plan, self.max_epochs = space, plan, max_epochs
        self.client, self.experiment_id, self.search_run_id = client, experiment_id, search_run_id
        self.progress = progress
        self._free: queue.Queue[Workers] = queue.Queue()  # one per trial that may run at once
        for slot in workers:
            self._free.put(slot)
        self._saving = threading.Lock()
        self._thread = threading.local()  # in search_in_parallel, the tuner id each thread asks the oracle with
        self.baseline_values = space.defaults()
        if not self.oracle.get_space().space:  # a worker's oracle is the chief's, over gRPC
            self.oracle.update_space(space.hyperparameters())
        self._asked_in_vain = False

    def pre_create_trial(self) -> None:
        """A worker whose last ask got no trial (Hyperband waits for other workers to end a round) asks again a
        second later, instead of Keras Tuner's tight loop of gRPC calls that would busy the chief and the CPUs."""
        if self._asked_in_vain:
            time.sleep(1)
        self._asked_in_vain = True

    def on_trial_begin(self, kt_trial: kt.engine.trial.Trial) -> None:
        self._asked_in_vain = False
        super().on_trial_begin(kt_trial)

    def save(self) -> None:
        with self._saving:  # trials that end at once must not write the oracle's state file together
            super().save()

    def search_in_parallel(self, n: int) -> None:
        """n trials at a time: n threads, each a Keras Tuner tuner id asking the one (thread-safe) oracle."""
        failures: list[BaseException] = []
        stop = threading.Event()

        def loop(tuner_id: str) -> None:
            self._thread.tuner_id = tuner_id
            try:
                while not stop.is_set():
                    kt_trial = self.oracle.create_trial(tuner_id)
                    if kt_trial.status == kt.engine.trial.TrialStatus.STOPPED:
                        return
                    if kt_trial.status == kt.engine.trial.TrialStatus.IDLE:  # a Hyperband round is finishing
                        time.sleep(1)
                        continue
                    self.on_trial_begin(kt_trial)
                    self._try_run_and_update_trial(kt_trial)
                    self.on_trial_end(kt_trial)
            except BaseException as err:  # re-raised in the search's own thread below
                failures.append(err)
                stop.set()

        threads = [threading.Thread(target=loop, args=(f"tuner{i}",), daemon=True) for i in range(n)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        finally:
            stop.set()
        if failures:
            raise failures[0]

    def run_trial(self, kt_trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        values = dict(kt_trial.hyperparameters.values)
        index = int(kt_trial.trial_id) + 1
        config = self.space.config(values)
        is_baseline = {k: v for k, v in values.items() if not k.startswith("tuner/")} == self.baseline_values
        warm_start, initial_epoch = self._warm_start(values)
        tags = {"covidsearch_kind": "trial", "covidsearch_trial_id": kt_trial.trial_id,
                "covidsearch_worker_id": getattr(self._thread, "tuner_id", self.tuner_id), "baseline": str(is_baseline).lower()}
        if "tuner/trial_id" in values:  # a Hyperband round that continues an earlier trial
            tags["warm_start"] = warm_start or "none"
        run_id = tracking.create_run(self.client, self.experiment_id, f"trial-{kt_trial.trial_id}", tags,
                                     parent_id=self.search_run_id)
        self.client.log_batch(run_id, params=_params(config))
        spec = trial.Spec(kt_trial.trial_id, run_id, config, epochs=int(values.get("tuner/epochs", self.max_epochs)),
                          initial_epoch=initial_epoch, trial_dir=self.get_trial_dir(kt_trial.trial_id),
                          warm_start=warm_start, progress=self.progress.mode, label=self.progress.trial_label(index))
        objective = self.oracle.objective.name
        started = time.perf_counter()
        slot = self._free.get()
        try:
            result = slot.run(spec, self.plan)
        except trial.TrialFailed as err:
            if self.client.get_run(run_id).info.status == "RUNNING":
                tracking.end_run(self.client, run_id, "FAILED", str(err))
            self.progress.finished(index, kt_trial.trial_id, None, f"FAILED: {err}", _maximise(objective))
            raise kt.errors.FailedTrialError(str(err)) from None
        finally:
            self._free.put(slot)
        self.record_best()
        text = (f"{objective} {result[objective]:.4f}{' (baseline)' if is_baseline else ''} in "
                f"{time.perf_counter() - started:.0f} s: " + _shown(values))
        self.progress.finished(index, kt_trial.trial_id, result[objective], text, _maximise(objective))
        return result

    def _warm_start(self, values: dict[str, Any]) -> tuple[str | None, int]:
        """Weights a Hyperband trial continues from and its first epoch: the previous round's checkpoint from this
        machine, else its model from MLflow (workers share no disk); with neither, it trains from epoch 0."""
        previous = values.get("tuner/trial_id")
        if previous is None:
            return None, int(values.get("tuner/initial_epoch", 0))
        path = Path(self.get_trial_dir(previous)) / "best.weights.h5"
        if path.exists():
            return str(path), int(values["tuner/initial_epoch"])
        model_id = tracking.trial_model(self.client, self.experiment_id, self.search_run_id, previous)
        return (f"models:/{model_id}", int(values["tuner/initial_epoch"])) if model_id else (None, 0)

    def record_best(self) -> None:
        """Keep the search run's best trial id and score current after every trial."""
        rows = [r for r in tracking.leaderboard(self.client, self.experiment_id, self.search_run_id)
                if r["status"] == "FINISHED" and r["objective"] is not None]
        if rows:
            self.client.set_tag(self.search_run_id, "best_trial_run_id", rows[0]["run_id"])
            self.client.log_metric(self.search_run_id, f"best_{self.oracle.objective.name}", rows[0]["objective"])


def _params(config: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in sorted(config.items())]


def _shown(values: dict[str, Any]) -> str:
    """A trial's point for the console: floats to 4 significant digits (MLflow keeps them whole)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items() if not k.startswith("tuner/"))


# ---------------------------------------------------------------- the search


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C: `note` says what became of the trials in flight; `command` resumes the search."""

    def __init__(self, command: str, note: str = "the trial in flight is recorded as KILLED"):
        super().__init__(command)
        self.command, self.note = command, note


@dataclass
class _Setup:
    """What `run` and every worker of the same search derive alike from the same options."""

    space: spaces.Space
    settings: dict[str, Any]
    key: str
    client: Any
    experiment_id: str
    uri: str
    plan: trial.Plan
    progress: Progress


def _prepare(opts: Options, create: bool = True) -> _Setup:
    """Check the options, scan and split the data, and compute the search's identity."""
    space = spaces.load(opts.space).pin(opts.sets)
    tuner_name = opts.tuner or space.search.get("tuner", "hyperband")
    max_trials = int(opts.max_trials or space.search.get("max_trials", 20))
    max_epochs = int(opts.max_epochs or space.search.get("max_epochs", 30))
    objective = opts.objective or space.search.get("objective", "val_loss")
    if tuner_name not in TUNERS:
        raise SearchError(f"unknown tuner {tuner_name!r}: use {', '.join(TUNERS)}")
    if not objective.startswith("val_"):
        raise SearchError(f"objective {objective!r} must be a validation metric such as val_loss or val_accuracy")

    _preflight(space)
    client, experiment_id = tracking.connect(opts.tracking_uri, opts.experiment, create)
    uri = tracking.store_uri(opts.tracking_uri)
    cache_dir = Path(opts.cache_dir or tracking.STORE_DIR / "cache")
    default = space.config(space.defaults())  # the baseline's pixels come from the scan's own decode
    dataset = data.scan(opts.data, opts.classes, cache_dir,
                        sizes=[(int(default["input_size"]), default.get("color_mode", "rgb"))])
    test_dataset = data.scan(opts.test_data, dataset.classes, cache_dir) if opts.test_data else None
    test_per_class = opts.test_per_class if opts.test_per_class is not None else int(space.fixed.get("test_per_class", 40))
    space.fixed["test_per_class"] = test_per_class  # what the trials really used, for their records
    parts = data.split(dataset, opts.seed, float(space.fixed.get("val_fraction", 0.2)), test_per_class,
                       test_dataset, opts.dedupe)
    weights = data.class_weights(dataset.labels[parts.train], len(dataset.classes))
    progress = Progress(opts.progress, max_trials, objective)
    progress.say(_data_line(dataset, parts, weights))

    settings = {"space": space.path.stem, "tuner": tuner_name, "max_trials": max_trials, "max_epochs": max_epochs,
                "objective": objective, "objective_direction": "max" if _maximise(objective) else "min",
                "seed": opts.seed, "baseline": opts.baseline, "test_per_class": test_per_class,
                "dedupe": opts.dedupe, "classes": "|".join(dataset.classes), "precision": opts.precision,
                "test_data": opts.test_data or "", "sets": " ".join(opts.sets)}
    plan = trial.Plan(dataset, parts, weights, str(cache_dir), uri, objective, opts.seed, opts.precision)
    return _Setup(space, settings, _search_key(space, settings, dataset, parts), client, experiment_id, uri, plan,
                  progress)


def _close(workers: list[Workers]) -> None:
    for slot in workers:
        slot.close()


def _tuner(s: _Setup, opts: Options, search_run_id: str, workers: list[Workers], directory: Path,
           project_name: str) -> Tuner:
    """The Keras Tuner tuner of this process: the oracle's own (local, chief) or the chief's over gRPC (worker)."""
    max_trials, max_epochs = s.settings["max_trials"], s.settings["max_epochs"]
    oracle = make_oracle(s.settings["tuner"], s.settings["objective"], max_trials, max_epochs, opts.seed,
                         opts.baseline, opts.max_consecutive_failed_trials)
    oracle.keep_workers_trials = bool(opts.oracle)  # read when the tuner reloads a resumed chief's oracle
    tuner = Tuner(oracle, s.space, s.plan, max_epochs, s.client, s.experiment_id, search_run_id, workers,
                  str(directory), project_name, s.progress)
    tuner.oracle.max_trials = max_trials
    return tuner


def run(opts: Options) -> Result:
    """Run (or resume) a search and return where its results are; with opts.oracle, workers run its trials."""
    if opts.oracle:
        from . import distributed

        distributed.check_listen(opts.oracle)
    s = _prepare(opts)
    client, experiment_id, progress = s.client, s.experiment_id, s.progress
    directory = Path(opts.project_dir or tracking.STORE_DIR / "tuner")
    project_name, state, lock = _claim_project(directory, f"{s.space.path.stem}-{s.key}", opts.resume)
    if state:
        search_run_id = state["search_run_id"]
        tracking.get_run(client, search_run_id)
        client.update_run(search_run_id, "RUNNING")
        if not opts.oracle:  # a chief's trials may still be training on their workers; a restarted one closes its own
            for run_id in tracking.close_orphans(client, experiment_id, search_run_id):
                progress.notice(f"trial run {run_id} was in flight when the search stopped: marked KILLED, it runs "
                                "again")
        progress.notice(f"resuming search {search_run_id}")
    else:
        search_run_id = tracking.create_run(client, experiment_id, f"search-{s.space.path.stem}",
                                            {"covidsearch_kind": "search", **_provenance()})
        _log_search(client, search_run_id, s.space, s.settings, s.plan.dataset, s.plan.split, s.plan.class_weights)
        _write_state(directory / project_name, search_run_id, "running")
    client.set_tag(search_run_id, "covidsearch_search_key", s.key)  # how workers find this run
    client.set_tag(search_run_id, "covidsearch_oracle", opts.oracle or "none")
    progress.say(f"search run {search_run_id} in {s.uri}")

    workers = [Workers(opts.trials_per_worker, 1.0 / opts.workers_per_gpu) for _ in range(opts.workers_per_gpu)]
    tuner = _tuner(s, opts, search_run_id, workers, directory, project_name)
    tuner.save()
    try:
        if opts.oracle:
            distributed.serve(tuner.oracle, opts.oracle, progress)
        elif opts.workers_per_gpu > 1:
            tuner.search_in_parallel(opts.workers_per_gpu)
        else:
            tuner.search(verbose=0)
    except KeyboardInterrupt:
        _close(workers)
        command = " ".join(["covidsearch", *sys.argv[1:]]) + " --resume"
        tracking.end_run(client, search_run_id, "KILLED", "interrupted by the user")
        if opts.oracle:
            raise SearchInterrupted(command, "the workers keep training their trials and wait for the chief") from None
        tracking.close_orphans(client, experiment_id, search_run_id)
        raise SearchInterrupted(command) from None
    except RuntimeError as err:
        if "consecutive failures" not in str(err):
            raise
        tracking.close_orphans(client, experiment_id, search_run_id, "FAILED")
        tracking.end_run(client, search_run_id, "FAILED", str(err))
        _write_state(directory / project_name, search_run_id, "failed")
        raise SearchError(f"search stopped: {opts.max_consecutive_failed_trials} trials in a row failed; "
                          f"last error: {str(err).splitlines()[-1]}") from None
    finally:
        _close(workers)
        lock.close()
    for run_id in tracking.close_orphans(client, experiment_id, search_run_id):
        progress.notice(f"trial run {run_id} was left RUNNING by a worker that was lost: marked KILLED")
    tuner.record_best()
    client.set_terminated(search_run_id, "FINISHED")
    _write_state(directory / project_name, search_run_id, "finished")
    best = client.get_run(search_run_id).data
    objective = s.settings["objective"]
    return Result(search_run_id, best.tags.get("best_trial_run_id"), best.metrics.get(f"best_{objective}"), objective,
                  len(tracking.trial_runs(client, experiment_id, search_run_id)), bool(state))


def work(opts: Options) -> WorkerResult:
    """Join the search whose chief serves its oracle at opts.oracle: run the trials it hands this worker,
    recorded as children of the chief's search run, until the chief says stop."""
    from . import distributed

    worker_id = distributed.worker_id(opts.worker_id)
    distributed.join(opts.oracle, worker_id)  # tuners built from here on ask the chief for trials
    s = _prepare(opts, create=False)
    search_run_id = _find_search(s)
    directory = Path(opts.project_dir or tracking.STORE_DIR / "tuner")
    project_name = f"{s.space.path.stem}-{s.key}-{search_run_id}-{worker_id}"
    (directory / project_name).mkdir(parents=True, exist_ok=True)
    lock = _try_lock(directory / project_name)
    if lock is None:
        raise SearchError(f"worker {worker_id} is already running here: give this one another --worker-id")
    for run_id in tracking.close_orphans(s.client, s.experiment_id, search_run_id, worker_id=worker_id):
        s.progress.notice(f"trial run {run_id} was in flight when worker {worker_id} stopped: marked KILLED, "
                          "it runs again")
    s.progress.say(f"worker {worker_id} joins search run {search_run_id} in {s.uri} (oracle at {opts.oracle})")
    workers = [Workers(opts.trials_per_worker)]
    tuner = _tuner(s, opts, search_run_id, workers, directory, project_name)
    try:
        tuner.search(verbose=0)
    except KeyboardInterrupt:
        _close(workers)
        tracking.close_orphans(s.client, s.experiment_id, search_run_id, worker_id=worker_id)
        raise SearchInterrupted(" ".join(["covidsearch", *sys.argv[1:]])
                                + ("" if opts.worker_id else f" --worker-id {worker_id}")) from None
    except distributed.RpcError as err:
        raise SearchError(f"the chief at {opts.oracle} failed or went away: {err.details()}") from None
    finally:
        _close(workers)
        lock.close()
    runs = tracking.trial_runs(s.client, s.experiment_id, search_run_id, worker_id=worker_id)
    return WorkerResult(search_run_id, worker_id, sum(r.info.status == "FINISHED" for r in runs))


def _find_search(s: _Setup) -> str:
    """The chief's RUNNING search run with this worker's key; when there is none, say what differs."""
    runs = s.client.search_runs([s.experiment_id], "tags.covidsearch_kind = 'search' and attributes.status = 'RUNNING'",
                                max_results=1000)
    chiefs = [r for r in runs if r.data.tags.get("covidsearch_oracle", "none") != "none"]
    same = [r.info.run_id for r in chiefs if r.data.tags.get("covidsearch_search_key") == s.key]
    if len(same) == 1:
        return same[0]
    if same:
        raise SearchError(f"{len(same)} running searches have these settings ({', '.join(same)}): stop all chiefs "
                          "but one")
    if not chiefs:
        raise SearchError(f"no distributed search is running in {s.uri}: start its chief first with "
                          "`covidsearch run ... --oracle HOST:PORT` (and the same --tracking-uri and --experiment)")
    fingerprint = s.plan.dataset.fingerprint()
    if all(r.data.tags.get("data_fingerprint") != fingerprint for r in chiefs):
        theirs = ", ".join(f"{r.info.run_id} {r.data.tags.get('data_fingerprint', '?')[:12]}" for r in chiefs)
        raise SearchError(f"this worker's data (fingerprint {fingerprint[:12]}) is not the running search's "
                          f"({theirs}): point --data at the same images")
    raise SearchError(f"the running search {', '.join(r.info.run_id for r in chiefs)} has other settings than this "
                      "worker: give the worker the chief's space and search options")


def _preflight(space: spaces.Space) -> None:
    """Fail at once on backbone weights that cannot be had or do not fit, before anything is recorded."""
    weights = str(space.fixed.get("weights", "none"))
    if space.fixed.get("model") != "transfer" or weights == "none":
        return
    config = space.config(space.defaults())
    if weights == "imagenet":
        cached = models.imagenet_file(config["backbone"], int(config["input_size"]), float(config.get("alpha", 1.0)))
        if not cached.is_file():
            models.backbone_model(config)  # raises WeightsError naming the file and the alternatives
        return
    if "backbone" in space.params and "backbone" not in space.pinned:
        raise SearchError(f"--weights {weights} fits one backbone: pin it, e.g. --set backbone=MobileNet --set alpha=0.25")
    models.backbone_model(config)
    keras.backend.clear_session()


def _data_line(dataset: data.Dataset, parts: data.Split, weights: dict[int, float]) -> str:
    counts = ", ".join(f"{c} {n}" for c, n in dataset.counts().items())
    skipped = f"; skipped {len(dataset.skipped)} unreadable file(s)" if dataset.skipped else ""
    return (f"data: {len(dataset.samples)} images ({counts}), {dataset.layout} layout{skipped}; "
            f"split {len(parts.train)} train / {len(parts.val)} val / {len(parts.test)} test; class weights "
            + ", ".join(f"{dataset.classes[i]} {w:.3f}" for i, w in weights.items()))


def _search_key(space: spaces.Space, settings: dict, dataset: data.Dataset, parts: data.Split) -> str:
    """Identity of a search: the same command on the same files gives the same key (and resumes)."""
    h = hashlib.sha256(space.path.read_bytes())
    h.update(json.dumps([settings, dataset.fingerprint(), parts.test_dataset.fingerprint()], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:10]


def _claim_project(directory: Path, prefix: str, resume: str) -> tuple[str, dict | None, IO]:
    """The unfinished search with this key to resume, or a new one; locked while this process runs it."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted((p for p in directory.glob(f"{prefix}-*") if (p / "covidsearch.json").exists()),
                      key=lambda p: p.stat().st_mtime)
    if resume != "never":
        for path in reversed(existing):
            state = json.loads((path / "covidsearch.json").read_text())
            lock = _try_lock(path)
            if state["status"] == "running" and lock is not None:
                return path.name, state, lock
            if lock is not None:
                lock.close()
    if resume == "required":
        raise SearchError("nothing to resume: no unfinished (and not running) search with these settings here")
    number = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in directory.glob(f"{prefix}-*")
                      if p.name.rsplit("-", 1)[1].isdigit()), default=0)
    while True:  # another process may take a number at the same moment
        path = directory / f"{prefix}-{number}"
        try:
            path.mkdir()
        except FileExistsError:
            number += 1
            continue
        return path.name, None, _try_lock(path)


def _try_lock(path: Path) -> IO | None:
    """An exclusive lock on a search's project dir; None when another live process holds it."""
    handle = open(path / "lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _write_state(path: Path, search_run_id: str, status: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "covidsearch.json").write_text(json.dumps({"search_run_id": search_run_id, "status": status}))


def _provenance() -> dict[str, str]:
    """Git commit and package versions, so a result can be traced to the code that made it."""
    tags = {"git_commit": _git_commit(), "python": sys.version.split()[0], "keras_backend": keras.backend.backend()}
    for package in ("covidsearch", "keras", "keras-tuner", "mlflow", "tensorflow", "jax", "numpy", "scikit-learn"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            continue
    return tags


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _log_search(client: Any, run_id: str, space: spaces.Space, settings: dict, dataset: data.Dataset,
                parts: data.Split, weights: dict[int, float]) -> None:
    """The search run's record: settings, space file, data summary, split manifest, skipped files, leakage."""
    from mlflow.entities import Param

    leakage = data.leakage(dataset, parts)
    summary = {
        "root": dataset.root, "layout": dataset.layout, "classes": dataset.classes,
        "fingerprint": dataset.fingerprint(), "test_fingerprint": parts.test_dataset.fingerprint(),
        "counts": {name: {c: int((ds.labels[idx] == i).sum()) for i, c in enumerate(dataset.classes)}
                   for name, idx, ds in (("train", parts.train, dataset), ("val", parts.val, dataset),
                                         ("test", parts.test, parts.test_dataset))},
        "skipped": len(dataset.skipped), "class_weights": {dataset.classes[i]: w for i, w in weights.items()},
        "exact_duplicates_across_splits": leakage["exact_duplicates"],
        "near_duplicates_across_splits": leakage["near_duplicates"],
    }
    params = {**settings, "data_root": dataset.root, "data_fingerprint": summary["fingerprint"],
              "images": len(dataset.samples), "train_images": len(parts.train), "val_images": len(parts.val),
              "test_images": len(parts.test), "skipped_files": len(dataset.skipped),
              **{f"class_weight_{data.metric_safe(c)}": f"{w:.6f}" for c, w in summary["class_weights"].items()}}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_tag(run_id, "data_fingerprint", summary["fingerprint"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "dataset.json").write_text(json.dumps(summary, indent=2))
        (out / "leakage.json").write_text(json.dumps(leakage, indent=2))
        data.write_csv(data.manifest_rows(dataset, parts), out / "split_manifest.csv")
        data.write_csv([{"file": f, "reason": r} for f, r in dataset.skipped] or [{"file": "", "reason": ""}],
                       out / "skipped_files.csv")
        (out / space.path.name).write_bytes(space.path.read_bytes())
        client.log_artifacts(run_id, str(out), "search")
