"""One trial: build the model, fit it as the tutorial does, evaluate on the held-out test set, log.

`run` executes inside a worker process (see workers.py), so a crash, an out-of-memory kill or
leaked framework memory ends with that process and never reaches the search.
"""
from __future__ import annotations

import math
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from . import data, metrics, models, operating, plots, progress, recorder, serving, tracking


@dataclass
class Plan:
    """What every trial of a search shares: the data, its split and where things go."""

    dataset: data.Dataset
    split: data.Split
    class_weights: dict[int, float]
    cache_dir: str
    objective: str
    seed: int
    precision: str = "auto"
    target_sensitivity: float | None = None  # find the COVID-19 threshold reaching it on validation (operating.py)


@dataclass
class Spec:
    """One trial as the oracle proposed it."""

    trial_id: str
    run_id: str
    config: dict[str, Any]
    epochs: int
    initial_epoch: int
    trial_dir: str
    warm_start: str | None = None  # best weights (file, runs:/ or models:/ URI) of the Hyperband round it continues
    progress: str = "off"  # how epochs are shown: tty, plain or off
    label: str = ""  # "trial i/N", for the epoch line
    baseline: bool = False  # the tutorial's configuration: its record is logged in full at once, like a new best's


class TrialFailed(RuntimeError):
    """The trial could not produce a usable model (NaN loss, bad configuration, ...); `detail`: the traceback."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


def run(spec: Spec, plan: Plan, write: Callable[[tracking.Note], None]) -> dict[str, float]:
    """Train and evaluate one trial, handing its epochs to `write` as they end (a worker sends them to the search
    process); return the best epoch's validation metrics for the oracle."""
    try:
        return _train_and_evaluate(spec, plan, tracking.TrialRecord(write))
    except Exception as err:  # any error of the trial's own code fails this trial only, with its traceback
        raise TrialFailed(f"{type(err).__name__}: {err}", traceback.format_exc()) from None


