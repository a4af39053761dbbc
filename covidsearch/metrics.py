"""Classification metrics from predicted probabilities: one function for validation and test.

The tutorial's eight (loss, accuracy, TP, FP, TN, FN, precision, recall) follow Keras'
definitions on one-hot labels at threshold 0.5; per-class sensitivity and specificity,
macro F1 and one-vs-rest AUC follow scikit-learn.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from .data import metric_safe


def confusion(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    n = probs.shape[1]
    return np.bincount(labels * n + probs.argmax(1), minlength=n * n).reshape(n, n)


def evaluate(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Every metric a trial reports, keyed without prefix (the caller adds val_ or test_)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(len(classes))[labels]
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    predicted = probs >= 0.5
    tp = float((predicted & (onehot == 1)).sum())
    fp = float((predicted & (onehot == 0)).sum())
    tn = float((~predicted & (onehot == 0)).sum())
    fn = float((~predicted & (onehot == 1)).sum())
    out = {
        "loss": float(-(onehot * np.log(clipped)).sum(1).mean()),
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "macro_f1": float(f1_score(labels, probs.argmax(1), average="macro", labels=range(len(classes)),
                                   zero_division=0)),
    }
    matrix = confusion(labels, probs)
    for i, name in enumerate(classes):
        positives, negatives = matrix[i].sum(), matrix.sum() - matrix[i].sum()
        out[f"sensitivity_{metric_safe(name)}"] = float(matrix[i, i] / positives) if positives else float("nan")
        true_neg = negatives - (matrix[:, i].sum() - matrix[i, i])
        out[f"specificity_{metric_safe(name)}"] = float(true_neg / negatives) if negatives else float("nan")
    # The lowest per-class sensitivity: an objective for "miss no class, COVID-19 included". Maximising COVID-19
    # sensitivity alone rewards calling every image COVID-19; this scores that model 0.
    sensitivities = [v for k, v in out.items() if k.startswith("sensitivity_") and not np.isnan(v)]
    out["min_sensitivity"] = min(sensitivities) if sensitivities else float("nan")
    present = np.unique(labels)
    if len(present) == len(classes):
        out["auc"] = float(roc_auc_score(labels, probs / probs.sum(1, keepdims=True), multi_class="ovr",
                                         labels=list(range(len(classes)))))
    return out


def confusion_table(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list]:
    """The confusion matrix as columns of a table (MLflow log_table)."""
    matrix = confusion(labels, probs)
    table: dict[str, list] = {"true": list(classes)}
    for j, name in enumerate(classes):
        table[f"predicted {name}"] = [int(v) for v in matrix[:, j]]
    return table
