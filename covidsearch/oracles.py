"""Oracles propose the points: Keras Tuner's random, Bayesian and Hyperband search, the tutorial first.

The oracle keeps the search state on disk (so a killed search resumes) and, on a chief, serves it to
the workers; `make_oracle` is the one place an oracle is chosen.
"""
from __future__ import annotations

from typing import Any

import keras_tuner as kt
from keras_tuner.src import config as kt_config

from . import SearchError

TUNERS = ("hyperband", "random", "bayesian")
kt_config.DEBUG = False  # failed trials are reported once, by covidsearch, not as tracebacks


def maximise(objective: str) -> bool:
    """Losses are minimised, every other metric (accuracy, sensitivity, F1, AUC) maximised."""
    return not objective.endswith("loss")


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
    goal = kt.Objective(objective, "max" if maximise(objective) else "min")
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
