"""Promote a trial's model to the MLflow model registry, then evaluate and predict with any model.

Promotion uses MLflow 3 LoggedModels and aliases (stages are deprecated): the trial's logged
model becomes a version of a registered model (once per run), the alias (default
`covid-cxr@champion`) moves to it, and the version is tagged with what it was chosen on.

Undo: the version that held the alias keeps its tags plus `<alias>.demoted_at` and
`<alias>.replaced_by`; the new holder gets `<alias>.previous_version`. `promote --version N`
moves the alias back to version N (the promote command prints that line for every move).

A model reference (`locate`) is a trial run id, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a
`.keras` file. Models take uint8 pixels and scale inside, so input size and colour mode come from
the model itself and the class names from the version's `classes` tag (or the trial's search run).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from . import DEFAULT_ALIAS, DEFAULT_NAME, UserError, data, metrics, tracking

MODEL_NAME = "model"  # the name trial.py logs each trial's model under
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
EIGHT = ("loss", "accuracy", "tp", "fp", "tn", "fn", "precision", "recall")
GATE = re.compile(r"\s*([\w.\-/]+)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


class RegistryError(UserError, ValueError):
    """A promotion, evaluation or prediction that cannot be done; shown as a one-line error."""


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """A client on the store without creating anything: a missing local store is an error, not a new one."""
    uri = tracking.store_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise RegistryError(f"no MLflow store at {uri}: run a search first, or pass --tracking-uri")
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


# ---------------------------------------------------------------- trials and gates


@dataclass(frozen=True)
class Trial:
    """A finished trial run with what a registered version records about it."""

    run: Any  # mlflow.entities.Run
    model_id: str
    search: Any | None  # the parent search run

    @property
    def test_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.run.data.metrics.items() if k.startswith("test_")}

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Trials carry no class list: their search run's `classes` param does."""
        classes = self.search.data.params.get("classes") if self.search else None
        return tuple(classes.split("|")) if classes else None

    def version_tags(self) -> dict[str, str]:
        """Why this version was chosen, readable without the tracking runs: metrics, settings, data, classes."""
        tags = {"trial_run_id": self.run.info.run_id, "model_id": self.model_id,
                **{k: repr(v) for k, v in self.test_metrics.items()},
                **{f"hp.{k}": v for k, v in self.run.data.params.items()}}
        if self.search:
            found = self.search.data
            tags["search_run_id"] = self.search.info.run_id
            tags.update({k: v for k, v in (("data_fingerprint", found.tags.get("data_fingerprint")),
                                           ("classes", "|".join(self.classes or ()))) if v})
        return tags


def _run(client: MlflowClient, run_id: str) -> Any:
    """The run, or a one-line error naming the id and the store."""
    try:
        return tracking.get_run(client, run_id)
    except tracking.StoreError as err:
        raise RegistryError(str(err)) from None


def _logged_model_id(client: MlflowClient, run: Any) -> str | None:
    """The READY logged model the trial saved, if any (a failed trial usually has none)."""
    found = client.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_NAME}'"))
    ready = [m for m in found if m.status == "READY"]
    return ready[0].model_id if ready else None


def _parent(client: MlflowClient, run: Any) -> Any | None:
    """The search run a trial is nested under: it holds the class list and the data fingerprint."""
    parent_id = run.data.tags.get("mlflow.parentRunId")
    return _run(client, parent_id) if parent_id else None


def finished_trial(client: MlflowClient, run_id: str) -> Trial:
    """The trial behind run_id, refusing anything that is not a FINISHED trial with a model and test metrics."""
    run = _run(client, run_id)
    kind = run.data.tags.get("covidsearch_kind")
    if kind != "trial":
        raise RegistryError(f"run {run_id} is {'a ' + kind if kind else 'not a covidsearch'} run, not a trial: "
                            "pick one of the trials listed by `covidsearch runs`")
    if run.info.status != "FINISHED":
        error = run.data.tags.get("error", "").splitlines()
        raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED: only a finished trial's model can be used"
                            + (f" (its error: {error[0][:200]})" if error else ""))
    model_id = _logged_model_id(client, run)
    if model_id is None:
        raise RegistryError(f"run {run_id} has no logged model named {MODEL_NAME!r}")
    trial = Trial(run, model_id, _parent(client, run))
    if not trial.test_metrics:
        raise RegistryError(f"run {run_id} has no test metrics (test_accuracy, ...): it cannot be judged")
    return trial


