"""Oracles propose the points: Keras Tuner's random, Bayesian and Hyperband search, the tutorial first.

The oracle keeps the search state on disk (so a killed search resumes) and, on a chief, serves it to
the workers; `make_oracle` is the one place an oracle is chosen.
"""
from __future__ import annotations

import time
from typing import Any

import keras_tuner as kt
from keras_tuner.src import config as kt_config

from . import SearchError
from .metrics import maximise
from .progress import clock

TUNERS = ("hyperband", "random", "bayesian")
kt_config.DEBUG = False  # failed trials are reported once, by covidsearch, not as tracebacks


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


class _Budgeted:
    """Oracle mixin for --budget: no trial starts whose estimated time would end past the budget, so none is cut
    mid-way. The time spent is part of the oracle's saved state: a resumed search has what is left, and the time
    it was stopped does not count. The first trial always runs: it is where the estimate starts."""

    budget: float | None = None  # seconds, over the whole search
    budget_epochs = 1  # a trial's epochs when the oracle does not set them (random, Bayesian: max_epochs)
    stop_reason: str | None = None  # why the budget ended the search, for the console

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._spent, self._ticked = 0.0, None  # seconds spent; when last counted (None: not yet)
        self._rates: dict[str, list[float]] = {}  # seconds per epoch of completed trials, by input size
        self._started: dict[str, float] = {}  # when each trial in flight started

    def _budget_tick(self) -> float:
        """Seconds of the budget spent, counting up to now."""
        now = time.monotonic()
        self._spent += now - (self._ticked if self._ticked is not None else now)
        self._ticked = now
        return self._spent

    def budget_left(self) -> float | None:
        return None if self.budget is None else max(self.budget - self._budget_tick(), 0.0)

    def _epochs(self, trial: kt.engine.trial.Trial) -> int:
        values = trial.hyperparameters.values
        return int(values.get("tuner/epochs", self.budget_epochs)) - int(values.get("tuner/initial_epoch", 0))

    def estimate(self, trial: kt.engine.trial.Trial) -> float | None:
        """The trial's seconds at the slowest rate per epoch of the completed trials of its input size (of any
        size when none has it yet): early stopping and smaller inputs only make trials shorter than that."""
        size = str(trial.hyperparameters.values.get("input_size"))
        known = self._rates.get(size) or [rate for same in self._rates.values() for rate in same]
        return max(known) * self._epochs(trial) if known else None

    @kt.synchronized
    def create_trial(self, tuner_id: str) -> kt.engine.trial.Trial:
        if self.budget is None or tuner_id in self.ongoing_trials:
            return super().create_trial(tuner_id)
        left, need = self.budget_left(), None
        if left > 0 or not self.trials:  # the first trial runs however long setting up took
            trial = super().create_trial(tuner_id)
            if trial.status != kt.engine.trial.TrialStatus.RUNNING:
                return trial
            need = self.estimate(trial)
            if need is None or need <= left:
                self._started[trial.trial_id] = time.monotonic()
                return trial
            del self.ongoing_trials[tuner_id]  # handed back: a resume with more budget runs it first
            self._retry_queue.append(trial.trial_id)
            self.save()
        self.stop_reason = (f"budget: {clock(self._spent)} of {clock(self.budget)} spent"
                            + ("" if need is None else f"; the next trial (about {clock(need)}) would not fit"))
        self.tuner_ids.discard(tuner_id)
        return kt.engine.trial.Trial(self.hyperparameters.copy(), status=kt.engine.trial.TrialStatus.STOPPED)

    @kt.synchronized
    def end_trial(self, trial: kt.engine.trial.Trial) -> None:
        started = self._started.pop(trial.trial_id, None)
        super().end_trial(trial)
        ended = self.trials[trial.trial_id]
        if started is not None and ended.status == kt.engine.trial.TrialStatus.COMPLETED:
            size = str(ended.hyperparameters.values.get("input_size"))
            self._rates.setdefault(size, []).append((time.monotonic() - started) / max(self._epochs(ended), 1))
            self.save()

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "budget_spent": self._budget_tick(), "budget_rates": self._rates}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._spent, self._ticked = float(state.get("budget_spent", 0.0)), time.monotonic()
        self._rates = {size: list(rates) for size, rates in state.get("budget_rates", {}).items()}


class RandomOracle(_BaselineFirst, _Budgeted, _KeepsWorkersTrials, kt.oracles.RandomSearchOracle):
    """Random search, tutorial first."""


class BayesianOracle(_BaselineFirst, _Budgeted, _KeepsWorkersTrials, kt.oracles.BayesianOptimizationOracle):
    """Gaussian-process Bayesian optimisation, tutorial first."""


class HyperbandOracle(_BaselineFirst, _Budgeted, _KeepsWorkersTrials, kt.oracles.HyperbandOracle):
    """Hyperband, tutorial first, trained as the tutorial was (max_epochs, early stopping) and outside the
    brackets: in the first bracket it would get a few epochs and understate the tutorial it stands for."""

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        defaults = self._default_values()
        if self.baseline and not self._duplicate(defaults):
            values = {**defaults, "tuner/epochs": self.max_epochs, "tuner/initial_epoch": 0}
            return {"status": "RUNNING", "values": values}
        return super().populate_space(trial_id)


def make_oracle(tuner: str, objective: str, max_trials: int, max_epochs: int, seed: int, baseline: bool,
                max_failures: int, budget: float | None = None) -> kt.Oracle:
    """The Keras Tuner oracle for --tuner, stopping after max_trials trials or when the budget (seconds) ends;
    with a budget, Hyperband starts a new iteration of its brackets for as long as the budget lasts."""
    goal = kt.Objective(objective, "max" if maximise(objective) else "min")
    common = {"objective": goal, "seed": seed, "max_consecutive_failed_trials": max_failures}
    if tuner == "hyperband":
        oracle = HyperbandOracle(max_epochs=max_epochs, factor=3, hyperband_iterations=1 if budget is None else 1000,
                                 **common)
        oracle.max_trials = max_trials
    elif tuner == "random":
        oracle = RandomOracle(max_trials=max_trials, **common)
    elif tuner == "bayesian":
        oracle = BayesianOracle(max_trials=max_trials, **common)
    else:
        raise SearchError(f"unknown tuner {tuner!r}: use {', '.join(TUNERS)}")
    oracle.baseline, oracle.budget, oracle.budget_epochs = baseline, budget, max_epochs
    oracle.verbose = 0  # covidsearch shows its own progress; Keras Tuner's trial tables would repeat it
    return oracle