def rehearse() -> None:
    """Pay on standby what a worker process pays on its first trial only (a tiny model fitted, scored, drawn with
    Grad-CAM and saved for the recorder), so that the trial it takes over pays for that trial alone."""
    classes, labels = list(data.DEFAULT_CLASSES), np.arange(len(data.DEFAULT_CLASSES))
    model = models.build({"model": "convnet", "input_size": 32, "filters": 1, "dense_units": 1, "dropout": 0.0,
                          "learning_rate": 1e-3}, len(classes))
    images, probs = np.zeros((len(classes), 32, 32, 3), dtype=np.uint8), np.eye(len(classes))
    model.fit(images, probs, verbose=0)
    model.predict(images, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        models.save(model, Path(tmp) / tracking.KERAS_FILE)
        recorder.write(Path(tmp) / tracking.PENDING, "", Path(tmp) / tracking.KERAS_FILE,
                       serving.Classifier.of(model, classes), plots.cams(model, images, labels, probs), labels, probs,
                       {"loss": [1.0]}, [{"val_loss": 1.0}], 0, 0, {})
    keras.backend.clear_session()


def _train_and_evaluate(spec: Spec, plan: Plan, record: tracking.TrialRecord) -> dict[str, float]:
    """Fit as the tutorial does, keep the best checkpoint, predict the test split, and leave the model, the
    predictions and the figures' data for the search's recorder."""
    started = time.perf_counter()
    keras.utils.set_random_seed(plan.seed + int(spec.trial_id))
    _set_precision(plan.precision)
    _share_compilations(plan.cache_dir)
    x_train, y_train, x_val, y_val, x_test, y_test = _arrays(spec.config, plan)
    record.lap(tracking.PART_DATA)
    classes = plan.dataset.classes
    model = _build(spec, len(classes))
    record.lap(tracking.PART_BUILD)
    batch_size = int(spec.config["batch_size"])
    validation = ValidationMetrics(x_val, y_val, classes, batch_size, plan.objective, spec.epochs - 1)
    train = Batches(x_train, batch_size, keras.utils.to_categorical(y_train, len(classes)), shuffle=True,
                    seed=plan.seed + int(spec.trial_id))
    history = _fit(model, spec, train,
                   plan.class_weights if spec.config.get("class_weighting", "balanced") == "balanced" else None,
                   [validation, keras.callbacks.TerminateOnNaN(), EpochLogger(record, spec)])
    losses = history.get("loss", [])
    if not losses or any(not math.isfinite(v) for v in losses):
        raise TrialFailed(f"training loss became NaN or infinite after {len(losses)} epoch(s)")
    validation.restore_best()
    record.lap(tracking.PART_FIT)
    best = validation.best()
    test_probs = _predict(model, x_test, batch_size)  # scored by the recorder, with its intervals and table
    served = _served(record, spec, plan, model, x_val, y_val, y_test, test_probs)
    record.lap(tracking.PART_TEST)
    cams = plots.cams(model, x_test, y_test, test_probs)
    record.lap(tracking.PART_FIGURES)
    keras_file = Path(spec.trial_dir) / tracking.KERAS_FILE  # its checkpoint: logged, and continued by Hyperband
    models.save(model, keras_file)
    record.lap(tracking.PART_MODEL)
    closing = {tracking.EPOCHS_TRAINED: len(losses) + spec.initial_epoch,
               "trial_seconds": time.perf_counter() - started,
               **record.setup_seconds(sum(sum(history.get(k, [])) for k in ("train_seconds", "val_seconds"))),
               **{f"{tracking.BEST}{k}": v for k, v in best.items()}}
    recorder.write(Path(spec.trial_dir) / tracking.PENDING, spec.run_id, keras_file, served, cams, y_test, test_probs,
                   history, validation.epochs, spec.initial_epoch, plan.seed, closing, spec.baseline, record.notes)
    return best


def _fit(model: keras.Model, spec: Spec, train: Batches, class_weight: dict[int, float] | None,
         callbacks: list[keras.callbacks.Callback]) -> dict[str, list[float]]:
    """The tutorial's fit (early stopping on val_loss), phase by phase: a head-only phase runs its epochs in full,
    since its plateau says nothing about fine-tuning; the history of all phases together."""
    config, history = spec.config, {}
    for first, end, phase in models.phases(config, spec.initial_epoch, spec.epochs):
        if phase:
            models.start_phase(model, config, phase)
        stopping = [] if phase == "head" else [keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=int(config["patience"]), min_delta=float(config["min_delta"]), mode="min")]
        rate = LearningRate(config, 0 if phase != "tune" else int(config["head_epochs"]), end)
        fitted = model.fit(train, epochs=end, initial_epoch=first, class_weight=class_weight, verbose=0,
                           callbacks=[*callbacks[:1], rate, *callbacks[1:], *stopping])
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(values)
        if model.stop_training:  # stopped early or on NaN: no further phase
            break
    return history


def _set_precision(precision: str) -> None:
    """bfloat16 mixed precision on GPUs that support it (auto), float32 on CPU."""
    if precision == "auto":
        precision = "mixed" if _bfloat16_gpu() else "float32"
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "mixed" else "float32")


def _share_compilations(cache_dir: str) -> None:
    """On JAX, keep compiled train steps on disk: the next trial's fresh worker process reuses them."""
    if keras.backend.backend() == "jax":
        import jax
        jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir) / "jax-compilations"))


