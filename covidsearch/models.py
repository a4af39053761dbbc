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
    compile_model(model, config, float(config["learning_rate"]))
    return model


def save(model: keras.Model, path: Path) -> None:
    """The model as a .keras file without its optimizer's state: a trial's model is served, evaluated and
    continued by Hyperband (with a fresh optimizer), never resumed mid-step, and Adam's state is twice the weights
    (a 130M-weight ConvNet: 0.5 GB written instead of 1.5)."""
    optimizer = getattr(model, "optimizer", None)  # a model loaded with compile=False has none
    model.optimizer = None  # what Keras saves of an uncompiled model: layers and weights
    try:
        model.save(path)
    finally:
        model.optimizer = optimizer


def compile_model(model: keras.Model, config: dict[str, Any], learning_rate: float) -> None:
    """Adam as the tutorial (AdamW once weight_decay > 0), cross-entropy with optional label smoothing, and the
    tutorial's metrics; called again when a fine-tuning phase changes which weights train."""
    decay = float(config.get("weight_decay", 0.0))
    optimizer = (keras.optimizers.AdamW(learning_rate, weight_decay=decay) if decay > 0
                 else keras.optimizers.Adam(learning_rate))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=float(config.get("label_smoothing", 0.0))),
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


def _convnet(x: keras.KerasTensor, config: dict[str, Any], n_classes: int) -> keras.KerasTensor:
    """The tutorial's ConvNet with its sizes as hyperparameters."""
    x = keras.layers.Rescaling(1.0 / 255)(augment(x, config))
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
    x = _scaling(augment(x, config), config.get("scaling", "unit"), BACKBONES[name][1])
    _set_trainable(backbone, config.get("fine_tune", "full"), int(config.get("trainable_layers", 0)))
    x = backbone(x)  # a frozen BatchNorm (trainable False) runs in inference mode: Keras 3 ignores training= here
    x = keras.layers.GlobalAveragePooling2D()(x)
    for units in str(config["head_units"]).split("/"):
        x = keras.layers.Dense(int(units), activation="relu")(x)
        x = keras.layers.Dropout(float(config["dropout"]))(x)
    return keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


def augment(x: keras.KerasTensor, config: dict[str, Any]) -> keras.KerasTensor:
    """Random rotation, zoom, translation, contrast, brightness and flips inside the model: Keras applies them in
    fit only, so predict, evaluate and serving see the image as it is. With every amount 0 (the tutorial) the
    model has no such layer at all."""
    layers = []
    if float(config.get("augment_rotation", 0)) > 0:  # degrees either way
        layers.append(keras.layers.RandomRotation(float(config["augment_rotation"]) / 360, fill_mode="constant"))
    if float(config.get("augment_zoom", 0)) > 0:  # fraction of the side, in or out
        zoom = float(config["augment_zoom"])
        layers.append(keras.layers.RandomZoom((-zoom, zoom), fill_mode="constant"))
    if float(config.get("augment_translation", 0)) > 0:  # fraction of the side, each axis
        shift = float(config["augment_translation"])
        layers.append(keras.layers.RandomTranslation(shift, shift, fill_mode="constant"))
    if float(config.get("augment_contrast", 0)) > 0:
        layers.append(keras.layers.RandomContrast(float(config["augment_contrast"]), value_range=(0, 255)))
    if float(config.get("augment_brightness", 0)) > 0:
        layers.append(keras.layers.RandomBrightness(float(config["augment_brightness"]), value_range=(0, 255)))
    if config.get("augment_flip", False):  # off by default: the heart sits on the left
        layers.append(keras.layers.RandomFlip("horizontal"))
    if not layers:
        return x
    x = keras.layers.Rescaling(1.0, name="pixels")(x)  # uint8 -> float, the values the random layers expect
    return keras.Sequential(layers, name="augmentation")(x)


def phases(config: dict[str, Any], initial_epoch: int, epochs: int) -> list[tuple[int, int, str | None]]:
    """(first epoch, end epoch, phase) to fit in turn: the head on a frozen backbone for head_epochs, then the
    fine-tuning phase; one phase (None, the model as built) when head_epochs is 0, as in the tutorial."""
    head = int(config.get("head_epochs", 0)) if config.get("model") == "transfer" else 0
    if head <= 0:
        return [(initial_epoch, epochs, None)]
    parts = [(initial_epoch, min(head, epochs), "head"), (max(initial_epoch, head), epochs, "tune")]
    return [part for part in parts if part[0] < part[1]]


def start_phase(model: keras.Model, config: dict[str, Any], phase: str) -> None:
    """Freeze the backbone (head) or open it as fine_tune says, BatchNorm kept frozen, at learning_rate x
    tune_lr_factor (tune); and compile again, since Keras fixes the trained weights at compile time."""
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "augmentation")
    rate = float(config["learning_rate"])
    if phase == "head":
        backbone.trainable = False
    else:
        _set_trainable(backbone, config.get("fine_tune", "full"), int(config.get("trainable_layers", 0)))
        for layer in backbone.layers:  # the Keras recipe: ImageNet statistics stay, not the first batches' drift
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        rate *= float(config.get("tune_lr_factor", 0.1))
    compile_model(model, config, rate)


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
