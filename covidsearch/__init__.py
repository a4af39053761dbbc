"""covidsearch: hyperparameter search and experiment tracking for chest X-ray classifiers."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the search process must not hold 75% of a GPU

__version__ = "0.1.0"
DEFAULT_NAME, DEFAULT_ALIAS = "covid-cxr", "champion"  # the registered model and alias `promote` moves
FIGURES_EVERY = "every"  # --figures: every trial's figures and MLflow model made as it ends, not each new best's only
FIGURES_FOR = ("best", FIGURES_EVERY)  # --figures' choices, the default first


class UserError(Exception):
    """Input or state the user must fix: the command shows it in one line and exits 2; nothing recorded is lost."""


class SearchError(UserError, RuntimeError):
    """The search cannot go on; shown as a one-line error (nothing recorded is lost)."""


@contextlib.contextmanager
def held_stderr() -> Iterator[None]:
    """TensorFlow prints C++ start-up lines straight to stderr when it is first imported (in every
    process, each trial's worker too); hold them back and show them only if the block fails. The command and
    the worker processes import the library inside it; importing the package itself loads no Keras, so
    `covidsearch --help` answers at once."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def exit_at_once(status: int) -> NoReturn:
    """End the process with its output flushed and without the interpreter's teardown, which takes over a second of
    CPU once TensorFlow is loaded (a worker's last trial, a command's end would wait for it for nothing)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
