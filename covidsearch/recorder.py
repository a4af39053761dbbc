"""A trial's test scores, data, figures and MLflow model, logged by the search process while the next trial trains.

Packaging the model for MLflow and drawing the four figures cost a small trial more than its epochs' setup
does, and neither they nor the test scores need the trained model in memory. So the worker saves the model once
(the trial's checkpoint, which a Hyperband round continues from), writes what the rest needs into the trial's
folder (`write`: the test predictions, the Grad-CAM sample, what the served model must know) and answers the
search at once; the search's `Recorder` thread scores the test split and logs the scores and those files (the
trial's data), and only then ends the run FINISHED, records the search's best trial and removes the folder. A
worker that dies in its next trial loses none of it, and what a killed search had not logged yet is logged first
when it resumes (`recover`).

The figures and the MLflow model (`complete`) are made at once for the trials a user looks at: each that improves
the search's best, and the baseline (or every trial, --figures every). Any other trial's are made from its logged
data when something asks for them (`complete_later`: promote, predict, evaluate, serve, report, `covidsearch
figures`): drawn for every trial, they were most of the search process's work beside a small trial's training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import threadpoolctl
from mlflow.tracking import MlflowClient

from . import FIGURES_EVERY, FIGURES_FOR, metrics, plots, serving, tracking
from .progress import Progress

def write(folder: Path, run_id: str, keras_file: Path, served: serving.Classifier, cams: plots.Cams, y_test: np.ndarray,
          test_probs: np.ndarray, history: dict[str, list[float]], val_epochs: list[dict[str, float]],
          first_epoch: int, seed: int, closing: dict[str, float], baseline: bool = False,
          notes: Sequence[tracking.Note] = ()) -> None:
    """The trial's pending record, whole or not at all: written aside, then renamed into place. The model is the
    trial's saved .keras file (its checkpoint), linked into it, not copied; `closing` (epochs trained, best epoch's
    metrics, setup seconds) is logged with the test scores, in one call off the trial's path; `notes`, those the
    worker sent, are kept for a search killed before it wrote them all (`recover`)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _link(keras_file, partial / tracking.KERAS_FILE)
    np.savez(partial / tracking.TRIAL_ARRAYS, y_test=y_test, test_probs=test_probs, images=cams.images,
             heatmaps=cams.heatmaps, labels=cams.labels, probs=cams.probs)
    record = {"run_id": run_id, "classes": served.classes, "size": served.size, "color_mode": served.color_mode,
              "threshold": served.threshold, "target": served.target, "first_epoch": first_epoch, "seed": seed,
              "history": {k: [float(v) for v in values] for k, values in history.items()},
              "val_epochs": val_epochs, "requirements": serving.requirements(), "baseline": baseline,
              "closing": closing, "notes": [dataclasses.asdict(note) for note in notes]}
    (partial / tracking.TRIAL_FACTS).write_text(json.dumps(record, default=float))  # a note's numpy floats
    shutil.rmtree(folder, ignore_errors=True)  # a record an earlier attempt of this trial left
    os.replace(partial, folder)


def _link(source: Path, link: Path) -> None:
    """A second name for the checkpoint (a copy where the file system has no hard links): the pending record then
    holds all of the trial's data, logged in one call that copies files the fast way."""
    try:
        os.link(source, link)
    except OSError:
        shutil.copy2(source, link)


