"""A search: space file -> hyperparameters -> oracle -> tuner -> worker processes -> MLflow.

`run` prepares the data and the search's record, then lets the tuner ask the oracle for trials
(locally, or as the chief serving its oracle to workers); `work` is one such worker.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import keras

from . import FIGURES_FOR, SearchError, data, metrics, models, operating, projects, recorder, spaces, tracking, trial
from .metrics import maximise
from .oracles import TUNERS, make_oracle
from .progress import Progress, clock
from .tuner import Tuner
from .workers import MAX_GROWTH, TRIALS_PER_WORKER, Pool, settled


@dataclass
class Options:
    """Everything `covidsearch run` takes; defaults not given here come from the space file."""

    data: str
    space: str = "vanilla"
    sets: list[str] = field(default_factory=list)
    tuner: str | None = None
    max_trials: int | None = None
    max_epochs: int | None = None
    budget: str | None = None  # "90m": start no trial that would end past this much search time
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
    trials_per_worker: int = TRIALS_PER_WORKER  # a worker process is replaced after this many trials
    max_worker_growth: float = MAX_GROWTH  # percent; or once its memory grows so much past its largest trial's
    workers_per_gpu: int = 1  # trials run at once in this process's search, sharing the device
    progress: str = "plain"  # tty, plain or off (see progress.mode_for)
    oracle: str | None = None  # HOST:PORT: `run` serves the oracle there (the chief), `work` asks it for trials
    worker_id: str | None = None  # a worker's Keras Tuner id (default: host name and an id kept in --project-dir)
    target_sensitivity: float | None = None  # each trial's COVID-19 threshold reaching it on validation (operating.py)
    figures: str = "best"  # whose figures and MLflow model are made as they end: "best" (and the baseline) or "every"


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


BUDGETED_TRIALS = 999  # the trial cap of a search with --budget and no --max-trials: the budget ends it


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C: `note` says what became of the trials in flight; `command` resumes the search."""

    def __init__(self, command: str, note: str = "the trial in flight is recorded as KILLED"):
        super().__init__(command)
        self.command, self.note = command, note


# ---------------------------------------------------------------- preparation


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
    budget: float | None  # seconds; not part of the key, so a resumed search may be given more


