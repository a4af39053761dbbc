"""Classification metrics from predicted probabilities: one function for validation and test.

The tutorial's eight (loss, accuracy, TP, FP, TN, FN, precision, recall) follow Keras'
definitions on one-hot labels at threshold 0.5; per-class sensitivity and specificity,
macro F1 and one-vs-rest AUC follow scikit-learn (tests/test_metrics.py checks them against it),
computed here in numpy, by one definition for a point estimate and for each bootstrap resample.
"""
from __future__ import annotations

import numpy as np

from .data import metric_safe

TUTORIAL = ("loss", "accuracy", "tp", "fp", "tn", "fn", "precision", "recall")  # the tutorial's eight, as Keras names them
# Shown next to TP/FP/TN/FN wherever they are printed: readers take them for the confusion matrix's counts.
THRESHOLD_NOTE = ("TP, FP, TN and FN (and precision and recall, computed from them) follow Keras: every class "
                  "probability of every image is compared with 0.5 on its own, one class against the rest, so each "
                  "image is counted once per class. Accuracy and the confusion matrix take each image's likeliest "
                  "class instead, so the two can disagree: an image whose true class is the likeliest but below 0.5 "
                  "is correct for accuracy and a false negative here.")


def maximise(objective: str) -> bool:
    """Losses are minimised, every other metric (accuracy, sensitivity, F1, AUC) maximised."""
    return not objective.endswith("loss")


def names(classes: list[str]) -> list[str]:
    """Every metric `evaluate` can report for these classes: what an objective (val_NAME) may be."""
    per_class = [f"{kind}_{metric_safe(c)}" for c in classes for kind in ("sensitivity", "specificity")]
    return [*TUTORIAL, "macro_f1", "min_sensitivity", "auc", *per_class]


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
    shared = {k: float(v[0]) for k, v in resampled(labels, probs, classes, np.ones(len(labels))).items()}
    out = {
        "loss": float(-(onehot * np.log(clipped)).sum(1).mean()),
        "accuracy": shared.pop("accuracy"),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        **shared,
    }
    # The lowest per-class sensitivity: an objective for "miss no class, COVID-19 included". Maximising COVID-19
    # sensitivity alone rewards calling every image COVID-19; this scores that model 0.
    sensitivities = [v for k, v in out.items() if k.startswith("sensitivity_") and not np.isnan(v)]
    out["min_sensitivity"] = min(sensitivities) if sensitivities else float("nan")
    return out


def confusion_table(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list]:
    """The confusion matrix as columns of a table, as tracking.log_confusion logs it."""
    matrix = confusion(labels, probs)
    table: dict[str, list] = {"true": list(classes)}
    for j, name in enumerate(classes):
        table[f"predicted {name}"] = [int(v) for v in matrix[:, j]]
    return table


# Uncertainty: a test set of a few hundred images gives accuracy to within a few points, so a
# reported 0.95 means little without its interval. Bootstrap resamples are weights (how many times
# each image is drawn), so every metric of every resample is a few matrix products, not a loop.

