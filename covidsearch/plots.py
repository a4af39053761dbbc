"""Figures as PNG: one trial's confusion matrix, ROC, training curves and Grad-CAM; a search's
hyperparameters against its objective (parallel coordinates).

Figures are drawn on matplotlib's object API (no pyplot, no global state, no display), and the Grad-CAM mosaic by
Pillow, so any thread can draw them: a trial's are drawn by the search process while the next trial trains. Grad-CAM uses
keras.ops plus one small gradient helper per backend, so it works the same on TensorFlow and JAX.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.textpath import text_to_path
from PIL import Image, ImageDraw, ImageFont

from .metrics import confusion, roc
from .tracking import FIGURE_FILES

DPI = 100
RIGHT, WRONG = "#1a7f37", "#cf222e"
NOT_SET = -0.1  # parallel-coordinates position of a hyperparameter a trial does not have
TILE, TILE_TITLE, TILE_GAP = 2.0, 0.5, 0.2  # inches: a Grad-CAM image, the two-line title over it, the gap beside it


@dataclass
class Cams:
    """Grad-CAM of a fixed test sample (gradcam_sample): its images, heatmaps, labels and probabilities. The worker
    computes them while it has the model; the figure is drawn from them later, anywhere (recorder.py)."""

    images: np.ndarray
    heatmaps: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


def cams(model: keras.Model, x_test: Any, y_test: np.ndarray, test_probs: np.ndarray) -> Cams:
    """The Grad-CAM heatmaps of the test sample, the one part of the trial figures that needs the model."""
    sample = gradcam_sample(y_test, test_probs)
    images = np.asarray(x_test[sample])
    return Cams(images, gradcam(model, images, test_probs[sample].argmax(1)), np.asarray(y_test)[sample],
                np.asarray(test_probs)[sample])


def write_trial_figures(out: Path, y_test: np.ndarray, test_probs: np.ndarray, classes: list[str],
                        train_history: dict[str, list[float]], val_epochs: list[dict[str, float]], first_epoch: int,
                        cam: Cams) -> list[Path]:
    """The four trial figures as PNG files in `out` (callable without MLflow or the model)."""
    figures = {
        "curves": curves_figure(train_history, val_epochs, first_epoch),
        "confusion": confusion_figure(y_test, test_probs, classes),
        "roc": roc_figure(y_test, test_probs, classes),
        "gradcam": gradcam_picture(cam.images, cam.heatmaps, cam.labels, cam.probs, classes),
    }
    return [save(picture, out / FIGURE_FILES[key]) for key, picture in figures.items()]


def _margins(fig: Figure, left: float, right: float, bottom: float, top: float, gap: float = 0.0,
             columns: int = 1) -> dict[str, float]:
    """A grid's margins and the gap between its columns, in inches, as subplot parameters. The figures are laid out by
    hand: matplotlib's layout engines draw a figure once more to measure it, which doubled a trial's figures' cost."""
    width, height = fig.get_size_inches()
    axes = (width - left - right - gap * (columns - 1)) / columns
    return {"left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
            "wspace": gap / axes}


def _inches(texts: list[str]) -> float:
    """The widest of these texts in inches, drawn as tick labels are."""
    font = FontProperties(size=matplotlib.rcParams["ytick.labelsize"])
    return max(text_to_path.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts) / 72


def save(picture: Figure | Image.Image, path: Path) -> Path:
    """PNG at a fixed DPI, so artifacts of every trial compare side by side."""
    if isinstance(picture, Image.Image):
        picture.save(path, format="png")
    else:
        picture.savefig(path, dpi=DPI, format="png")
    return path


# ---------------------------------------------------------------- metrics figures