def budget_seconds(text: str | None) -> float | None:
    """--budget as seconds: a number with a unit, s, m or h ("90m", "1.5h", "5400s")."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr?)\s*", text.lower())
    if not match or float(match[1]) <= 0:
        raise SearchError(f"--budget {text!r}: expected a time above 0 with its unit, e.g. 90m, 1.5h or 5400s")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2][0]]


def _settings(opts: Options, space: spaces.Space) -> dict[str, Any]:
    """The search's settings from the options and the space file's [search] defaults, checked."""
    tuner = opts.tuner or space.search.get("tuner", "hyperband")
    default_trials = BUDGETED_TRIALS if opts.budget else int(space.search.get("max_trials", 20))
    max_trials = opts.max_trials if opts.max_trials is not None else default_trials
    max_epochs = opts.max_epochs if opts.max_epochs is not None else int(space.search.get("max_epochs", 30))
    objective = opts.objective or space.search.get("objective", "val_loss")
    if tuner not in TUNERS:
        raise SearchError(f"unknown tuner {tuner!r}: use {', '.join(TUNERS)}")
    for name, value in (("--max-trials", max_trials), ("--max-epochs", max_epochs),
                        ("--max-failures", opts.max_consecutive_failed_trials),
                        ("--trials-per-worker", opts.trials_per_worker), ("--workers-per-gpu", opts.workers_per_gpu)):
        if value < 1:
            raise SearchError(f"{name} must be at least 1, not {value}")
    if not opts.max_worker_growth > 0:
        raise SearchError(f"--max-worker-growth must be a percentage above 0, not {opts.max_worker_growth}")
    if opts.test_per_class is not None and opts.test_per_class < 1 and not opts.test_data:
        raise SearchError(f"--test-per-class must be at least 1, not {opts.test_per_class}")
    operating.check_target(opts.target_sensitivity)
    if opts.figures not in FIGURES_FOR:
        raise SearchError(f"--figures {opts.figures!r}: use {' or '.join(FIGURES_FOR)}")
    return {"space": space.path.stem, "tuner": tuner, "max_trials": max_trials, "max_epochs": max_epochs,
            "objective": objective, tracking.OBJECTIVE_DIRECTION: "max" if maximise(objective) else "min",
            "seed": opts.seed, "baseline": opts.baseline, "dedupe": opts.dedupe, "precision": opts.precision,
            "test_data": opts.test_data or "", "sets": " ".join(opts.sets)}


def _check_objective(objective: str, classes: list[str]) -> None:
    """Before anything trains: the objective is a validation metric every trial reports."""
    known = [f"val_{name}" for name in metrics.names(classes)]
    if objective not in known:
        raise SearchError(f"objective {objective!r} is not a validation metric of this search; use one of "
                          + ", ".join(known))


def _prepare(opts: Options, create: bool = True) -> _Setup:
    """Check the options, scan and split the data, and compute the search's identity."""
    space = spaces.load(opts.space).pin(opts.sets)
    settings, budget = _settings(opts, space), budget_seconds(opts.budget)
    _preflight(space)
    client, experiment_id = tracking.connect(opts.tracking_uri, opts.experiment, create)
    cache_dir = Path(opts.cache_dir or tracking.STORE_DIR / "cache")
    default = space.config(space.defaults())  # the baseline's pixels come from the scan's own decode
    progress = Progress(opts.progress, None if budget and opts.max_trials is None else settings["max_trials"],
                        settings["objective"])
    dataset = data.scan(opts.data, opts.classes, cache_dir, report=progress.counter("scan"),
                        sizes=[(int(default["input_size"]), default.get("color_mode", "rgb"))])
    _check_objective(settings["objective"], dataset.classes)
    operating.check_target(opts.target_sensitivity, dataset.classes)
    test_dataset = (data.scan(opts.test_data, dataset.classes, cache_dir, report=progress.counter("test data scan"))
                    if opts.test_data else None)
    test_per_class = opts.test_per_class if opts.test_per_class is not None else int(space.fixed.get("test_per_class", 40))
    space.fixed["test_per_class"] = test_per_class  # what the trials really used, for their records
    parts = data.split(dataset, opts.seed, float(space.fixed.get("val_fraction", 0.2)), test_per_class,
                       test_dataset, opts.dedupe)
    weights = data.class_weights(dataset.labels[parts.train], len(dataset.classes))
    for line in _data_lines(dataset, parts, weights):
        progress.say(line)
    settings.update(test_per_class=test_per_class, classes="|".join(dataset.classes))
    if opts.target_sensitivity is not None:  # only then: the key of a search without one stays what it was
        settings["target_sensitivity"] = opts.target_sensitivity
    uri = tracking.store_uri(opts.tracking_uri)
    plan = trial.Plan(dataset, parts, weights, str(cache_dir), settings["objective"], opts.seed, opts.precision,
                      target_sensitivity=opts.target_sensitivity)
    return _Setup(space, settings, _search_key(space, settings, dataset, parts), client, experiment_id, uri, plan,
                  progress, budget)


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


def _data_lines(dataset: data.Dataset, parts: data.Split, weights: dict[int, float]) -> list[str]:
    """What the console says of the data: counts, layout, split, class weights, and the files skipped."""
    counts = ", ".join(f"{c} {n}" for c, n in dataset.counts().items())
    line = (f"data: {len(dataset.samples)} images ({counts}), {dataset.layout} layout; "
            f"split {len(parts.train)} train / {len(parts.val)} val / {len(parts.test)} test; class weights "
            + ", ".join(f"{dataset.classes[i]} {w:.3f}" for i, w in weights.items()))
    return [line, *data.skipped_lines(dataset, f"{tracking.SEARCH_RECORDS}/{tracking.SKIPPED}")]


