"""An ensemble champion: the mean class probabilities of a search's K best finished trials, as one model.

`covidsearch ensemble [SEARCH] --top K` takes the K best FINISHED trials by the search's validation
objective (the leaderboard's order) and builds ONE Keras model: uint8 pixels at the largest member
input size in, resized inside for each smaller member (keras.layers.Resizing, antialiased as PIL's
bilinear resize of a file is, and rounded to whole grey levels), the members' probabilities averaged
out. It is scored on the search's test split with every metric a trial has (intervals, confusion
table, the operating point with --target-sensitivity) and logged in a child run of the search
tagged kind=ensemble, as the same serving.Classifier pyfunc a trial logs: `promote`, `predict`,
`evaluate` and `serve` take its run id like any trial's.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from mlflow.tracking import MlflowClient

from . import UserError, data, inference, metrics, operating, registry, serving, text, tracking

SHOWN = ("accuracy", f"sensitivity_{data.metric_safe(data.COVID)}", f"specificity_{data.metric_safe(data.COVID)}",
         "macro_f1", "auc")  # the metrics shown beside the best member's, each with its interval


class EnsembleError(UserError, ValueError):
    """An ensemble that cannot be built from this search; shown as a one-line error."""


@dataclass(frozen=True)
class Member:
    """One trial of the ensemble: its run, Keras model and recorded metrics."""

    run_id: str
    trial: str  # Keras Tuner's trial id
    model: Any  # keras.Model taking uint8 pixels of its own input size
    metrics: dict[str, float]

    @property
    def size(self) -> int:
        return int(self.model.input_shape[1])

    @property
    def color_mode(self) -> str:
        return "grayscale" if self.model.input_shape[-1] == 1 else "rgb"


@dataclass(frozen=True)
class Ensemble:
    """A logged ensemble: its run, members (best first) and test scores."""

    run_id: str
    search_run_id: str
    members: list[Member]
    metrics: dict[str, float]  # test_ metrics and their intervals, as logged
    point: operating.Point | None  # with --target-sensitivity
    best_point: operating.Point | None  # the best member's own, at the same target: the fair comparison


def members(client: MlflowClient, search_run_id: str, top: int) -> list[Member]:
    """The `top` best FINISHED trials of the search by its validation objective, with their models."""
    if top < 2:
        raise EnsembleError(f"--top must be at least 2, not {top}: one trial is its own model")
    rows = [r for r in tracking.leaderboard(client, search_run_id)
            if r["status"] == "FINISHED" and r["objective"] is not None]
    if len(rows) < top:
        raise EnsembleError(f"search {search_run_id} has {len(rows)} finished trial(s): --top {top} needs as many")
    chosen = []
    for row in rows[:top]:
        trial = registry.finished_trial(client, row["run_id"])
        chosen.append(Member(row["run_id"], row["trial"], tracking.load_keras(f"models:/{trial.model_id}"),
                             dict(trial.run.data.metrics)))
    modes = {m.color_mode for m in chosen}
    if len(modes) > 1:
        raise EnsembleError(f"the top {top} trials of search {search_run_id} mix colour modes ({', '.join(modes)}): "
                            "one model takes one kind of pixels")
    return chosen


def model(chosen: list[Member]) -> keras.Model:
    """One model: uint8 pixels at the largest member's input size in, the members' mean probabilities out."""
    size = max(m.size for m in chosen)
    pixels = keras.Input((size, size, data.channels(chosen[0].color_mode)), dtype="uint8", name="image")
    outputs = []
    for i, member in enumerate(chosen):
        x = pixels
        if member.size != size:
            x = keras.layers.Resizing(member.size, member.size, antialias=True, name=f"resize_{i}")(x)
            x = keras.layers.Rescaling(1.0, offset=0.5, name=f"round_{i}")(x)  # the member's uint8 input truncates
        outputs.append(keras.Model(member.model.input, member.model.output, name=f"member_{i}")(x))
    mean = keras.layers.Average(dtype="float32", name="probabilities")(outputs)
    return keras.Model(pixels, mean, name="covidsearch_ensemble")


def build(client: MlflowClient, search_run_id: str, top: int = 3, target: float | None = None) -> Ensemble:
    """Average the search's `top` best trials, score that on its test split (and find its operating point on its
    validation split), and log it as the search's child run; every check runs before anything is written."""
    operating.check_target(target)
    chosen = members(client, search_run_id, top)
    search = tracking.get_run(client, search_run_id).data.params
    classes, seed = search["classes"].split("|"), int(search.get("seed", 28))
    operating.check_target(target, classes)
    ensemble = model(chosen)
    pixels, y_test = inference.split_pixels(client, search_run_id, "test", classes, int(ensemble.input_shape[1]),
                                            chosen[0].color_mode)
    probs = np.asarray(ensemble.predict(pixels, batch_size=64, verbose=0), dtype=np.float64)
    scores = {**{f"{tracking.TEST}{k}": v for k, v in metrics.evaluate(y_test, probs, classes).items()},
              **metrics.interval_metrics(metrics.intervals(y_test, probs, classes, seed=seed), tracking.TEST)}
    points = [None if target is None else operating.on_search(client, m, classes, search_run_id, target, seed)
              for m in (ensemble, chosen[0].model)]
    run_id = _record(client, search_run_id, chosen, ensemble, classes, scores,
                     metrics.confusion_table(y_test, probs, classes), points[0])
    return Ensemble(run_id, search_run_id, chosen, scores, *points)