def log_pending(client: MlflowClient, folder: Path, search_run_id: str, objective: str, figures: str) -> float | None:
    """A pending record logged to its run: the trial's closing metrics, the test scores with their bootstrap
    intervals and the confusion table, its data; its figures and MLflow model too if it beats the search's best or
    is its baseline, or for every trial (`figures`); and the seconds that took, in its last write, with the scores.
    Returns its score if it beats the best, else None."""
    started = time.perf_counter()
    record, arrays = _read(folder)
    run_id, classes, y_test, test_probs = record["run_id"], record["classes"], arrays["y_test"], arrays["test_probs"]
    scores = {**record["closing"], **{f"{tracking.TEST}{k}": v
                                      for k, v in metrics.evaluate(y_test, test_probs, classes).items()}}
    scores.update(metrics.interval_metrics(metrics.intervals(y_test, test_probs, classes, seed=record["seed"]),
                                           tracking.TEST))
    score = scores.get(f"{tracking.BEST}{objective}")
    try:
        tracking.log_confusion(client, run_id, metrics.confusion_table(y_test, test_probs, classes))
        best = tracking.new_best(client, search_run_id, objective, score)
        completed = best or record["baseline"] or figures == FIGURES_EVERY
        if completed:
            complete(client, folder)
        _log_data(client, run_id, folder, checkpoint=not completed)
    finally:  # a run whose files could not be logged ends FAILED, its scores kept: nothing else holds them
        scores[tracking.RECORD_SECONDS] = time.perf_counter() - started
        client.log_batch(run_id, metrics=tracking.metrics(scores))
    return score if best else None


def _log_data(client: MlflowClient, run_id: str, folder: Path, checkpoint: bool) -> None:
    """The trial's data, its checkpoint only where no MLflow model holds it already (tracking.keras_uri finds it
    in either): an InceptionV3 trial's is about 90 MB."""
    if checkpoint:
        client.log_artifacts(run_id, str(folder), tracking.TRIAL_DATA)
        return
    for path in sorted(folder.iterdir()):
        if path.name != tracking.KERAS_FILE:
            client.log_artifact(run_id, str(path), tracking.TRIAL_DATA)


def complete(client: MlflowClient, folder: Path) -> str:
    """A trial's four figures and its MLflow model (the pyfunc serving.Classifier, what promote registers and
    `mlflow models serve` runs), made from its record or its logged data; returns the model's id."""
    record, arrays = _read(folder)
    run_id, classes, y_test, test_probs = record["run_id"], record["classes"], arrays["y_test"], arrays["test_probs"]
    cams = plots.Cams(arrays["images"], arrays["heatmaps"], arrays["labels"], arrays["probs"])
    with tempfile.TemporaryDirectory() as tmp:
        drawing = time.perf_counter()
        plots.write_trial_figures(Path(tmp), y_test, test_probs, classes, record["history"], record["val_epochs"],
                                  record["first_epoch"], cams)
        client.log_metric(run_id, tracking.FIGURES_SECONDS, time.perf_counter() - drawing)
        client.log_artifacts(run_id, tmp, tracking.FIGURES)
    served = serving.Classifier(classes, record["size"], record["color_mode"], record["threshold"], record["target"])
    uri = tracking.log_model(client, run_id, folder / tracking.KERAS_FILE, served, record["requirements"])
    return uri.removeprefix("models:/")


def complete_later(client: MlflowClient, run: Any) -> str | None:
    """A finished trial's figures and MLflow model made now from its logged data, for a trial that has no model yet
    (its search left them for later: it did not beat the best); returns the model's id, None for a run without
    trial data (one recorded before there were any, or that did not finish)."""
    if tracking.checkpoint_uri(client, run) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run.info.run_id, tracking.TRIAL_DATA, tmp))
        return complete(client, folder)


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A record's facts and arrays."""
    with np.load(folder / tracking.TRIAL_ARRAYS) as arrays:
        return _facts(folder), dict(arrays)


def _facts(folder: Path) -> dict[str, Any]:
    """A record's facts alone: what its run, its model and its notes need, without the arrays."""
    return json.loads((folder / tracking.TRIAL_FACTS).read_text())


def _upgrade(folder: Path, logged: dict[str, float]) -> None:
    """A pending record rewritten in today's form where an older version (killed, then upgraded, then
    resumed) left it: that named the checkpoint instead of linking it, and had no baseline flag (its baseline gets
    figures on request); the oldest had no closing metrics, which their workers had `logged` to the run themselves
    (its best epoch's are what says whether it beats the search's best)."""
    record = _facts(folder)
    if "keras_file" in record or "baseline" not in record or "closing" not in record:
        old_checkpoint = Path(record.pop("keras_file", ""))
        if old_checkpoint.is_file() and not (folder / tracking.KERAS_FILE).exists():
            _link(old_checkpoint, folder / tracking.KERAS_FILE)
        record.setdefault("baseline", False)
        record.setdefault("closing", {k: v for k, v in logged.items() if k.startswith(tracking.BEST)})
        (folder / tracking.TRIAL_FACTS).write_text(json.dumps(record))