def _search_key(space: spaces.Space, settings: dict, dataset: data.Dataset, parts: data.Split) -> str:
    """Identity of a search: the same command on the same files gives the same key (and resumes)."""
    h = hashlib.sha256(space.path.read_bytes())
    h.update(json.dumps([settings, dataset.fingerprint(), parts.test_dataset.fingerprint()], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:10]


def _tuner(s: _Setup, opts: Options, search_run_id: str, pools: list[Pool], directory: Path,
           project_name: str) -> Tuner:
    """The Keras Tuner tuner of this process: the oracle's own (local, chief) or the chief's over gRPC (worker)."""
    max_trials, max_epochs = s.settings["max_trials"], s.settings["max_epochs"]
    oracle = make_oracle(s.settings["tuner"], s.settings["objective"], max_trials, max_epochs, opts.seed,
                         opts.baseline, opts.max_consecutive_failed_trials, s.budget)
    oracle.keep_workers_trials = bool(opts.oracle)  # read when the tuner reloads a resumed chief's oracle
    tuner = Tuner(oracle, s.space, s.plan, max_epochs, s.client, search_run_id, pools, str(directory), project_name,
                  s.progress, recorder.Recorder(s.client, search_run_id, s.settings["objective"], s.progress,
                                                opts.figures))
    tuner.oracle.max_trials = max_trials
    return tuner


# ---------------------------------------------------------------- the search record


def _search_record(s: _Setup, out: Path) -> Path:
    """The files of the search run's record: data summary, leakage report, split manifest, skipped files, space."""
    dataset, parts, weights = s.plan.dataset, s.plan.split, s.plan.class_weights
    leakage = data.leakage(dataset, parts)
    summary = {
        "root": dataset.root, "layout": dataset.layout, "classes": dataset.classes,
        "fingerprint": dataset.fingerprint(), "test_fingerprint": parts.test_dataset.fingerprint(),
        "counts": {name: {c: int((ds.labels[idx] == i).sum()) for i, c in enumerate(dataset.classes)}
                   for name, idx, ds in parts.members(dataset)},
        "skipped": len(dataset.skipped), "class_weights": {dataset.classes[i]: w for i, w in weights.items()},
        "exact_duplicates_across_splits": leakage["exact_duplicates"],
        "near_duplicates_across_splits": leakage["near_duplicates"],
    }
    (out / tracking.DATASET).write_text(json.dumps(summary, indent=2))
    (out / tracking.LEAKAGE).write_text(json.dumps(leakage, indent=2))
    data.write_csv(data.manifest_rows(dataset, parts), out / tracking.MANIFEST)
    data.write_csv([{"file": f, "reason": r} for f, r in dataset.skipped] or [{"file": "", "reason": ""}],
                   out / tracking.SKIPPED)
    (out / s.space.path.name).write_bytes(s.space.path.read_bytes())
    return out


def _search_settings(s: _Setup) -> dict[str, Any]:
    """The search run's params: its settings, the data and the class weights."""
    dataset, parts = s.plan.dataset, s.plan.split
    return {**s.settings, "data_root": dataset.root, "data_fingerprint": dataset.fingerprint(),
            "images": len(dataset.samples), "train_images": len(parts.train), "val_images": len(parts.val),
            "test_images": len(parts.test), "skipped_files": len(dataset.skipped),
            **{f"class_weight_{data.metric_safe(dataset.classes[i])}": f"{w:.6f}"
               for i, w in s.plan.class_weights.items()}}


def _start_or_resume(s: _Setup, opts: Options, directory: Path) -> tuple[str, str, dict | None, IO]:
    """The search run: the unfinished one with these settings (its orphan trials closed), or a new one."""
    project_name, state, lock = projects.claim(directory, f"{s.space.path.stem}-{s.key}", opts.resume)
    if state:
        search_run_id = state["search_run_id"]
        tracking.get_run(s.client, search_run_id)
        if not opts.oracle:  # a chief's trials may still be training on their workers; a restarted one closes its own
            recorder.recover(s.client, directory / project_name, search_run_id, s.settings["objective"], s.progress,
                             opts.figures)
            for run_id in tracking.close_orphans(s.client, search_run_id):
                s.progress.notice(f"trial run {run_id} was in flight when the search stopped: marked KILLED, it runs "
                                  "again")
        s.progress.notice(f"resuming search {search_run_id}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            search_run_id = tracking.start_search(s.client, s.experiment_id, f"search-{s.space.path.stem}",
                                                  _search_settings(s), s.plan.dataset.fingerprint(),
                                                  _search_record(s, Path(tmp)))
        projects.write_state(directory / project_name, search_run_id, "running")
    tracking.mark_search(s.client, search_run_id, s.key, opts.oracle, s.budget)
    return search_run_id, project_name, state, lock


def _resume_command(extra: str = "") -> str:
    return " ".join(["covidsearch", *sys.argv[1:]]) + extra


# ---------------------------------------------------------------- run and work


def run(opts: Options) -> Result:
    """Run (or resume) a search and return where its results are; with opts.oracle, workers run its trials."""
    from . import distributed

    if opts.oracle:
        distributed.check_listen(opts.oracle)
    pools = [Pool(opts.trials_per_worker, 1.0 / opts.workers_per_gpu, opts.max_worker_growth)
             for _ in range(opts.workers_per_gpu)]
    if not opts.oracle:  # a chief's trials run on its workers
        for pool in pools:
            pool.prepare()
    try:
        s = _prepare(opts)
        directory = Path(opts.project_dir or tracking.STORE_DIR / "tuner")
        search_run_id, project_name, state, lock = _start_or_resume(s, opts, directory)
    except BaseException:  # bad input, or an interrupt during the scan: the workers started go too
        _close(pools)
        raise
    s.progress.say(f"search run {search_run_id} in {s.uri}")
    tuner = _tuner(s, opts, search_run_id, pools, directory, project_name)
    tuner.save()
    left = tuner.oracle.budget_left()
    if left is not None:
        s.progress.deadline = time.monotonic() + left
        s.progress.say(f"budget: {clock(left)} of {clock(s.budget)} left")
    try:
        with settled(), recorder.beside_training():  # what is alive now lives for the whole search; BLAS on 1 thread
            _search(tuner, opts, s.progress)
    except KeyboardInterrupt:
        _close(pools)
        tuner.recorder.close()
        if opts.oracle:  # the workers' trials go on: their runs stay RUNNING
            tracking.end_run(s.client, search_run_id, "KILLED", "interrupted by the user")
            raise SearchInterrupted(_resume_command(" --resume"),
                                    "the workers keep training their trials and wait for the chief") from None
        tracking.end_search(s.client, search_run_id, "KILLED", "interrupted by the user")
        raise SearchInterrupted(_resume_command(" --resume")) from None
    except RuntimeError as err:
        if "consecutive failures" not in str(err):
            raise
        tracking.end_search(s.client, search_run_id, "FAILED", str(err))
        projects.write_state(directory / project_name, search_run_id, "failed")
        raise SearchError(f"search stopped: {opts.max_consecutive_failed_trials} trials in a row failed; "
                          f"last error: {str(err).splitlines()[-1]}") from None
    finally:
        tuner.recorder.release()  # no trial is left to send: the last records are logged while the workers stop
        _close(pools)
        tuner.recorder.close()
        lock.close()
    if tuner.oracle.stop_reason:
        s.progress.notice(f"{tuner.oracle.stop_reason}: the search ends here")
    if opts.oracle:  # its workers log their last trials after it has their results
        tracking.wait_for_trials(s.client, search_run_id)
    return _finish(s, search_run_id, directory / project_name, bool(state))


def _search(tuner: Tuner, opts: Options, progress: Progress) -> None:
    """The trial loop: served to workers (chief), n trials at once, or one at a time."""
    from . import distributed

    if opts.oracle:
        distributed.serve(tuner.oracle, opts.oracle, progress)
    elif opts.workers_per_gpu > 1:
        tuner.search_in_parallel(opts.workers_per_gpu)
    else:
        tuner.search(verbose=0)


def _finish(s: _Setup, search_run_id: str, project: Path, resumed: bool) -> Result:
    """End the search run FINISHED with its best trial; no trial run stays RUNNING."""
    for run_id in tracking.close_orphans(s.client, search_run_id):
        s.progress.notice(f"trial run {run_id} was left RUNNING by a worker that was lost: marked KILLED")
    objective = s.settings["objective"]
    tracking.record_best(s.client, search_run_id, objective)
    s.client.set_terminated(search_run_id, "FINISHED")
    projects.write_state(project, search_run_id, "finished")
    best = s.client.get_run(search_run_id).data
    return Result(search_run_id, best.tags.get(tracking.BEST_TRIAL), best.metrics.get(f"{tracking.BEST}{objective}"),
                  objective, len(tracking.trial_runs(s.client, search_run_id)), resumed)


def work(opts: Options) -> WorkerResult:
    """Join the search whose chief serves its oracle at opts.oracle: run the trials it hands this worker,
    recorded as children of the chief's search run, until the chief says stop."""
    from . import distributed

    directory = Path(opts.project_dir or tracking.STORE_DIR / "tuner")
    worker_id = distributed.worker_id(opts.worker_id or projects.worker_id(directory))
    distributed.join(opts.oracle, worker_id)  # tuners built from here on ask the chief for trials
    s = _prepare(opts, create=False)
    search_run_id = _find_search(s)
    project_name = f"{s.space.path.stem}-{s.key}-{search_run_id}-{worker_id}"
    lock = projects.try_lock(directory / project_name)
    if lock is None:
        raise SearchError(f"worker {worker_id} is already running here: give this one another --worker-id")
    distributed.check_not_running(s.client, search_run_id, worker_id)
    recorder.recover(s.client, directory / project_name, search_run_id, s.settings["objective"], s.progress,
                     opts.figures)
    for run_id in tracking.close_orphans(s.client, search_run_id, worker_id=worker_id):
        s.progress.notice(f"trial run {run_id} was in flight when worker {worker_id} stopped: marked KILLED, "
                          "it runs again")
    s.progress.say(f"worker {worker_id} joins search run {search_run_id} in {s.uri} (oracle at {opts.oracle})")
    pools = [Pool(opts.trials_per_worker, max_growth=opts.max_worker_growth)]
    tuner = _tuner(s, opts, search_run_id, pools, directory, project_name)
    try:
        with settled(), recorder.beside_training():
            tuner.search(verbose=0)
    except KeyboardInterrupt:
        _close(pools)
        tuner.recorder.close()
        tracking.close_orphans(s.client, search_run_id, worker_id=worker_id)
        raise SearchInterrupted(_resume_command("" if opts.worker_id else f" --worker-id {worker_id}")) from None
    except distributed.RpcError as err:
        raise SearchError(f"the chief at {opts.oracle} failed or went away: {err.details()}") from None
    finally:
        _close(pools)
        tuner.recorder.close()
        lock.close()
    runs = tracking.trial_runs(s.client, search_run_id, worker_id=worker_id)
    return WorkerResult(search_run_id, worker_id, sum(r.info.status == "FINISHED" for r in runs))


def _find_search(s: _Setup) -> str:
    """The chief's RUNNING search run with this worker's key; when there is none, say what differs."""
    chiefs = tracking.running_chiefs(s.client, s.experiment_id)
    same = [r.info.run_id for r in chiefs if r.data.tags.get(tracking.SEARCH_KEY) == s.key]
    if len(same) == 1:
        return same[0]
    if same:
        raise SearchError(f"{len(same)} running searches have these settings ({', '.join(same)}): stop all chiefs "
                          "but one")
    if not chiefs:
        raise SearchError(f"no distributed search is running in {s.uri}: start its chief first with "
                          "`covidsearch run ... --oracle HOST:PORT` (and the same --tracking-uri and --experiment)")
    fingerprint = s.plan.dataset.fingerprint()
    theirs = [r.data.tags.get(tracking.DATA_FINGERPRINT, "?") for r in chiefs]
    if fingerprint not in theirs:
        listed = ", ".join(f"{r.info.run_id} {f[:12]}" for r, f in zip(chiefs, theirs))
        raise SearchError(f"this worker's data (fingerprint {fingerprint[:12]}) is not the running search's "
                          f"({listed}): point --data at the same images")
    raise SearchError(f"the running search {', '.join(r.info.run_id for r in chiefs)} has other settings than this "
                      "worker: give the worker the chief's space and search options")


def _close(pools: list[Pool]) -> None:
    for pool in pools:
        pool.close()