def confusion_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> Figure:
    """Counts and row-normalised rates side by side: the counts show support, the rates per-class recall."""
    matrix = confusion(np.asarray(labels, dtype=np.int64), np.asarray(probs))
    rows = matrix.sum(1, keepdims=True)
    rates = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    label = _inches(classes)
    fig = Figure(figsize=(10, 4.6))
    fig.suptitle("Test confusion matrix")
    grid = _margins(fig, left=label + 0.55, right=0.15, bottom=0.27 * label + 0.6, top=0.8, gap=label + 0.55,
                    columns=2)  # class names as tick labels, then the axis label; x labels turned 15 degrees
    for ax, values, title, text in zip(fig.subplots(1, 2, gridspec_kw=grid), (matrix, rates),
                                       ("counts", "row-normalised (recall)"),
                                       (lambda v: f"{int(v)}", lambda v: f"{v:.2f}")):
        ax.imshow(values / max(values.max(), 1e-12), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            dark = values[i, j] > 0.5 * values.max()
            ax.text(j, i, text(v), ha="center", va="center", color="white" if dark else "black", fontsize=11)
        _class_ticks(ax, classes)
        ax.set(title=title, xlabel="predicted", ylabel="true")
    return fig


def _class_ticks(ax: Any, classes: list[str]) -> None:
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=15)
    ax.set_yticks(ticks, classes)


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> Figure:
    """One-vs-rest ROC per class with its AUC; a class without positives or negatives has no curve."""
    labels = np.asarray(labels)
    fig = Figure(figsize=(5.6, 5))
    ax = fig.subplots(gridspec_kw=_margins(fig, left=0.75, right=0.15, bottom=0.6, top=0.4))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for i, name in enumerate(classes):
        positive = labels == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc(positive, probs[:, i])
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {np.trapezoid(tpr, fpr):.3f})")
    ax.set(title="Test ROC, one class vs the rest", xlabel="false positive rate", ylabel="true positive rate",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def curves_figure(train: dict[str, list[float]], val_epochs: list[dict[str, float]],
                  first_epoch: int = 0) -> Figure:
    """Loss and accuracy per epoch, train against validation, the kept (lowest val_loss) epoch marked."""
    fig = Figure(figsize=(10, 4))
    val_loss = [e["val_loss"] for e in val_epochs]
    best = first_epoch + 1 + int(np.argmin(val_loss)) if val_loss else None
    grid = _margins(fig, left=0.6, right=0.1, bottom=0.55, top=0.35, gap=0.6, columns=2)
    for ax, metric in zip(fig.subplots(1, 2, gridspec_kw=grid), ("loss", "accuracy")):
        for label, values in ((f"train{' (class-weighted)' if metric == 'loss' else ''}", train.get(metric, [])),
                              ("validation", [e[f"val_{metric}"] for e in val_epochs])):
            ax.plot(first_epoch + 1 + np.arange(len(values)), values, "o-", ms=4, label=label)
        if best is not None:
            ax.axvline(best, color="0.5", ls=":", label=f"kept epoch {best}")
        ax.set(title=metric, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


# ---------------------------------------------------------------- Grad-CAM


def gradcam_sample(labels: np.ndarray, probs: np.ndarray, per_class: int = 4) -> np.ndarray:
    """Test indices for Grad-CAM: per class up to half wrong and the rest right predictions, in test order."""
    labels, predicted = np.asarray(labels), np.asarray(probs).argmax(1)
    chosen = []
    for c in range(probs.shape[1]):
        wrong = np.flatnonzero((labels == c) & (predicted != c))
        right = np.flatnonzero((labels == c) & (predicted == c))
        n_wrong = min(len(wrong), max(per_class // 2, per_class - len(right)))
        chosen += [*wrong[:n_wrong], *right[:per_class - n_wrong]]
    return np.array(chosen, dtype=np.int64)


def gradcam(model: keras.Model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Heatmaps in [0, 1] of input size: where the target class's pre-softmax score grows with the features."""
    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
    features, head, last = _submodels(model)
    onehot = keras.ops.one_hot(keras.ops.convert_to_tensor(np.asarray(targets)), last.units)

    def score(maps: Any) -> Any:
        hidden = keras.ops.cast(head(maps, training=False), last.kernel.dtype)
        return keras.ops.sum((keras.ops.matmul(hidden, last.kernel) + last.bias) * onehot)

    maps, grads = (np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float32)
                   for t in _maps_and_gradients(features, score, keras.ops.convert_to_tensor(images)))
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.stack([_resize(c, images.shape[1:3]) for c in np.maximum((weights * maps).sum(-1), 0.0)])
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def target_layer(model: keras.Model) -> keras.layers.Layer:
    """The last Conv2D or nested backbone Model with a 4D output: the last map that still has space in it."""
    for layer in reversed(model.layers):
        if isinstance(layer, (keras.layers.Conv2D, keras.Model)) and len(layer.output.shape) == 4:
            return layer
    raise ValueError(f"{model.name} has no Conv2D layer or backbone model for Grad-CAM")


def _submodels(model: keras.Model) -> tuple[keras.Model, keras.Model, keras.layers.Dense]:
    """Image -> target maps -> input of the final Dense layer, as models sharing the trained layers."""
    # Tensors are taken as inputs of the layers that consume them: a nested backbone's own `output` belongs
    # to its inner graph. Both model families are chains, so the next layer is the consumer.
    layers = model.layers
    after, last = layers[layers.index(target_layer(model)) + 1], layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise ValueError(f"{model.name} does not end in a Dense layer; Grad-CAM needs its pre-softmax scores")
    return keras.Model(model.inputs, after.input), keras.Model(after.input, last.input), last


def _maps_and_gradients(features: keras.Model, score: Callable[[Any], Any], images: Any) -> tuple[Any, Any]:
    """Target maps and d score / d maps in one pass: the one backend-specific piece of Grad-CAM."""
    # Eager under TensorFlow (tracing would cost more than it saves); one compiled call under JAX, whose
    # eager mode compiles every op on its own (seconds for a backbone).
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            maps = features(images, training=False)
            tape.watch(maps)
            value = score(maps)
        return maps, tape.gradient(value, maps)
    if backend == "jax":
        import jax

        def both(x: Any) -> tuple[Any, Any]:
            maps = features(x, training=False)
            return maps, jax.grad(score)(maps)

        return jax.jit(both)(images)
    raise NotImplementedError(f"Grad-CAM supports the tensorflow and jax backends, not {backend}")


def _resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a coarse map to the image size."""
    image = Image.fromarray(cam.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image)


def gradcam_picture(images: np.ndarray, heatmaps: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                    classes: list[str], columns: int = 4) -> Image.Image:
    """Heatmaps over the X-rays, titled true/predicted class and coloured right (green) or wrong (red). A mosaic of
    pictures with captions needs no axes: drawn by Pillow, it costs the search's recorder a quarter of what the same
    picture cost drawn and encoded by matplotlib."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    tile, cell_w, cell_h, top = (round(DPI * inches) for inches in (TILE, TILE + TILE_GAP, TILE + TILE_TITLE, 0.55))
    picture = Image.new("RGB", (cell_w * columns, top + cell_h * rows + round(0.05 * DPI)), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((picture.width / 2, round(0.1 * DPI)), "Grad-CAM for the predicted class (red title: wrong prediction)",
              fill="black", font=_font(matplotlib.rcParams["figure.titlesize"]), anchor="ma")
    caption = _font(8)
    for k, (image, heat) in enumerate(zip(images, heatmaps)):
        row, column = divmod(k, columns)
        left, tile_top = column * cell_w + (cell_w - tile) // 2, top + row * cell_h + cell_h - tile
        picture.paste(_overlay(image, heat).resize((tile, tile), _resampling(image.shape[0], tile)), (left, tile_top))
        pred = int(probs[k].argmax())
        draw.multiline_text((left + tile / 2, tile_top - 2), f"true {classes[labels[k]]}\npred {classes[pred]} "
                            f"{probs[k, pred]:.2f}", fill=RIGHT if pred == labels[k] else WRONG, font=caption,
                            anchor="md", align="center")
    return picture


def _overlay(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    """The X-ray in gray under its heatmap, transparent where there is no evidence, so the X-ray stays readable."""
    alpha = 0.65 * heat[..., None]
    gray = image.mean(-1, keepdims=True) / 255
    blended = (1 - alpha) * gray + alpha * matplotlib.colormaps["jet"](heat)[..., :3]
    return Image.fromarray(np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8))


def _resampling(side: int, tile: int) -> Image.Resampling:
    """Image pixels kept square when enlarged (as matplotlib shows them), averaged when reduced."""
    return Image.Resampling.NEAREST if side <= tile else Image.Resampling.LANCZOS


@functools.cache
def _font(size: float | str) -> ImageFont.FreeTypeFont:
    """matplotlib's own font at a size in points (or a name such as 'large'), so every figure's text looks alike."""
    points = FontProperties(size=size).get_size_in_points()
    return ImageFont.truetype(findfont(FontProperties()), round(points * DPI / 72))


# ---------------------------------------------------------------- a search


def parallel_figure(params: list[dict[str, str]], scores: list[float], objective: str,
                    lower_is_better: bool) -> Figure:
    """Parallel coordinates of the hyperparameters that vary, ending on the objective; the best trial bold."""
    names = sorted({k for p in params for k in p if len({p.get(k) for p in params}) > 1})
    fig = Figure(figsize=(max(6.0, 1.7 * (len(names) + 1)), 4.6), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    if not scores:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center")
        return fig
    columns = [_axis([p.get(k) for p in params]) for k in names] + [_axis([f"{v:.6g}" for v in scores])]
    goodness = _unit(-np.array(scores) if lower_is_better else np.array(scores))
    best = int(np.argmax(goodness))
    cmap = matplotlib.colormaps["viridis"]
    xs = np.arange(len(columns))
    for i in np.argsort(goodness):
        ys = [col[0][i] for col in columns]
        ax.plot(xs, ys, color=cmap(goodness[i]), lw=3.5 if i == best else 1.4, alpha=1.0 if i == best else 0.75,
                zorder=3 if i == best else 2, marker="o", ms=3)
    for x, (name, (_, ticks, labels)) in enumerate(zip([*names, objective], columns)):
        ax.plot([x, x], [min(0.0, *ticks), 1.0], color="0.3", lw=1, zorder=1)
        for y, label in zip(ticks, labels):
            ax.text(x + 0.03, y, label, fontsize=8, va="center", ha="left", zorder=4,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
        ax.text(x, 1.06, name, ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set(xlim=(-0.2, len(columns) - 0.4), ylim=(-0.16, 1.12))
    ax.set_title(f"{len(scores)} finished trial(s); colour and bold line: best {objective} "
                 f"({'lowest' if lower_is_better else 'highest'})", fontsize=10, pad=18)
    return fig


def _axis(values: list[str | None]) -> tuple[np.ndarray, list[float], list[str]]:
    """Positions in [0, 1] with tick positions and labels: numbers to scale (log when wide), names evenly."""
    known = [v for v in values if v not in (None, "", "None")]
    numbers = _floats(known)
    if numbers is None:
        names = sorted(set(known))
        place = {n: i / max(len(names) - 1, 1) for i, n in enumerate(names)}
        ticks, labels = list(place.values()), names
    else:
        log = min(numbers) > 0 and max(numbers) / min(numbers) >= 20
        scale: Callable[[Any], Any] = np.log10 if log else np.asarray
        low, high = float(scale(min(numbers))), float(scale(max(numbers)))
        norm = (lambda v: (float(scale(v)) - low) / (high - low)) if high > low else (lambda v: 0.5)
        distinct = sorted(set(numbers))
        marks = distinct if len(distinct) <= 6 else list(np.power(10, np.linspace(low, high, 5)) if log
                                                         else np.linspace(low, high, 5))
        place = {v: norm(float(v)) for v in known}
        ticks, labels = [norm(m) for m in marks], [f"{m:.3g}" for m in marks]
    if len(known) < len(values):
        ticks, labels = [*ticks, NOT_SET], [*labels, "n/a"]
    return np.array([place.get(v, NOT_SET) for v in values]), ticks, labels


def _floats(values: list[str]) -> list[float] | None:
    """The values as numbers, or None when any is not a number."""
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _unit(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.ones_like(values)