def finish(client: MlflowClient, run_id: str, folder: Path, progress: Progress, search_run_id: str, objective: str,
           figures: str = FIGURES_FOR[0], notes: Notes | None = None) -> bool:
    """Log the pending record and end its run FINISHED, then name it the search's best if it is, and drop the record;
    a record that cannot be logged fails its run, said on the console, and the search goes on. The trial's `notes`,
    if still being written, are waited for first (a run FINISHED has all its epochs); with none (a killed search's
    record, on resume), those in the record that its run lacks are written first. A note the store cannot take fails
    the run as the record would. An interrupt leaves it for `recover`. Returns whether the run finished."""
    try:
        if notes is not None:
            notes.wait()
        else:
            _write_unwritten(client, run_id, folder)
        score = log_pending(client, folder, search_run_id, objective, figures)  # None unless it beats the best
    except Exception as err:  # the trial trained and was scored: one failed upload must not end the search
        tracking.fail_trial(client, run_id, f"its record could not be logged: {type(err).__name__}: {err}")
        progress.notice(f"trial run {run_id}: its record could not be logged ({err}): marked FAILED")
        shutil.rmtree(folder, ignore_errors=True)
        return False
    tracking.finish_trial(client, run_id)
    if score is not None:
        tracking.note_best(client, search_run_id, objective, run_id, score)
    shutil.rmtree(folder, ignore_errors=True)
    return True


class Notes:
    """A trial's notes (its epochs), written as they come by the search's notes thread (`Recorder.notes`), not by
    the thread that waits for its worker: at normal priority each took about 13 ms of CPU (some 60 in a 20-trial
    search) from the cores the training needed."""

    def __init__(self, thread: ThreadPoolExecutor, write: Callable[[tracking.Note], None]):
        self._thread, self._write = thread, write
        self._pending: list[Future] = []

    def write(self, note: tracking.Note) -> None:
        """Queue a note, raising the error of an earlier one that could not be written: its trial then stops instead
        of training on for a store that takes nothing."""
        for future in [f for f in self._pending if f.done()]:
            future.result()
            self._pending.remove(future)
        self._pending.append(self._thread.submit(self._write, note))

    def settle(self) -> None:
        """Return once every note is written or has failed: a run that ends then has nothing land after it."""
        futures.wait(self._pending)

    def wait(self) -> None:
        """settle(), then raise the error of a note that could not be written."""
        self.settle()
        for future in self._pending:
            future.result()


class Recorder:
    """What the search process logs beside the training: the trials' pending records, in the order they came, on an
    idle-priority thread, and their notes as they come (`notes`). A record is held until the search has handed its
    next trial to a worker (`release`): logged at once, it would take the interpreter lock from the search's own
    thread, in slices, while that thread creates the next trial's run and sends it, and the worker would wait."""

    def __init__(self, client: MlflowClient, search_run_id: str, objective: str, progress: Progress,
                 figures: str = FIGURES_FOR[0]):
        self.client, self.search_run_id, self.objective, self.progress = client, search_run_id, objective, progress
        self.figures = figures  # --figures: whose figures and MLflow model are made at once
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidsearch-recorder",
                                          initializer=_yield_to_training)
        self._notes_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidsearch-notes",
                                         initializer=_behind_training)
        self._held: list[tuple[str, Path, Notes | None]] = []
        self._queued: list[Future] = []
        self._lock = threading.Lock()

    def hold(self, run_id: str, folder: Path, notes: Notes | None = None) -> None:
        """Keep the trial's pending record until `release`; its run ends FINISHED once it and its `notes` are in."""
        with self._lock:
            self._held.append((run_id, folder, notes))

    def release(self) -> None:
        """Log the records held so far, in the background: the search has sent its next trial, or has none to send."""
        with self._lock:
            held, self._held = self._held, []
            self._queued = [f for f in self._queued if not f.done()]
            self._queued += [self._thread.submit(self._record, *record) for record in held]

    def notes(self, run_id: str) -> Notes:
        """A trial's notes, to be written as they come; its record, held, waits for them (a killed search's record
        brings those it had not written: `recover`)."""
        return Notes(self._notes_thread, tracking.writer(self.client, run_id))

    def _record(self, run_id: str, folder: Path, notes: Notes | None) -> None:
        finish(self.client, run_id, folder, self.progress, self.search_run_id, self.objective, self.figures, notes)

    def close(self) -> None:
        """Log every record held and wait until all are in (an interrupt leaves the rest on disk, for `recover`)."""
        self.release()
        with self._lock:
            queued = list(self._queued)
        if any(not f.done() for f in queued):
            self.progress.say("logging the last trials' records")
        for future in queued:
            future.result()
        self._thread.shutdown()
        self._notes_thread.shutdown()


