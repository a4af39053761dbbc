"""Issue 8: every trial's figures are real pictures, and Grad-CAM points at the evidence on both model
families (ConvNet, backbone) and both backends (TensorFlow, JAX)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from covidsearch import models, plots

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
BOX = 10
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
OTHER_BACKEND = {"tensorflow": "jax", "jax": "tensorflow"}


def blobs(per_class: int, size: int = 32, box: int = BOX, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Dark noise with one bright box per image; its texture (solid, horizontal or vertical stripes) is the
    class and its place is random: the only evidence is inside the box, so Grad-CAM should light it up."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box]
    patterns = [np.ones((box, box)), yy // 2 % 2, xx // 2 % 2]
    images, labels, corners = [], [], []
    for label, pattern in enumerate(patterns):
        for _ in range(per_class):
            image = rng.integers(0, 50, (size, size)).astype(float)
            r, c = rng.integers(0, size - box, 2)
            image[r:r + box, c:c + box] = np.maximum(image[r:r + box, c:c + box], 230 * pattern)
            images.append(np.repeat(image[..., None], 3, -1).astype(np.uint8))
            labels.append(label)
            corners.append((r, c))
    return np.array(images), np.array(labels), np.array(corners)


def assert_picture(path: Path, min_std: float = 15.0) -> np.ndarray:
    """A PNG that decodes, has a usable size and is not one flat colour; returns its RGB pixels."""
    with Image.open(path) as image:
        assert image.format == "PNG", path
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert min(pixels.shape[:2]) >= 200, f"{path} is only {pixels.shape[1]}x{pixels.shape[0]} px"
    assert pixels.mean(-1).std() > min_std, f"{path} looks blank (pixel std {pixels.mean(-1).std():.1f})"
    return pixels


def keep(paths: list[Path], folder: str) -> None:
    """Copy pictures to test-artifacts/ so a person (or CI) can look at them after the run."""
    out = ARTIFACTS / folder
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, out / path.name)
    print(f"figures kept in {out}")


@pytest.fixture(scope="module")
def convnet():
    """The tutorial ConvNet (small) trained on the box images until it tells the textures apart."""
    keras.utils.set_random_seed(0)
    x, y, _ = blobs(40)
    x_val, y_val, _ = blobs(8, seed=2)
    model = models.build({"model": "convnet", "input_size": 32, "filters": 8, "dense_units": 32, "dropout": 0.0,
                          "learning_rate": 3e-3}, len(CLASSES))
    history = model.fit(x, keras.utils.to_categorical(y, 3), epochs=15, batch_size=30, verbose=0,
                        validation_data=(x_val, keras.utils.to_categorical(y_val, 3)))
    return model, history.history


def test_trial_figures_are_pngs_that_show_something(convnet, tmp_path):
    model, history = convnet
    x, y, _ = blobs(8, seed=1)
    probs = model.predict(x, verbose=0)
    val_epochs = [{"val_loss": loss, "val_accuracy": acc}
                  for loss, acc in zip(history["val_loss"], history["val_accuracy"])]
    cams = plots.cams(model, x, y, probs)
    paths = plots.write_trial_figures(tmp_path, y, probs, CLASSES, history, val_epochs, 0, cams)
    assert sorted(p.name for p in paths) == ["confusion_matrix.png", "curves.png", "gradcam.png", "roc.png"]
    for path in paths:
        assert_picture(path)
    keep(paths, "trial-figures")


def test_gradcam_sample_is_fixed_and_mixes_right_and_wrong():
    labels = np.repeat(np.arange(3), 6)
    predicted = labels.copy()
    predicted[[0, 2, 4]] = 1  # class 0: three wrong, three right
    predicted[6:12] = 2  # class 1: all wrong
    probs = np.eye(3)[predicted]
    sample = plots.gradcam_sample(labels, probs)
    assert sample.tolist() == [0, 2, 1, 3, 6, 7, 8, 9, 12, 13, 14, 15]
    assert plots.gradcam_sample(labels, probs).tolist() == sample.tolist()


def test_gradcam_on_the_convnet_lights_up_the_evidence(convnet):
    model, _ = convnet
    assert isinstance(plots.target_layer(model), keras.layers.Conv2D)
    x, y, corners = blobs(8, seed=1)
    right = model.predict(x, verbose=0).argmax(1) == y
    assert right.mean() >= 0.7, "the ConvNet did not learn the box textures"
    heat = plots.gradcam(model, x[right], y[right])
    assert heat.shape == (int(right.sum()), 32, 32)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    inside = np.zeros(heat.shape, dtype=bool)
    for k, (r, c) in enumerate(corners[right]):
        inside[k, r:r + BOX, c:c + BOX] = True
    in_box = np.array([h[m].mean() for h, m in zip(heat, inside)])
    off_box = np.array([h[~m].mean() for h, m in zip(heat, inside)])
    assert (in_box > 2 * off_box).all(), list(zip(in_box.round(2), off_box.round(2)))
    assert in_box.mean() > 4 * off_box.mean()


def test_gradcam_on_a_backbone_model_uses_the_backbone_maps():
    keras.utils.set_random_seed(0)
    model = models.build({"model": "transfer", "backbone": "MobileNet", "alpha": 0.25, "weights": "none",
                          "input_size": 64, "head_units": "16", "dropout": 0.0, "learning_rate": 1e-3,
                          "fine_tune": "full"}, len(CLASSES))
    backbone = plots.target_layer(model)
    assert isinstance(backbone, keras.Model) and backbone.name.startswith("mobilenet")
    x, _, _ = blobs(4, size=64, box=20)
    # Untrained BatchNorm statistics (mean 0, variance 1) shrink the maps to ~1e-17; one batch in training mode
    # with momentum 0 gives them the batch's statistics, as a trained backbone would have.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x, training=True)
    predicted = model.predict(x, verbose=0).argmax(1)
    heat = plots.gradcam(model, x, predicted)
    assert heat.shape == (len(x), 64, 64)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    spread = heat.std(axis=(1, 2))
    assert (spread > 0.05).sum() >= len(x) // 2, spread.round(3)
    for h in heat:  # each map is either empty (no positive evidence) or peaks at 1
        assert h.max() == 0.0 or h.max() == pytest.approx(1.0)


def test_parallel_coordinates_show_every_kind_of_hyperparameter(tmp_path):
    params = [{"learning_rate": "0.0001", "backbone": "MobileNet", "alpha": "0.25", "batch_size": "16"},
              {"learning_rate": "0.001", "backbone": "ResNet50", "batch_size": "32"},
              {"learning_rate": "0.01", "backbone": "MobileNet", "alpha": "1.0", "batch_size": "16"}]
    fig = plots.parallel_figure(params, [0.9, 0.4, 0.7], "val_loss", lower_is_better=True)
    path = plots.save(fig, tmp_path / "parallel.png")
    assert_picture(path)
    keep([path], "parallel")


@pytest.mark.slow
def test_gradcam_on_the_other_backend():
    """This file's other tests in a fresh process on the other Keras backend (fixed when keras is imported)."""
    other = OTHER_BACKEND[keras.backend.backend()]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "not other_backend"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "KERAS_BACKEND": other})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