def check_gates(values: dict[str, float], require: Sequence[str], what: str) -> None:
    """Refuse a model that misses any METRIC>=VALUE or METRIC<=VALUE bound, naming every miss."""
    misses = []
    for text in require:
        match = GATE.fullmatch(text)
        if match is None:
            raise RegistryError(f"--require {text!r}: write METRIC>=VALUE or METRIC<=VALUE, "
                                "e.g. test_sensitivity_covid_19>=0.95")
        name, op, bound = match[1], match[2], float(match[3])
        if name not in values:
            raise RegistryError(f"{what} has no metric {name!r} for --require; it has: {', '.join(sorted(values))}")
        value = values[name]
        if not (value >= bound if op == ">=" else value <= bound):
            misses.append(f"{name} = {value:.4f}, required {op} {bound:g}")
    if misses:
        raise RegistryError(f"{what} refused: " + "; ".join(misses))


# ---------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Promotion:
    """What a promote did: the version now holding the alias and the one that held it before."""

    name: str
    alias: str
    version: str
    run_id: str | None
    created: bool  # a new version was registered
    previous: str | None  # the version that held the alias before this promotion (None: no version did)

    @property
    def moved(self) -> bool:
        return self.previous != self.version

    @property
    def undo(self) -> str | None:
        """The command that moves the alias back, when it moved from another version."""
        if self.previous is None or not self.moved:
            return None
        return f"covidsearch promote --version {self.previous} --name {self.name} --alias {self.alias}"

    def summary(self) -> str:
        """What changed in the registry and how to undo it, as the promote command prints it."""
        lines = [f"registered run {self.run_id} as {self.name} version {self.version}"] if self.created else []
        if not self.moved:
            lines.append(f"{self.name}@{self.alias} already points to version {self.version}: nothing changed")
        else:
            was = f" (was version {self.previous})" if self.previous else ""
            lines.append(f"{self.name}@{self.alias} -> version {self.version}{was}")
        if self.undo:
            lines.append(f"undo: {self.undo}")
        return "\n".join(lines)


def promote(client: MlflowClient, run_id: str, name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS,
            require: Sequence[str] = ()) -> Promotion:
    """Give a finished trial's model the alias: every check runs before the registry is touched."""
    trial = finished_trial(client, run_id)
    check_gates(trial.test_metrics, require, f"run {run_id}")
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version, created = str(min(int(v.version) for v in existing)), False
    else:
        version = str(mlflow.register_model(f"models:/{trial.model_id}", name, tags=trial.version_tags()).version)
        created = True
    return Promotion(name, alias, version, run_id, created, _move_alias(client, name, alias, version))


def promote_version(client: MlflowClient, version: str, name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS,
                    require: Sequence[str] = ()) -> Promotion:
    """Move the alias to an existing version: the undo of a promotion (gates read the version's tags)."""
    found = _version(client, name, str(version))
    scores = {k: float(v) for k, v in found.tags.items() if k.startswith("test_")}
    check_gates(scores, require, f"{name} version {version}")
    return Promotion(name, alias, str(found.version), found.run_id, False,
                     _move_alias(client, name, alias, str(found.version)))


def _registered(client: MlflowClient, name: str) -> Any | None:
    """The registered model, or None when there is none of that name yet."""
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _existing(client: MlflowClient, name: str) -> Any:
    """The registered model, or a one-line error for a name nothing was promoted to."""
    registered = _registered(client, name)
    if registered is None:
        raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}: "
                            "promote a trial first (covidsearch promote RUN_ID)")
    return registered


