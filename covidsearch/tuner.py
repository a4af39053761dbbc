"""The tuner runs each trial the oracle proposes: a child run in MLflow, trained by a worker process.

Keras Tuner's BaseTuner loop (ask the oracle, run the trial, report) with one extension point,
`run_trial`; `search_in_parallel` runs that loop in several threads for --workers-per-gpu.
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import keras_tuner as kt
from keras_tuner.src.engine import base_tuner

from . import spaces, tracking, trial
from .metrics import maximise
from .progress import Progress
from .recorder import Recorder
from .workers import Pool, Task


class Tuner(base_tuner.BaseTuner):
    """Keras Tuner's trial loop; each trial becomes a worker-process run and an MLflow child run."""

    def __init__(self, oracle: kt.Oracle, space: spaces.Space, plan: trial.Plan, max_epochs: int, client: Any,
                 search_run_id: str, pools: list[Pool], directory: str, project_name: str, progress: Progress,
                 recorder: Recorder):
        super().__init__(oracle, hypermodel=None, directory=directory, project_name=project_name)
        self.space, self.plan, self.max_epochs = space, plan, max_epochs
        self.client, self.search_run_id, self.progress, self.recorder = client, search_run_id, progress, recorder
        self._free: queue.Queue[Pool] = queue.Queue()  # one per trial that may run at once
        for pool in pools:
            self._free.put(pool)
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
            self.recorder.release()  # no trial to hand out now: nothing to wait for
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
                        self.recorder.release()
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
        """Record the trial's run and have a worker train it; the recorder logs its record and ends the run while the
        next trial trains. The one thing this tuner adds."""
        values = dict(kt_trial.hyperparameters.values)
        index = int(kt_trial.trial_id) + 1
        objective = self.oracle.objective.name
        recorded = tracking.trial_result(self.client, self.search_run_id, kt_trial.trial_id)
        if recorded and objective in recorded:  # finished before an interrupt that Keras Tuner did not see
            self.progress.notice(f"trial {kt_trial.trial_id} is already recorded as FINISHED: not run again")
            return recorded
        started = time.perf_counter()
        spec = self._spec(kt_trial, values, index)
        pool, notes = self._free.get(), self.recorder.notes(spec.run_id)
        try:
            with tracking.heartbeat(self.client, spec.run_id):
                reply = pool.run(Task(spec, self.plan), notes.write, sent=self.recorder.release)
        except Exception as err:  # this process failed the trial (its store, its pipe): recorded, then Keras Tuner's
            notes.settle()  # the run fails with this error, after its notes
            tracking.fail_trial(self.client, spec.run_id, f"{type(err).__name__}: {err}")
            raise
        finally:
            self._free.put(pool)
        tracking.record_worker(self.client, spec.run_id, reply)
        if reply.error is not None:
            notes.settle()  # the run fails with the trial's own error, after its notes
            tracking.fail_trial(self.client, spec.run_id, reply.error, reply.detail)
            self.progress.finished(index, kt_trial.trial_id, None, f"FAILED: {reply.error}", maximise(objective))
            raise kt.errors.FailedTrialError(reply.error)
        self.recorder.hold(spec.run_id, Path(spec.trial_dir) / tracking.PENDING, notes)
        result = reply.metrics
        text = (f"{objective} {result[objective]:.4f}{' (baseline)' if self._is_baseline(values) else ''} in "
                f"{time.perf_counter() - started:.0f} s: " + _shown(values))
        self.progress.finished(index, kt_trial.trial_id, result[objective], text, maximise(objective))
        return result

    def _spec(self, kt_trial: kt.engine.trial.Trial, values: dict[str, Any], index: int) -> trial.Spec:
        """The trial's run, created RUNNING, and what its worker needs to train it."""
        config = self.space.config(values)
        warm_start, initial_epoch = self._warm_start(values)
        baseline = self._is_baseline(values)
        run_id = tracking.start_trial(
            self.client, self.search_run_id, kt_trial.trial_id, getattr(self._thread, "tuner_id", self.tuner_id),
            baseline, config, (warm_start or "none") if "tuner/trial_id" in values else None)
        return trial.Spec(kt_trial.trial_id, run_id, config, epochs=int(values.get("tuner/epochs", self.max_epochs)),
                          initial_epoch=initial_epoch, trial_dir=self.get_trial_dir(kt_trial.trial_id),
                          warm_start=warm_start, progress=self.progress.mode, label=self.progress.trial_label(index),
                          baseline=baseline)

    def _is_baseline(self, values: dict[str, Any]) -> bool:
        return {k: v for k, v in values.items() if not k.startswith("tuner/")} == self.baseline_values

    def _warm_start(self, values: dict[str, Any]) -> tuple[str | None, int]:
        """Weights a Hyperband trial continues from and its first epoch: the previous round's checkpoint from this
        machine, else its model from MLflow (workers share no disk); with neither, it trains from epoch 0."""
        previous = values.get("tuner/trial_id")
        if previous is None:
            return None, int(values.get("tuner/initial_epoch", 0))
        path = Path(self.get_trial_dir(previous)) / tracking.KERAS_FILE
        if path.exists():
            return str(path), int(values["tuner/initial_epoch"])
        uri = tracking.trial_model(self.client, self.search_run_id, previous)
        return (uri, int(values["tuner/initial_epoch"])) if uri else (None, 0)


def _shown(values: dict[str, Any]) -> str:
    """A trial's point for the console: floats to 4 significant digits (MLflow keeps them whole)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items() if not k.startswith("tuner/"))
