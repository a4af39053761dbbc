"""The champion for any MLflow client: image files in, class names and probabilities out.

A trial's model is logged as a `Classifier` pyfunc (recorder.complete) with the trial's .keras file
inside, the class names, input size and colour mode. `mlflow models serve` (or `covidsearch serve`,
scoring.py) then answers

    {"inputs": ["<base64 PNG>", ...]}  or  {"dataframe_records": [{"image": "<base64 JPEG>"}, ...]}

with one row per image: `predicted` and one probability column per class. Images are resized as
training resized them (data.py); what is not an image, and float pixels, are refused with HTTP 400,
never guessed at.
"""
from __future__ import annotations

import base64
import binascii
from importlib.metadata import version
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image, UnidentifiedImageError

from . import data, tracking

COLUMN = "image"  # the input column: base64-encoded PNG or JPEG files
PREDICTED = "predicted"  # the output column of class names, beside one probability column per class
CHANNELS = (1, 3, 4)  # what a uint8 array's last axis may be: grayscale, RGB, RGBA


def refused(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class Classifier(mlflow.pyfunc.PythonModel):
    """A trial's Keras model with what a client should not have to know: class names, input size, colour mode."""

    def __init__(self, classes: list[str], size: int, color_mode: str, threshold: float | None = None,
                 target: float | None = None):
        if threshold is not None and data.COVID not in classes:
            raise ValueError(f"a {data.COVID} threshold needs a {data.COVID} class, not only {', '.join(classes)}")
        self.classes, self.size, self.color_mode = list(classes), int(size), color_mode
        self.threshold = threshold  # COVID-19 from this probability on (an operating point), else the likeliest class
        self.target = target  # the validation sensitivity the threshold was chosen for
        self.model: Any = None  # keras.Model, loaded by load_context

    @classmethod
    def of(cls, model: Any, classes: list[str], threshold: float | None = None,
           target: float | None = None) -> Classifier:
        """The wrapper of a Keras model that takes uint8 pixels (its input shape gives size and colour mode)."""
        shape = model.input_shape
        return cls(classes, int(shape[1]), "grayscale" if shape[-1] == 1 else "rgb", threshold, target)

    @property
    def metadata(self) -> dict[str, Any]:
        """What the logged model's MLmodel file shows a client (inference.load reads the operating point here)."""
        found = {"classes": self.classes, "input_size": self.size, "color_mode": self.color_mode}
        if self.threshold is None:
            return found
        return {**found, tracking.COVID_THRESHOLD: self.threshold, tracking.TARGET_SENSITIVITY: self.target}

    def signature(self) -> ModelSignature:
        """A string `image` column in; `predicted` and each class's probability out."""
        return ModelSignature(Schema([ColSpec("string", COLUMN)]),
                              Schema([ColSpec("string", PREDICTED), *(ColSpec("double", c) for c in self.classes)]))

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts[tracking.KERAS_ARTIFACT], compile=False)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Base64 image files (a DataFrame column `image`, as MLflow passes them, or a list, Series or dict) or
        uint8 arrays of any size (HxWxC, NxHxWxC) when called directly (unwrap_python_model)."""
        pixels = images(model_input, self.size, self.color_mode)
        probs = np.asarray(self.model.predict(pixels, batch_size=64, verbose=0), dtype=np.float64)
        answer = pd.DataFrame(probs, columns=self.classes)
        answer.insert(0, PREDICTED, self.predicted(probs))
        return answer

    def predicted(self, probs: np.ndarray) -> list[str]:
        """The likeliest class of each row, or COVID-19 wherever its probability reaches the threshold."""
        if self.threshold is None:
            return [self.classes[i] for i in probs.argmax(axis=1)]
        covid = self.classes.index(data.COVID)
        others = np.where(np.arange(len(self.classes)) == covid, -1.0, probs)
        return [data.COVID if p[covid] >= self.threshold else self.classes[int(o.argmax())]
                for p, o in zip(probs, others)]


def requirements() -> list[str]:
    """A logged Classifier's pinned runtime requirements, this process's (inferring them costs seconds per model);
    Pillow reads served images."""
    import keras

    reqs = [f"keras=={version('keras')}", f"numpy=={version('numpy')}", f"pillow=={version('pillow')}"]
    backend = keras.backend.backend()
    reqs.append(f"{backend}=={version(backend)}" if backend != "tensorflow" else f"tensorflow=={version('tensorflow')}")
    return reqs


# ---------------------------------------------------------------- requests to pixels


def images(model_input: Any, size: int, color_mode: str) -> np.ndarray:
    """uint8 (n, size, size, channels) from whatever a client sent, or a refusal saying what was wrong."""
    items = _items(model_input)
    if not items:
        raise refused('no image in the request: send {"inputs": ["<base64 PNG>", ...]}')
    return np.stack([_pixels(item, i, size, color_mode) for i, item in enumerate(items)])


def _items(model_input: Any) -> list[Any]:
    """One entry per image: a base64 string, file bytes or a uint8 HxWxC array."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        if COLUMN not in model_input:
            raise refused(f"no {COLUMN!r} column in the request (got {', '.join(map(str, model_input)) or 'none'})")
        return list(model_input[COLUMN])
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind not in "OSU":  # pixels, not strings
        if model_input.ndim == 3:
            return [model_input]
        if model_input.ndim == 4:
            return list(model_input)
        raise refused(f"pixels must be HxWxC or NxHxWxC, got an array of shape {model_input.shape}")
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        return list(model_input)
    raise refused(f"expected base64-encoded image files or uint8 pixels, got {type(model_input).__name__}")


def _pixels(item: Any, index: int, size: int, color_mode: str) -> np.ndarray:
    """One image at the model's input size, read as training read its files."""
    if isinstance(item, np.ndarray):
        return data.resize(_array_image(item, index), size, color_mode)
    if isinstance(item, str):
        item = _unbase64(item, index)
    if not isinstance(item, (bytes, bytearray)):
        raise refused(f"image {index}: expected a base64-encoded PNG or JPEG string, got {type(item).__name__}")
    try:
        return data.decode(bytes(item), size, color_mode)
    except UnidentifiedImageError:
        raise refused(f"image {index}: not a PNG or JPEG file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise refused(f"image {index}: not a readable PNG or JPEG file ({str(err).splitlines()[0]})") from None


def _unbase64(text: str, index: int) -> bytes:
    """The file a base64 string carries (line breaks, as `base64` writes them, are allowed)."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as err:
        raise refused(f"image {index}: not base64 ({err}); send the PNG or JPEG file base64-encoded") from None


def _array_image(pixels: np.ndarray, index: int) -> Image.Image:
    """A uint8 HxWxC array (C = 1, 3 or 4) as an image; float pixels are refused, never rescaled by guess."""
    if pixels.dtype.kind not in "ui":
        raise refused(f"image {index}: {pixels.dtype} pixels; send uint8 pixels 0..255 (or the PNG/JPEG file, "
                      "base64-encoded): other pixels are not rescaled by guess")
    if pixels.ndim != 3 or pixels.shape[-1] not in CHANNELS:
        raise refused(f"image {index}: pixels must be HxWxC with C = 1, 3 or 4, got shape {pixels.shape}")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise refused(f"image {index}: pixel values {pixels.min()}..{pixels.max()} are outside 0..255")
    exact = pixels.astype(np.uint8)
    return Image.fromarray(exact[..., 0] if exact.shape[-1] == 1 else exact)  # L, RGB or RGBA