def stratified_indices(labels: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Bootstrap index matrix (resamples x images) drawn within each true class, so every resample keeps
    the test set's class counts (and a rare class never vanishes from one)."""
    labels = np.asarray(labels, dtype=np.int64)
    blocks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        blocks.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    return np.hstack(blocks) if blocks else np.empty((resamples, 0), dtype=np.int64)


def draw_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How many times each of n images appears in each resample (the weights resampled() takes)."""
    rows = len(indices)
    flat = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _divide(numerator: np.ndarray, denominator: np.ndarray, empty: float) -> np.ndarray:
    """numerator / denominator, `empty` where the denominator is 0 (NaN: undefined, 0: sklearn's zero_division)."""
    out = np.full(np.broadcast(numerator, denominator).shape, empty)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Binary AUC (labels True = positive) per row of weights: the Mann-Whitney statistic, ties counted half,
    as roc_auc_score computes it; one sort for all rows."""
    order = np.argsort(scores, kind="stable")
    ties = np.flatnonzero(np.r_[True, np.diff(scores[order]) != 0])  # first index of each distinct score
    w = weights[:, order]
    pos = np.add.reduceat(w * labels[order], ties, axis=1)
    neg = np.add.reduceat(w, ties, axis=1) - pos
    below = np.cumsum(neg, axis=1) - neg
    return _divide((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1), np.nan)


def roc(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One class's ROC curve as the figure draws it: (false, true) positive rates from (0, 0) through each distinct
    score, highest first, so that its area (np.trapezoid) is the AUC of the same scores."""
    positive, scores = np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    last = np.r_[np.flatnonzero(np.diff(scores[order]) != 0), len(scores) - 1]  # each distinct score's last image
    hits = np.cumsum(positive[order])[last]
    false_alarms = last + 1 - hits
    return np.r_[0.0, false_alarms / false_alarms[-1]], np.r_[0.0, hits / hits[-1]]


def resampled(labels: np.ndarray, probs: np.ndarray, classes: list[str], weights: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, sensitivity_/specificity_<class>, macro_f1 and auc as scikit-learn defines them, for each row of
    weights (images x times drawn; evaluate's are those of unit weights); NaN where undefined, auc only when every
    class has images."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    k = len(classes)
    pairs = np.eye(k * k)[labels * k + probs.argmax(1)]
    matrix = (weights @ pairs).reshape(-1, k, k)  # one confusion matrix per resample
    total = weights.sum(1)
    tp = np.diagonal(matrix, axis1=1, axis2=2)
    actual, predicted = matrix.sum(2), matrix.sum(1)
    out = {"accuracy": _divide(tp.sum(1), total, np.nan)}
    for i, name in enumerate(classes):
        out[f"sensitivity_{metric_safe(name)}"] = _divide(tp[:, i], actual[:, i], np.nan)
        out[f"specificity_{metric_safe(name)}"] = _divide(total - actual[:, i] - predicted[:, i] + tp[:, i],
                                                          total - actual[:, i], np.nan)
    out["macro_f1"] = _divide(2 * tp, actual + predicted, 0.0).mean(1)
    if len(np.unique(labels)) == k:
        normalised = probs / probs.sum(1, keepdims=True)
        out["auc"] = np.mean([_weighted_auc(labels == i, normalised[:, i], weights) for i in range(k)], axis=0)
    return out


def _interval_names(classes: list[str]) -> list[str]:
    """The metrics that get intervals: sensitivity/specificity of COVID-19 only (the clinical question), or of
    every class when no class is COVID-19."""
    safe = [metric_safe(name) for name in classes]
    chosen = ["covid_19"] if "covid_19" in safe else safe
    return ["accuracy", *[f"{m}_{c}" for c in chosen for m in ("sensitivity", "specificity")], "macro_f1", "auc"]


def intervals(labels: np.ndarray, probs: np.ndarray, classes: list[str], seed: int = 28, resamples: int = 1000,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Stratified bootstrap percentile intervals, {metric: (low, high)}, for accuracy, COVID-19 sensitivity and
    specificity, macro F1 and AUC; resamples where a metric is undefined are dropped, a metric never defined
    is left out."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = draw_counts(stratified_indices(labels, np.random.default_rng(seed), resamples), len(labels))
    values = resampled(labels, probs, classes, counts)
    tail = (1 - level) / 2
    out = {}
    for name in _interval_names(classes):
        defined = values.get(name, np.array([]))
        defined = defined[np.isfinite(defined)]
        if len(defined):
            low, high = np.quantile(defined, [tail, 1 - tail])
            out[name] = (float(low), float(high))
    return out


def interval_metrics(bounds: dict[str, tuple[float, float]], prefix: str = "") -> dict[str, float]:
    """intervals() as flat metric names for MLflow: {prefix}accuracy_ci_low, {prefix}accuracy_ci_high, ..."""
    out = {}
    for name, (low, high) in bounds.items():
        out[f"{prefix}{name}_ci_low"], out[f"{prefix}{name}_ci_high"] = low, high
    return out


# Operating point: argmax treats a missed COVID-19 case and a false alarm alike; a screening rule fixes
# COVID-19 sensitivity on validation images and reports what that costs on the test set.

def _positive_index(classes: list[str], positive: str) -> int:
    """Index of the positive class, refusing a name that is not one of the classes."""
    if positive not in classes:
        raise ValueError(f"positive class {positive!r} is not one of {list(classes)}")
    return list(classes).index(positive)


def operating_threshold(labels: np.ndarray, probs: np.ndarray, classes: list[str], target: float = 0.97,
                        positive: str = "COVID-19") -> float | None:
    """The highest threshold t on p(positive) whose rule "positive if p >= t" reaches `target` sensitivity on these
    (validation) images: the highest keeps specificity highest. None when there are no positive images."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], not {target}")
    index = _positive_index(classes, positive)
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    scores = np.sort(probs[labels == index, index])[::-1]
    if not len(scores):
        return None
    caught = np.arange(1, len(scores) + 1) / len(scores)  # sensitivity at t = each positive score, highest first
    reached = np.flatnonzero(caught >= target)
    return float(scores[reached[0]]) if len(reached) else None


def apply_threshold(probs: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Predicted class per image under the rule: positive where p(positive) >= threshold, else the likeliest other
    class."""
    probs = np.asarray(probs, dtype=np.float64)
    others = probs.copy()
    others[:, positive_index] = -np.inf
    return np.where(probs[:, positive_index] >= threshold, positive_index, others.argmax(1))


def at_threshold(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float,
                 positive: str = "COVID-19") -> dict[str, float]:
    """Sensitivity and specificity of the positive class, and accuracy, at an operating threshold (keys
    sensitivity_<class>_at_op, specificity_<class>_at_op, accuracy_at_op; NaN where undefined)."""
    index = _positive_index(classes, positive)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = apply_threshold(probs, index, threshold)
    called, actual = predicted == index, labels == index
    safe = metric_safe(positive)
    return {
        f"sensitivity_{safe}_at_op": float(called[actual].mean()) if actual.any() else float("nan"),
        f"specificity_{safe}_at_op": float((~called[~actual]).mean()) if (~actual).any() else float("nan"),
        "accuracy_at_op": float((predicted == labels).mean()) if len(labels) else float("nan"),
    }


def operating_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float,
                      positive: str = "COVID-19", seed: int = 28) -> dict[str, float]:
    """at_threshold() with the bootstrap 95% intervals of its three metrics (..._at_op_ci_low, ..._at_op_ci_high), as
    flat metric names: a sensitivity at an operating point is as uncertain as an argmax one."""
    index = _positive_index(classes, positive)
    called = np.eye(len(classes))[apply_threshold(probs, index, threshold)]  # argmax of this is the rule's call
    values = at_threshold(labels, probs, classes, threshold, positive)
    bounds = intervals(labels, called, classes, seed)
    return {**values, **interval_metrics({f"{name}_at_op": bounds[name] for name in bounds
                                          if f"{name}_at_op" in values})}
