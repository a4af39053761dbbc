"""Use any model: load it by reference, predict images, evaluate it on a dataset folder.

A model reference (`locate`) is a trial run id, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a
`.keras` file. Models take uint8 pixels and scale inside, so input size and colour mode come from
the model itself and the class names from the version's `classes` tag (or the trial's search run).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from . import data, metrics, registry, text, tracking
from .registry import RegistryError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
    client = registry.connect(tracking_uri)
    if ref.startswith("models:/"):
        return _registry_source(client, ref)
    trial = registry.finished_trial(client, ref)  # what may be promoted is what may be used
    return Source(f"models:/{trial.model_id}", f"run {ref}", trial.classes, trial.model_id, ref)


def _registry_source(client: MlflowClient, ref: str) -> Source:
    """A registered version by alias or number, with the classes its promotion recorded."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", ref)
    if not match:
        raise RegistryError(f"model URI {ref!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match.groups()
    if alias:
        registered = registry.existing_model(client, name)
        if alias not in registered.aliases:
            known = ", ".join(sorted(registered.aliases)) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (its aliases: {known})")
        number = str(registered.aliases[alias])
    found = registry.model_version(client, name, number)
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
    threshold: float | None = None  # COVID-19 from this probability on (an operating point), else the likeliest class
    target: float | None = None  # the validation sensitivity that threshold was chosen for

    @property
    def operating_note(self) -> str | None:
        """The line `predict` and `evaluate` print when the model calls COVID-19 by its threshold, not argmax."""
        if self.threshold is None:
            return None
        chosen = f"sensitivity {self.target:g} on validation" if self.target is not None else "its recorded target"
        return f"{data.COVID} called from p >= {self.threshold:.4g} (operating point for {chosen})"


def load(ref: str, tracking_uri: str | None = None) -> Loaded:
    """Load any model reference with everything needed to feed it raw image files."""
    source = locate(ref, tracking_uri)
    model = _load_keras(source)
    threshold, target = _operating_point(source)
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
    if threshold is not None and data.COVID not in classes:
        raise RegistryError(f"{source.label} has a {data.COVID} threshold but no {data.COVID} class")
    return Loaded(source, model, classes, int(shape[1]), "grayscale" if shape[-1] == 1 else "rgb", threshold, target)


def _operating_point(source: Source) -> tuple[float | None, float | None]:
    """The COVID-19 threshold and target a logged model carries in its metadata (serving.Classifier); none for a
    .keras file or a model logged without one."""
    if not source.uri.startswith("models:/"):
        return None, None
    found = mlflow.models.get_model_info(source.uri).metadata or {}
    threshold, target = found.get(tracking.COVID_THRESHOLD), found.get(tracking.TARGET_SENSITIVITY)
    return (None if threshold is None else float(threshold)), (None if target is None else float(target))


def _load_keras(source: Source) -> Any:
    """The Keras model from the store or a file, or a one-line error."""
    import keras

    try:
        if source.uri.startswith("models:/"):
            return tracking.load_keras(source.uri)
        return keras.saving.load_model(source.uri)
    except (MlflowException, OSError, ValueError) as err:
        raise RegistryError(f"cannot load {source.label}: {str(err).splitlines()[0] if str(err) else err!r}") from None


# ---------------------------------------------------------------- pixels, prediction, evaluation


def image_paths(paths: Sequence[str]) -> list[Path]:
    """Files as given plus the images inside folders (recursively), so a dataset folder can be passed whole."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
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


def split_pixels(client: MlflowClient, search_run_id: str, split: str, classes: list[str], size: int,
                 color_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels and labels of one split (val, test) of a search, from the files its split manifest lists, each
    checked against its recorded SHA-256: a threshold or an ensemble is judged on exactly the search's images."""
    rows = [r for r in tracking.split_manifest(client, search_run_id) if r["split"] == split]
    if not rows:
        raise RegistryError(f"search {search_run_id} recorded no {split} images in {tracking.SEARCH_RECORDS}/"
                            f"{tracking.MANIFEST}")
    out = np.empty((len(rows), size, size, data.channels(color_mode)), dtype=np.uint8)
    for i, row in enumerate(rows):
        try:
            content = Path(row["file"]).read_bytes()
        except OSError as err:
            raise RegistryError(f"cannot read {split} image {row['file']} of search {search_run_id} ({err.strerror}): "
                                "the search's images must be where it read them") from None
        if hashlib.sha256(content).hexdigest() != row["sha256"]:
            raise RegistryError(f"{split} image {row['file']} changed since search {search_run_id} read it")
        out[i] = data.decode(content, size, color_mode)
    return out, np.array([classes.index(r["class"]) for r in rows], dtype=np.int64)


@dataclass(frozen=True)
class Prediction:
    """One image's predicted class and every class's probability."""

    image: str
    predicted: str
    probabilities: dict[str, float]


def called(loaded: Loaded, probs: np.ndarray) -> np.ndarray:
    """Each image's class index: the likeliest, or COVID-19 from the model's threshold on when it has one."""
    if loaded.threshold is None:
        return probs.argmax(axis=1)
    return metrics.apply_threshold(probs, loaded.classes.index(data.COVID), loaded.threshold)


def predict(loaded: Loaded, files: Sequence[Path]) -> list[Prediction]:
    """Predictions for image files (see image_paths); every image is read before any is predicted."""
    probs = probabilities(loaded, files)
    return [Prediction(str(f), loaded.classes[int(i)], {c: float(v) for c, v in zip(loaded.classes, p)})
            for f, p, i in zip(files, probs, called(loaded, probs))]


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
    return text.table(rows)


@dataclass
class Evaluation:
    """A model's metrics on every image of a dataset, with the 95% intervals of the main ones."""

    dataset: data.Dataset
    probabilities: np.ndarray
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    at_op: dict[str, float]  # at the model's threshold (metrics.operating_metrics); empty without one

    @property
    def confusion(self) -> np.ndarray:
        return metrics.confusion(self.dataset.labels, self.probabilities)


def evaluate(loaded: Loaded, data_dir: str) -> Evaluation:
    """Score a model on a whole dataset folder (either layout), with the metrics trials report on test."""
    dataset = data.scan(data_dir, loaded.classes)
    probs = probabilities(loaded, [s.path for s in dataset.samples])
    at_op = ({} if loaded.threshold is None else
             metrics.operating_metrics(dataset.labels, probs, loaded.classes, loaded.threshold, data.COVID))
    return Evaluation(dataset, probs, metrics.evaluate(dataset.labels, probs, loaded.classes),
                      metrics.intervals(dataset.labels, probs, loaded.classes), at_op)


def format_evaluation(loaded: Loaded, ev: Evaluation) -> str:
    """The tutorial's eight metrics, per-class sensitivity/specificity, macro F1, AUC (95% intervals beside the main
    ones) and the confusion matrix, with what TP/FP/TN/FN count: they can disagree with accuracy."""
    m, classes, bounds = ev.metrics, ev.dataset.classes, ev.intervals
    counts = ", ".join(f"{c} {n}" for c, n in ev.dataset.counts().items())
    skipped = f"; skipped {len(ev.dataset.skipped)} unreadable file(s)" if ev.dataset.skipped else ""
    lines = [f"{loaded.source.label} on {ev.dataset.root}: {len(ev.dataset.samples)} images ({counts}){skipped}",
             f"input {loaded.size}x{loaded.size} {loaded.color_mode}",
             *([f"{loaded.operating_note}: its scores follow the argmax ones below"] if ev.at_op else []), ""]
    lines += [f"{name.upper():<10} {m[name]:.0f}" if len(name) == 2 else f"{name:<10} {m[name]:.4f}{_ci(bounds, name)}"
              for name in metrics.TUTORIAL]
    lines += [*textwrap.wrap(metrics.THRESHOLD_NOTE, 100), ""]
    lines += [f"{'macro F1':<10} {m['macro_f1']:.4f}{_ci(bounds, 'macro_f1')}",
              f"{'AUC':<10} {m['auc']:.4f}{_ci(bounds, 'auc')}" if "auc" in m else "AUC        -", ""]
    rows = [["class", "sensitivity", "95% CI", "specificity", "95% CI"]]
    for c in classes:
        sens, spec = (f"{kind}_{data.metric_safe(c)}" for kind in ("sensitivity", "specificity"))
        rows.append([c, f"{m[sens]:.4f}", _ci(bounds, sens, ""), f"{m[spec]:.4f}", _ci(bounds, spec, "")])
    lines.append(text.table(rows, right=(1, 3)))
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cells = [["", *classes]] + [[c, *map(str, row)] for c, row in zip(classes, ev.confusion)]
    lines.append(text.table(cells, right=range(1, len(classes) + 1)))
    if ev.at_op:
        lines += ["", f"at the operating point ({data.COVID} from p >= {loaded.threshold:.4g}) and under argmax",
                  operating_table({**m, **metrics.interval_metrics(bounds)}, ev.at_op, f"p >= {loaded.threshold:.4g}")]
    return "\n".join(lines)


def operating_table(argmax: dict[str, float], at_op: dict[str, float], rule: str) -> str:
    """COVID-19 sensitivity, specificity and accuracy with their 95% intervals (flat metric names, as logged) under
    argmax and under the threshold: what the operating point buys and what it costs."""
    safe = data.metric_safe(data.COVID)
    names = [f"sensitivity_{safe}", f"specificity_{safe}", "accuracy"]
    rows = [["rule", f"{data.COVID} sensitivity [95% CI]", "specificity [95% CI]", "accuracy [95% CI]"]]
    for label, values, suffix in (("argmax", argmax, ""), (rule, at_op, tracking.AT_OP)):
        rows.append([label, *(text.estimate(values.get(n + suffix), tracking.interval(values, n + suffix))
                              for n in names)])
    return text.table(rows)


def _ci(bounds: dict[str, tuple[float, float]], name: str, label: str = "  95% CI ") -> str:
    """A metric's interval after its value, or nothing for one without: how far the number can be trusted."""
    return f"{label}{text.span(bounds[name])}" if name in bounds else ""


def training_overlap(loaded: Loaded, ev: Evaluation, tracking_uri: str | None = None) -> str | None:
    """A one-line warning when evaluated images are ones the model trained or validated on (by content hash), so
    its scores are not held-out; None when they are not, or the model's training data is unknown (a bare file)."""
    if not loaded.source.run_id:
        return None
    seen = tracking.training_hashes(registry.connect(tracking_uri), loaded.source.run_id)
    overlap = sum(s.sha256 in seen for s in ev.dataset.samples)
    if not overlap:
        return None
    return (f"warning: {overlap} of {len(ev.dataset.samples)} images were in this model's training or validation "
            "split: these scores are not on unseen images")


def log_evaluation(client: MlflowClient, experiment_id: str, loaded: Loaded, ev: Evaluation) -> str:
    """Record an evaluation as a run whose metrics MLflow 3 also links to the model's LoggedModel."""
    from mlflow.entities import Dataset as DatasetEntity

    src, ds = loaded.source, ev.dataset
    tags = {"model": src.uri, "data_root": ds.root, tracking.DATA_FINGERPRINT: ds.fingerprint(),
            **{k: v for k, v in (("model_id", src.model_id), ("trial_run_id", src.run_id),
                                 ("registered_model", src.name), ("registered_version", src.version)) if v}}
    dataset = DatasetEntity(Path(ds.root).name, ds.fingerprint()[:36], "local", json.dumps({"uri": ds.root}),
                            profile=json.dumps(ds.counts()))
    name = f"evaluate-{src.name or 'model'}" + (f"-v{src.version}" if src.version else "")
    values = {**ev.metrics, **metrics.interval_metrics(ev.intervals), **ev.at_op}  # eval_accuracy_ci_low, ...
    if ev.at_op:
        values[tracking.COVID_THRESHOLD] = loaded.threshold
        tags[tracking.TARGET_SENSITIVITY] = f"{loaded.target:g}" if loaded.target is not None else "unknown"
    return tracking.log_evaluation(client, experiment_id, name, tags, values,
                                   metrics.confusion_table(ds.labels, ev.probabilities, ds.classes), dataset,
                                   src.model_id)