def _bfloat16_gpu() -> bool:
    """A GPU of compute capability 8.0 or newer (Ampere, Hopper), where bfloat16 runs at full speed."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return any(d.platform == "gpu" and float(getattr(d, "compute_capability", "0")) >= 8.0
                   for d in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf
        return any(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) >= (8, 0)
                   for gpu in tf.config.list_physical_devices("GPU"))
    return False


def _arrays(config: dict[str, Any], plan: Plan) -> tuple[Any, ...]:
    """Train/validation/test pixels of this trial's input size: rows of the memory-mapped decode-once cache,
    read batch by batch (data.Rows), and their labels."""
    size, mode = int(config["input_size"]), config.get("color_mode", "rgb")
    pixels = data.arrays(plan.dataset, size, mode, plan.cache_dir)
    labels = plan.dataset.labels
    test_ds = plan.split.test_dataset
    test_pixels = pixels if test_ds is plan.dataset else data.arrays(test_ds, size, mode, plan.cache_dir)
    return (data.Rows(pixels, plan.split.train), labels[plan.split.train],
            data.Rows(pixels, plan.split.val), labels[plan.split.val],
            data.Rows(test_pixels, plan.split.test), test_ds.labels[plan.split.test])


class Batches(keras.utils.PyDataset):
    """Keras batches gathered from data.Rows, in a new seeded order each epoch when shuffled: memory holds the
    batches in flight, not a copy of the split. A training feed (shuffled) is gathered by two threads, a few batches
    ahead (Keras's own queue): read with the one default worker, through tf.data's prefetch, a fit spent up to 1.7 s
    after its last batch tearing that down, in half the trials of the tutorial ConvNet. A prediction pass is short,
    and starting threads for it cost more than it saved."""

    def __init__(self, rows: data.Rows, batch_size: int, targets: np.ndarray | None = None, shuffle: bool = False,
                 seed: int = 0):
        super().__init__(workers=2 if shuffle else 1, max_queue_size=4)
        self.rows, self.batch_size, self.targets, self.shuffle = rows, batch_size, targets, shuffle
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(rows)) if shuffle else np.arange(len(rows))

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int) -> Any:
        picked = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.rows[picked] if self.targets is None else (self.rows[picked], self.targets[picked])

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.rows))


def _predict(model: keras.Model, rows: data.Rows, batch_size: int) -> np.ndarray:
    """Class probabilities of every row, batch by batch."""
    return model.predict(Batches(rows, batch_size), verbose=0)


def _build(spec: Spec, n_classes: int) -> Any:
    """The model, continuing from the previous Hyperband round's weights when there is one."""
    model = models.build(spec.config, n_classes)
    if spec.warm_start and spec.warm_start.startswith(("runs:/", "models:/")):  # that round ran on another machine
        model.set_weights(tracking.load_keras(spec.warm_start).get_weights())
    elif spec.warm_start:
        _load_weights(model, spec.warm_start)
    return model


def _load_weights(model: keras.Model, path: str) -> None:
    """The layers' weights of a checkpoint; its optimizer state (another phase's, or none) is not wanted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


def _served(record: tracking.TrialRecord, spec: Spec, plan: Plan, model: Any, x_val: data.Rows, y_val: np.ndarray,
            y_test: np.ndarray, test_probs: np.ndarray) -> serving.Classifier:
    """The model as logged: with the COVID-19 threshold reaching the search's target sensitivity on validation (logged
    with its test scores), else argmax: without a target, or when none reaches it (the console says so)."""
    classes = plan.dataset.classes
    if plan.target_sensitivity is None:
        return serving.Classifier.of(model, classes)
    val_probs = _predict(model, x_val, int(spec.config["batch_size"]))
    point = operating.find(plan.target_sensitivity, y_val, val_probs, y_test, test_probs, classes, plan.seed)
    record.write(point.note())
    if point.threshold is None:
        progress.trial_notice(spec.progress, spec.label, point.line())
    return serving.Classifier.of(model, classes, point.threshold, point.target)


class ValidationMetrics(keras.callbacks.Callback):
    """Validation loss and every test metric per epoch from one prediction pass over the split, and the weights
    of the epoch best by the search's objective: the model a trial keeps is the one it is ranked by. They are kept
    in memory (a copy of the weights), not written at each better epoch; the trial saves the kept model once. The
    trial's last epoch is not copied: if it is the best, the model holds its weights already (a copy of a 130M-weight
    ConvNet takes a second and a half here)."""

    def __init__(self, x: data.Rows | np.ndarray, y: np.ndarray, classes: list[str], batch_size: int, objective: str,
                 last_epoch: int):
        super().__init__()
        self.x, self.y, self.classes, self.batch_size, self.objective = x, y, classes, batch_size, objective
        self.last_epoch = last_epoch  # 0-based, over the whole trial
        self.epochs: list[dict[str, float]] = []
        self._best: dict[str, float] | None = None
        self._best_weights: list[np.ndarray] | None = None  # None: the model's own weights are the best
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        trained = time.perf_counter()
        probs = _predict(self.model, self.x, self.batch_size)
        values = {f"val_{k}": v for k, v in metrics.evaluate(self.y, probs, self.classes).items()}
        if self.objective not in values:
            raise TrialFailed(f"objective {self.objective!r} is not a validation metric; try val_loss, "
                              "val_accuracy, val_macro_f1, val_min_sensitivity or val_sensitivity_<class>")
        self.epochs.append(values)
        if self._best is None or _ranks_before(values, self._best, self.objective):
            self._best, self._best_weights = values, self.model.get_weights() if epoch < self.last_epoch else None
        if logs is not None:  # seconds too, so a slow input path or idle accelerator shows in MLflow
            logs.update(values, train_seconds=trained - self._started, val_seconds=time.perf_counter() - trained)

    def restore_best(self) -> None:
        """The model's weights back to the kept epoch's."""
        self.best()
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)

    def best(self) -> dict[str, float]:
        """The validation metrics of the kept epoch."""
        if self._best is None:
            raise TrialFailed("no epoch finished")
        return self._best


def _ranks_before(new: dict[str, float], kept: dict[str, float], objective: str) -> bool:
    """Strictly better by the objective; on a tie (accuracies move in whole images) the lower val_loss, so a
    later epoch that is surer of the same answers wins over a lucky early one."""
    a, b = new[objective], kept[objective]
    if not math.isfinite(a):
        return False
    if a != b and math.isfinite(b):
        return a > b if metrics.maximise(objective) else a < b
    return not math.isfinite(b) or new["val_loss"] < kept["val_loss"]


class LearningRate(keras.callbacks.Callback):
    """The learning rate each epoch of a phase starting at `first` and ending at `end`: linear warm-up over
    warmup_epochs, then constant (the tutorial), cosine decay to 0 at `end`, or x0.3 after 2 epochs without a
    min_delta better val_loss (plateau); the rate is logged with the epoch's metrics."""

    def __init__(self, config: dict[str, Any], first: int, end: int):
        super().__init__()
        self.schedule, self.warmup = config.get("lr_schedule", "constant"), int(config.get("warmup_epochs", 0))
        if self.schedule not in ("constant", "cosine", "plateau"):
            raise ValueError(f"unknown lr_schedule {self.schedule!r}: use constant, cosine or plateau")
        self.first, self.end, self.min_delta = first, end, float(config.get("min_delta", 0.0))
        self.base, self.scale, self.best_loss, self.waited = 0.0, 1.0, math.inf, 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.base = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))  # this phase's compiled rate

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate.assign(self.rate(epoch))

    def rate(self, epoch: int) -> float:
        """The rate for `epoch` (0-based, counted over the whole trial)."""
        step = epoch - self.first
        if step < self.warmup:
            return self.base * (step + 1) / (self.warmup + 1)
        if self.schedule == "cosine":
            span = max(self.end - self.first - self.warmup, 1)
            return self.base * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))
        return self.base * self.scale

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        loss = float(logs.get("val_loss", math.inf))
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.waited = loss, 0
        else:
            self.waited += 1
        if self.schedule == "plateau" and self.waited >= 2:
            self.scale, self.waited = self.scale * 0.3, 0
        logs["learning_rate"] = self.rate(epoch)


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch train and validation metrics to the trial's MLflow run (through the search process) and the progress
    display."""

    def __init__(self, record: tracking.TrialRecord, spec: Spec):
        super().__init__()
        self.record, self.spec = record, spec

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v) or np.ndim(v) == 0}
        self.record.write(tracking.Note(values, step=epoch))
        progress.epoch_line(self.spec.progress, self.spec.label, epoch, self.spec.epochs, values)
