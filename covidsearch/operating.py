"""The clinical operating point: from which COVID-19 probability a model calls COVID-19.

argmax weighs a missed COVID-19 case and a false alarm alike. A screening rule instead fixes the
COVID-19 sensitivity it must reach: the highest threshold t on p(COVID-19) whose rule "COVID-19
if p >= t, else the likeliest other class" catches at least that share of the *validation*
split's COVID-19 images (metrics.operating_threshold). The test split, never used to choose t,
then says what the rule costs: its sensitivity, specificity and accuracy there, with 95%
intervals. The model carries t (serving.Classifier), so `predict`, `evaluate` and `serve` apply it.

Trials find t when the search has --target-sensitivity (trial.py), ensembles when they have one
(ensembles.py), and `promote RUN_ID --target-sensitivity T` for any finished trial: it logs the
trial's model again with t (tracking.MODEL_AT_OP) and registers that.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from . import DEFAULT_ALIAS, DEFAULT_NAME, UserError, data, inference, metrics, registry, serving, text, tracking

COVID = data.COVID


class OperatingPointError(UserError, ValueError):
    """A target sensitivity that cannot be used; shown as a one-line error."""


@dataclass(frozen=True)
class Point:
    """A target sensitivity, the threshold reaching it on validation (None: none does) and the rule's test scores."""

    target: float
    threshold: float | None
    test: dict[str, float]  # test_sensitivity_covid_19_at_op, ... and their intervals; empty without a threshold

    def metrics(self) -> dict[str, float]:
        """What a run logs as metrics: the threshold and the rule's test scores."""
        return {} if self.threshold is None else {tracking.COVID_THRESHOLD: self.threshold, **self.test}

    def tags(self) -> dict[str, str]:
        """What a run or version is tagged with: the target, and whether a threshold reached it."""
        return {tracking.TARGET_SENSITIVITY: f"{self.target:g}",
                tracking.THRESHOLD_REACHED: str(self.threshold is not None).lower()}

    def note(self) -> tracking.Note:
        """What a trial's or ensemble's run records of it."""
        return tracking.Note(self.metrics(), tags=self.tags())

    def line(self) -> str:
        """One console line: the threshold and what it scores on test, or that none reached the target."""
        if self.threshold is None:
            return (f"no {COVID} threshold reaches sensitivity {self.target:g} on validation (it has no {COVID} "
                    "image): argmax kept")
        sens, spec = (f"{tracking.TEST}{kind}_{data.metric_safe(COVID)}{tracking.AT_OP}"
                      for kind in ("sensitivity", "specificity"))
        shown = {name: text.estimate(self.test.get(name), tracking.interval(self.test, name)) for name in (sens, spec)}
        return (f"{COVID} called from p >= {self.threshold:.4g} (operating point for sensitivity {self.target:g} on "
                f"validation): test sensitivity {shown[sens]}, specificity {shown[spec]}")


def check_target(target: float | None, classes: Sequence[str] | None = None) -> None:
    """Refuse a target outside (0, 1], or one for classes without COVID-19, before anything is recorded."""
    if target is None:
        return
    if not (math.isfinite(target) and 0 < target <= 1):
        raise OperatingPointError(f"--target-sensitivity must be in (0, 1], e.g. 0.97, not {target:g}")
    if classes is not None and COVID not in classes:
        raise OperatingPointError(f"--target-sensitivity needs a {COVID} class; the classes are {', '.join(classes)}")


def find(target: float, y_val: np.ndarray, val_probs: np.ndarray, y_test: np.ndarray, test_probs: np.ndarray,
         classes: list[str], seed: int = 28) -> Point:
    """The threshold reaching `target` on the validation predictions, scored on the test ones."""
    threshold = metrics.operating_threshold(y_val, val_probs, classes, target, COVID)
    if threshold is None:
        return Point(target, None, {})
    scored = metrics.operating_metrics(y_test, test_probs, classes, threshold, COVID, seed)
    return Point(target, threshold, {f"{tracking.TEST}{k}": v for k, v in scored.items()})


def on_search(client: MlflowClient, model: Any, classes: list[str], search_run_id: str, target: float,
              seed: int) -> Point:
    """A Keras model's operating point on a search's validation split, scored on the search's test split."""
    size, mode = int(model.input_shape[1]), "grayscale" if model.input_shape[-1] == 1 else "rgb"

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        pixels, labels = inference.split_pixels(client, search_run_id, name, classes, size, mode)
        return labels, np.asarray(model.predict(pixels, batch_size=64, verbose=0), dtype=np.float64)

    return find(target, *split("val"), *split("test"), classes, seed)


def _operating(name: str) -> bool:
    """Whether a recorded metric or tag belongs to an operating point (a trial's own, replaced on promote)."""
    return tracking.AT_OP in name or name in (tracking.COVID_THRESHOLD, tracking.TARGET_SENSITIVITY,
                                              tracking.THRESHOLD_REACHED)


def promote(client: MlflowClient, run_id: str, target: float, name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS,
            require: Sequence[str] = ()) -> tuple[registry.Promotion, Point]:
    """Register a finished trial's model with the threshold reaching `target` on its search's validation split,
    tagged with it and the rule's test scores (gates may name them: test_sensitivity_covid_19_at_op>=0.95), and give
    it the alias; every check runs before anything is written."""
    check_target(target)
    trial = registry.finished_trial(client, run_id)
    if trial.search is None:
        raise registry.RegistryError(f"run {run_id} has no search run: its validation split is unknown")
    loaded = inference.load(run_id, client.tracking_uri)
    check_target(target, loaded.classes)
    point = on_search(client, loaded.model, loaded.classes, trial.search.info.run_id, target,
                      int(trial.search.data.params.get("seed", 28)))
    if point.threshold is None:
        raise registry.RegistryError(f"run {run_id}: {point.line()}; promote it without --target-sensitivity")
    scores = {**{k: v for k, v in trial.test_metrics.items() if not _operating(k)}, **point.test}
    registry.check_gates(scores, require, f"run {run_id}")
    tags = {**{k: v for k, v in trial.version_tags().items() if not _operating(k)}, **point.tags(),
            **{k: repr(v) for k, v in point.metrics().items()}}

    def relogged() -> str:
        served = serving.Classifier.of(loaded.model, loaded.classes, point.threshold, target)
        return tracking.log_keras(client, run_id, loaded.model, served, serving.requirements(), tracking.MODEL_AT_OP)

    def same(version: Any) -> bool:  # a version of this run that carries a threshold for this target
        return (version.tags.get(tracking.TARGET_SENSITIVITY) == f"{target:g}"
                and version.tags.get(tracking.THRESHOLD_REACHED) == "true")

    return registry.register(client, trial, relogged, tags, same, name, alias), point
