"""covidsearch: hyperparameter search and experiment tracking for chest X-ray classifiers."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the CLI

__version__ = "0.1.0"