def _version(client: MlflowClient, name: str, version: str) -> Any:
    """A registered version, or a one-line error saying which part is unknown."""
    _existing(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


def _move_alias(client: MlflowClient, name: str, alias: str, version: str) -> str | None:
    """Point the alias at version, leaving on both versions the tags that undo the move; returns the old holder."""
    holder = _registered(client, name).aliases.get(alias)
    previous = None if holder is None else str(holder)
    if previous == version:
        return previous
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if previous:
        client.set_model_version_tag(name, previous, f"{alias}.demoted_at", now)
        client.set_model_version_tag(name, previous, f"{alias}.replaced_by", version)
        client.set_model_version_tag(name, version, f"{alias}.previous_version", previous)
    stale = set(client.get_model_version(name, version).tags) & {f"{alias}.demoted_at", f"{alias}.replaced_by"}
    for key in stale:  # a version promoted back holds the alias again: it is no longer demoted
        client.delete_model_version_tag(name, version, key)
    client.set_model_version_tag(name, version, f"{alias}.promoted_at", now)
    client.set_registered_model_alias(name, alias, version)
    return previous


# ---------------------------------------------------------------- model references


@dataclass(frozen=True)
class Source:
    """Where a model is: the URI or file that loads it, what to call it, and the classes it outputs."""

    uri: str
    label: str
    classes: tuple[str, ...] | None
    model_id: str | None = None
    run_id: str | None = None
    name: str | None = None
    version: str | None = None


def locate(ref: str, tracking_uri: str | None = None) -> Source:
    """The one place a model reference is resolved: run id, models:/NAME@ALIAS, models:/NAME/VERSION or file."""
    if not ref.startswith("models:/"):
        path = Path(ref).expanduser()
        if path.is_file():
            return Source(str(path), f"model file {path}", None)
        if path.suffix == ".keras":
            raise RegistryError(f"model file not found: {path}")
    client = connect(tracking_uri)
    if ref.startswith("models:/"):
        return _registry_source(client, ref)
    trial = finished_trial(client, ref)  # what may be promoted is what may be used
    return Source(f"models:/{trial.model_id}", f"run {ref}", trial.classes, trial.model_id, ref)


def _registry_source(client: MlflowClient, ref: str) -> Source:
    """A registered version by alias or number, with the classes its promotion recorded."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", ref)
    if not match:
        raise RegistryError(f"model URI {ref!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match.groups()
    if alias:
        registered = _existing(client, name)
        if alias not in registered.aliases:
            known = ", ".join(sorted(registered.aliases)) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (its aliases: {known})")
        number = str(registered.aliases[alias])
    found = _version(client, name, number)
    classes = found.tags.get("classes")  # set by promote; a version registered elsewhere falls back in load()
    logged = found.source.removeprefix("models:/") if found.source.startswith("models:/m-") else None
    model_id = found.model_id or logged
    return Source(f"models:/{name}/{number}", f"{name} version {number}", tuple(classes.split("|")) if classes else None,
                  model_id, found.run_id, name, number)


@dataclass
class Loaded:
    """A model ready for pixels: its input size, colour mode and class names come from the model itself."""

    source: Source
    model: Any  # keras.Model
    classes: list[str]
    size: int
    color_mode: str


def load(ref: str, tracking_uri: str | None = None) -> Loaded:
    """Load any model reference with everything needed to feed it raw image files."""
    source = locate(ref, tracking_uri)
    model = _load_keras(source)
    shape = model.input_shape
    width = int(model.output_shape[-1])
    classes = list(source.classes or ())
    if not classes:
        if width != len(data.DEFAULT_CLASSES):
            raise RegistryError(f"{source.label} has {width} outputs and no class names: only a 3-output model "
                                f"can use the default {', '.join(data.DEFAULT_CLASSES)}")
        classes = list(data.DEFAULT_CLASSES)
    if len(classes) != width:
        raise RegistryError(f"{source.label} has {width} outputs but {len(classes)} class names ({', '.join(classes)})")
    return Loaded(source, model, classes, int(shape[1]), "grayscale" if shape[-1] == 1 else "rgb")


def _load_keras(source: Source) -> Any:
    """The Keras model from the store or a file, or a one-line error."""
    import keras

    try:
        if source.uri.startswith("models:/"):
            return mlflow.keras.load_model(source.uri)
        return keras.saving.load_model(source.uri)
    except (MlflowException, OSError, ValueError) as err:
        raise RegistryError(f"cannot load {source.label}: {str(err).splitlines()[0] if str(err) else err!r}") from None


# ---------------------------------------------------------------- pixels, prediction, evaluation


def image_paths(paths: Sequence[str]) -> list[Path]:
    """Files as given plus the images inside folders (recursively), so a dataset folder can be passed whole."""
    found: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise RegistryError(f"no images in folder {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise RegistryError(f"no such image or folder: {path}")
    return found


def pixels(paths: Sequence[str | Path], size: int, color_mode: str) -> np.ndarray:
    """uint8 pixels through data.decode, the same path training used, so the model sees what it learned on."""
    out = np.empty((len(paths), size, size, data.channels(color_mode)), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = data.decode(path, size, color_mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise RegistryError(f"cannot read image {path}: {str(err).splitlines()[0]}") from None
    return out


def probabilities(loaded: Loaded, paths: Sequence[str | Path]) -> np.ndarray:
    """Class probabilities, one row per image, in loaded.classes order."""
    return np.asarray(loaded.model.predict(pixels(paths, loaded.size, loaded.color_mode), batch_size=64, verbose=0))


@dataclass(frozen=True)
class Prediction:
    """One image's predicted class and every class's probability."""

    image: str
    predicted: str
    probabilities: dict[str, float]


def predict(loaded: Loaded, files: Sequence[Path]) -> list[Prediction]:
    """Predictions for image files (see image_paths); every image is read before any is predicted."""
    probs = probabilities(loaded, files)
    return [Prediction(str(f), loaded.classes[int(p.argmax())], {c: float(v) for c, v in zip(loaded.classes, p)})
            for f, p in zip(files, probs)]


def format_predictions(predictions: Sequence[Prediction], fmt: str = "table") -> str:
    """Predictions as an aligned table, CSV or JSON."""
    if fmt == "json":
        return json.dumps([vars(p) for p in predictions], indent=2)
    classes = list(predictions[0].probabilities) if predictions else []
    rows = [["image", "predicted", *classes]]
    rows += [[p.image, p.predicted, *(f"{v:.6f}" if fmt == "csv" else f"{v:.4f}" for v in p.probabilities.values())]
             for p in predictions]
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue().rstrip("\n")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@dataclass
class Evaluation:
    """A model's metrics on every image of a dataset."""

    dataset: data.Dataset
    probabilities: np.ndarray
    metrics: dict[str, float]

    @property
    def confusion(self) -> np.ndarray:
        return metrics.confusion(self.dataset.labels, self.probabilities)


def evaluate(loaded: Loaded, data_dir: str) -> Evaluation:
    """Score a model on a whole dataset folder (either layout), with the metrics trials report on test."""
    dataset = data.scan(data_dir, loaded.classes)
    probs = probabilities(loaded, [s.path for s in dataset.samples])
    return Evaluation(dataset, probs, metrics.evaluate(dataset.labels, probs, loaded.classes))


def format_evaluation(loaded: Loaded, ev: Evaluation) -> str:
    """The tutorial's eight metrics, per-class sensitivity/specificity, macro F1, AUC and the confusion matrix."""
    m, classes = ev.metrics, ev.dataset.classes
    counts = ", ".join(f"{c} {n}" for c, n in ev.dataset.counts().items())
    skipped = f"; skipped {len(ev.dataset.skipped)} unreadable file(s)" if ev.dataset.skipped else ""
    lines = [f"{loaded.source.label} on {ev.dataset.root}: {len(ev.dataset.samples)} images ({counts}){skipped}",
             f"input {loaded.size}x{loaded.size} {loaded.color_mode}", ""]
    lines += [f"{name.upper():<10} {m[name]:.0f}" if len(name) == 2 else f"{name:<10} {m[name]:.4f}" for name in EIGHT]
    lines += [f"{'macro F1':<10} {m['macro_f1']:.4f}", f"{'AUC':<10} {m['auc']:.4f}" if "auc" in m else "AUC        -", ""]
    width = max(len(c) for c in classes)
    lines.append(f"{'class':<{width}}  sensitivity  specificity")
    for c in classes:
        key = data.metric_safe(c)
        lines.append(f"{c:<{width}}  {m[f'sensitivity_{key}']:11.4f}  {m[f'specificity_{key}']:11.4f}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cells = [["", *classes]] + [[c, *map(str, row)] for c, row in zip(classes, ev.confusion)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def log_evaluation(client: MlflowClient, experiment_id: str, loaded: Loaded, ev: Evaluation) -> str:
    """Record an evaluation as a run whose metrics MLflow 3 also links to the model's LoggedModel."""
    src, ds = loaded.source, ev.dataset
    tags = {"covidsearch_kind": "evaluation", "model": src.uri, "data_root": ds.root,
            "data_fingerprint": ds.fingerprint(),
            **{k: v for k, v in (("model_id", src.model_id), ("trial_run_id", src.run_id),
                                 ("registered_model", src.name), ("registered_version", src.version)) if v}}
    run_id = tracking.create_run(client, experiment_id, f"evaluate-{src.name or 'model'}"
                                 + (f"-v{src.version}" if src.version else ""), tags)
    dataset = DatasetEntity(Path(ds.root).name, ds.fingerprint()[:36], "local", json.dumps({"uri": ds.root}),
                            profile=json.dumps(ds.counts()))
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")])],
                      models=[LoggedModelInput(src.model_id)] if src.model_id else None)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval_{k}", float(v), now, 0, model_id=src.model_id,
                                             dataset_name=dataset.name, dataset_digest=dataset.digest)
                                      for k, v in ev.metrics.items() if math.isfinite(v)])
    client.log_table(run_id, metrics.confusion_table(ds.labels, ev.probabilities, ds.classes), "confusion_matrix.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id