def _write_unwritten(client: MlflowClient, run_id: str, folder: Path) -> None:
    """The notes of a record's trial that its search, killed, had not written yet (it writes them in the
    background, `Recorder.notes`), from the pending record in `folder`: a note whose first metric is in the run at its
    step is in, metrics and tags; one with tags only is written again, which changes nothing."""
    steps: dict[str, set[int]] = {}
    for note in [tracking.Note(**note) for note in _facts(folder).get("notes", [])]:
        key = next((k for k, v in note.metrics.items() if v is not None and math.isfinite(v)), None)
        if key is not None and key not in steps:
            steps[key] = {metric.step for metric in client.get_metric_history(run_id, key)}
        if key is None or note.step not in steps[key]:
            tracking.log_note(client, run_id, note)


def _yield_to_training() -> None:
    """The recorder thread under Linux's SCHED_IDLE policy (a thread's own): it then runs on what the trial's training
    leaves idle (about half a core of two here), and a training thread that wakes takes its core back at once (the
    workers share the search's session for this: workers.Pool._start)."""
    if sys.platform.startswith("linux"):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def _behind_training() -> None:
    """The notes thread at nice 19: it takes little more from the training than the recorder's idle thread does, but
    it is never starved, so that on cores the training keeps busy each epoch is in the store within about a second
    for whoever watches the curves (measured beside two busy processes: a 13 ms note a second at nice 19, one in 4 s
    under SCHED_IDLE)."""
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@contextlib.contextmanager
def beside_training() -> Iterator[None]:
    """The search process's BLAS held to one thread while its trials train: its numpy work (a record's bootstrap
    intervals, its figures) is too small to gain from a second thread, and OpenBLAS's second thread spun after each
    call, at full priority, on the core the training needed (1.6 s of a 20-trial search's CPU, as much as the
    recorder's own work at idle priority)."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def recover(client: MlflowClient, project: Path, search_run_id: str, objective: str, progress: Progress,
            figures: str = FIGURES_FOR[0]) -> list[str]:
    """Log the records a killed search left in its project's trial folders, before the search resumes: their runs
    end FINISHED, so their trials are not trained again. A half-written record is dropped (its trial runs again).
    Returns the runs finished."""
    for partial in project.glob(f"trial_*/{tracking.PENDING}.partial"):
        shutil.rmtree(partial)
    left = sorted(project.glob(f"trial_*/{tracking.PENDING}"))
    recovered = []
    for folder in left:
        run_id = _facts(folder)["run_id"]
        run = tracking.get_run(client, run_id)
        if run.info.status == "FINISHED":  # logged, then killed before the clean-up
            shutil.rmtree(folder)
            continue
        _upgrade(folder, run.data.metrics)
        if finish(client, run_id, folder, progress, search_run_id, objective, figures):
            progress.notice(f"trial run {run_id}: its record, not yet logged when the search stopped, is logged now")
            recovered.append(run_id)
    if left:  # a run killed between FINISHED and being named best is named now
        tracking.record_best(client, search_run_id, objective)
    return recovered
