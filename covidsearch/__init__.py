"""covidsearch: hyperparameter search and experiment tracking for chest X-ray classifiers."""
from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"


def _import_keras_quietly() -> None:
    """TensorFlow prints C++ start-up lines to stderr before its logging is set up, once in every
    process (each trial's worker too); hold them back and show them only if the import fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import keras  # noqa: F401
            import keras_tuner  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_import_keras_quietly()