def _record(client: MlflowClient, search_run_id: str, chosen: list[Member], ensemble: keras.Model, classes: list[str],
            scores: dict[str, float], table: dict[str, list], point: operating.Point | None) -> str:
    """The ensemble's FINISHED child run of the search: its members, scores, confusion table and model."""
    settings = {"top": len(chosen), "input_size": int(ensemble.input_shape[1]), "color_mode": chosen[0].color_mode,
                "member_input_sizes": ",".join(str(m.size) for m in chosen)}
    run_id = tracking.start_ensemble(client, search_run_id, [m.run_id for m in chosen], settings)
    write = tracking.writer(client, run_id)
    try:
        write(tracking.Note(scores))
        tracking.log_confusion(client, run_id, table)
        if point is not None:
            write(point.note())
        served = (serving.Classifier.of(ensemble, classes) if point is None else
                  serving.Classifier.of(ensemble, classes, point.threshold, point.target))
        tracking.log_keras(client, run_id, ensemble, served, serving.requirements())
    except Exception as err:  # the run says why it has no model, then the error goes on to the user
        tracking.end_run(client, run_id, "FAILED", f"{type(err).__name__}: {err}", traceback.format_exc())
        raise
    tracking.end_run(client, run_id, "FINISHED")
    return run_id


def summary(found: Ensemble) -> str:
    """The ensemble's test scores with their 95% intervals beside the best member's, and how to promote it."""
    best = found.members[0]
    sizes = ", ".join(f"trial {m.trial} {m.size} px" for m in found.members)
    lines = [f"ensemble run {found.run_id} of search {found.search_run_id}: mean probabilities of the top "
             f"{len(found.members)} trials ({sizes})", ""]
    names = [*SHOWN, *(f"{n}{tracking.AT_OP}" for n in SHOWN[:3])] if found.point else list(SHOWN)
    ours = {**found.metrics, **(found.point.test if found.point else {})}
    theirs = {**{k: v for k, v in best.metrics.items() if tracking.AT_OP not in k},  # its own search's target's
              **(found.best_point.test if found.best_point else {})}  # its point at this target instead
    rows = [["test metric", "ensemble [95% CI]", f"best member, trial {best.trial} [95% CI]"]]
    for name in names:
        key = f"{tracking.TEST}{name}"
        rows.append([name, *(text.estimate(v.get(key), tracking.interval(v, key)) for v in (ours, theirs))])
    lines.append(text.table(rows))
    if found.point and found.best_point:
        lines += ["", f"ensemble: {found.point.line()}", f"best member: {found.best_point.line()}"]
    return "\n".join([*lines, "", f"promote it: covidsearch promote {found.run_id}"])
