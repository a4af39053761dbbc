"""Build a trial's Keras model from its configuration (fixed settings + hyperparameter values).

Models take uint8 pixels and carry their own scaling, so a saved model needs nothing but
images of its input size: `predict` never repeats preprocessing by hand.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from . import UserError

# name -> (constructor, the backbone's own ImageNet preprocessing mode)
BACKBONES = {
    "InceptionV3": (keras.applications.InceptionV3, "tf"),
    "DenseNet121": (keras.applications.DenseNet121, "torch"),
    "ResNet50": (keras.applications.ResNet50, "caffe"),
    "EfficientNetB0": (keras.applications.EfficientNetB0, "raw"),
    "MobileNet": (keras.applications.MobileNet, "tf"),
    "MobileNetV2": (keras.applications.MobileNetV2, "tf"),
}
MIN_INPUT = {"InceptionV3": 75}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


class WeightsError(UserError, ValueError):
    """Backbone weights that cannot be had or do not fit; shown as a one-line error."""


def build(config: dict[str, Any], n_classes: int) -> keras.Model:
    """The trial's compiled model: the tutorial ConvNet or a backbone with the tutorial's head."""
    size, chans = int(config["input_size"]), 1 if config.get("color_mode") == "grayscale" else 3
    inputs = keras.Input((size, size, chans), dtype="uint8", name="image")
    if config["model"] == "convnet":
        outputs = _convnet(inputs, config, n_classes)
    elif config["model"] == "transfer":
        outputs = _transfer(inputs, config, n_classes)
    else:
        raise ValueError(f"unknown model family {config['model']!r}: use convnet or transfer")
    model = keras.Model(inputs, outputs, name=f"covidsearch_{config['model']}")
    model.compile(
        optimizer=keras.optimizers.Adam(float(config["learning_rate"])),
        loss="categorical_crossentropy",
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TruePositives(name="tp"),
            keras.metrics.FalsePositives(name="fp"),
            keras.metrics.TrueNegatives(name="tn"),
            keras.metrics.FalseNegatives(name="fn"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile="auto",
    )
    return model


def _convnet(x: keras.KerasTensor, config: dict[str, Any], n_classes: int) -> keras.KerasTensor:
    """The tutorial's ConvNet with its sizes as hyperparameters."""
    x = keras.layers.Rescaling(1.0 / 255)(x)
    x = keras.layers.Conv2D(int(config["filters"]), 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Dropout(float(config["dropout"]))(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(int(config["dense_units"]), activation="relu")(x)
    return keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


def _transfer(x: keras.KerasTensor, config: dict[str, Any], n_classes: int) -> keras.KerasTensor:
    """A backbone plus the tutorial's head: GAP -> Dense/Dropout per head width -> softmax."""
    name = config["backbone"]
    if config.get("color_mode") == "grayscale":
        raise ValueError("ImageNet backbones need color_mode = \"rgb\"")
    if int(config["input_size"]) < MIN_INPUT.get(name, 32):
        raise ValueError(f"{name} needs input_size >= {MIN_INPUT.get(name, 32)}")
    backbone = backbone_model(config)
    x = _scaling(x, config.get("scaling", "unit"), BACKBONES[name][1])
    _set_trainable(backbone, config.get("fine_tune", "full"), int(config.get("trainable_layers", 0)))
    x = backbone(x, training=False if config.get("fine_tune") == "frozen" else None)
    x = keras.layers.GlobalAveragePooling2D()(x)
    for units in str(config["head_units"]).split("/"):
        x = keras.layers.Dense(int(units), activation="relu")(x)
        x = keras.layers.Dropout(float(config["dropout"]))(x)
    return keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


def backbone_model(config: dict[str, Any]) -> keras.Model:
    """The ImageNet backbone with weights 'imagenet' (cached file only), 'none' or a file path."""
    name, size = config["backbone"], int(config["input_size"])
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    constructor = BACKBONES[name][0]
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (size, size, 3)}
    if name in ("MobileNet", "MobileNetV2"):
        kwargs["alpha"] = float(config.get("alpha", 1.0))
    weights = str(config.get("weights", "imagenet"))
    if weights == "none":
        return constructor(weights=None, **kwargs)
    if weights == "imagenet":
        cached = imagenet_file(name, size, kwargs.get("alpha", 1.0))
        if not cached.is_file():
            raise WeightsError(
                f"ImageNet weights for {name} are not cached ({cached}) and this machine cannot download them: "
                "pass --weights PATH to a no-top weights file, or --weights none")
        weights = str(cached)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    what = f"{name}{' alpha ' + str(kwargs['alpha']) if 'alpha' in kwargs else ''}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = constructor(weights=str(path), **kwargs)
    except (ValueError, OSError, KeyError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"weights file {path.name} does not fit {what}: {detail}") from None
    skipped = [w for w in caught if "Skipping" in str(w.message) or "no matching" in str(w.message)]
    if skipped:  # Keras loads what matches and leaves the rest random: refuse rather than train on that
        raise WeightsError(f"weights file {path.name} does not fit {what}: {len(skipped)} part(s) not found in it")
    return model


def imagenet_file(name: str, size: int, alpha: float) -> Path:
    """Where Keras keeps (or would download) the no-top ImageNet file for this backbone."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    if name == "MobileNet":
        rows = size if size in (128, 160, 192, 224) else 224
        alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}.get(alpha, str(alpha))
        return home / f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"
    if name == "MobileNetV2":
        rows = size if size in (96, 128, 160, 192, 224) else 224
        return home / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"
    files = {
        "InceptionV3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "DenseNet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "ResNet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "EfficientNetB0": "efficientnetb0_notop.h5",
    }
    return home / files[name]


def _scaling(x: keras.KerasTensor, scaling: str, mode: str) -> keras.KerasTensor:
    """Pixel scaling inside the model: the tutorial's 1/255, or the backbone's own ImageNet mode."""
    if scaling == "unit":
        return keras.layers.Rescaling(1.0 / 255, name="scaling")(x)
    if scaling != "backbone":
        raise ValueError(f"unknown scaling {scaling!r}: use unit or backbone")
    if mode == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scaling")(x)
    if mode == "raw":  # EfficientNet rescales inside the backbone
        return keras.layers.Rescaling(1.0, name="scaling")(x)
    if mode == "torch":
        matrix, bias = np.diag(1.0 / (255.0 * IMAGENET_STD)), -IMAGENET_MEAN / IMAGENET_STD
    else:  # caffe: RGB -> BGR, then subtract the ImageNet mean
        matrix, bias = np.eye(3)[::-1], -CAFFE_MEAN_BGR
    layer = keras.layers.Conv2D(3, 1, trainable=False, name="scaling")
    y = layer(keras.layers.Rescaling(1.0, name="to_float")(x))
    layer.set_weights([matrix.reshape(1, 1, 3, 3).astype("float32"), bias.astype("float32")])
    return y


def _set_trainable(backbone: keras.Model, fine_tune: str, top_layers: int) -> None:
    """Frozen, top-N-layers trainable (BatchNorm stays frozen) or fully trainable, as the tutorial."""
    if fine_tune == "full":
        backbone.trainable = True
    elif fine_tune == "frozen":
        backbone.trainable = False
    elif fine_tune == "top":
        backbone.trainable = True
        cut = len(backbone.layers) - top_layers
        for i, layer in enumerate(backbone.layers):
            layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    else:
        raise ValueError(f"unknown fine_tune {fine_tune!r}: use full, top or frozen")
