"""The metrics every trial reports, on predictions whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from covidsearch import metrics, text, tracking

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
LABELS = np.repeat([0, 1, 2], 4)


def test_calling_every_image_covid_has_full_covid_sensitivity_but_zero_min_sensitivity():
    everything_covid = np.tile([0.9, 0.05, 0.05], (len(LABELS), 1))
    m = metrics.evaluate(LABELS, everything_covid, CLASSES)
    assert m["sensitivity_covid_19"] == 1.0 and m["specificity_covid_19"] == 0.0
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["min_sensitivity"] == 0.0


def test_min_sensitivity_is_the_worst_class():
    probs = np.eye(3)[LABELS] * 0.9 + 0.05
    probs[4] = [0.9, 0.05, 0.05]  # one Normal image called COVID-19: Normal sensitivity 3/4
    m = metrics.evaluate(LABELS, probs, CLASSES)
    assert m["sensitivity_covid_19"] == 1.0 and m["sensitivity_normal"] == 0.75
    assert m["min_sensitivity"] == 0.75
    assert m["accuracy"] == pytest.approx(11 / 12)
    assert m["tp"] + m["fn"] == len(LABELS)


def _predictions(n: int, seed: int = 0, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n images of the three classes with a model that is right about three times in four."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 1.5
    if ties:
        logits = logits.round(1)  # equal scores, as a saturated softmax gives
    probs = np.exp(logits)
    return labels, probs / probs.sum(1, keepdims=True)


def _right_on(fraction: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images, balanced classes, the first `fraction` of each class predicted right, the rest wrong."""
    labels = np.repeat([0, 1, 2], n // 3)
    predicted = labels.copy()
    for c in range(3):
        members = np.flatnonzero(labels == c)
        predicted[members[round(fraction * len(members)):]] = (c + 1) % 3
    return labels, np.eye(3)[predicted] * 0.7 + 0.1


def test_macro_f1_and_auc_are_scikit_learns_ties_and_empty_classes_included():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(3)
    for classes, n in ((CLASSES, 450), ([*CLASSES, "Lung Opacity"], 60)):
        labels = rng.integers(0, len(classes), n)
        probs = np.round(rng.dirichlet(np.ones(len(classes)), n), 1) + 1e-3  # rounded: many tied scores
        probs[:, -1] *= 0.01  # the last class almost never predicted: its F1 has no predictions to count
        scores = metrics.evaluate(labels, probs, classes)
        assert scores["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro",
                                                             labels=range(len(classes)), zero_division=0), abs=1e-12)
        assert scores["auc"] == pytest.approx(roc_auc_score(labels, probs / probs.sum(1, keepdims=True),
                                                            multi_class="ovr"), abs=1e-12)


def test_the_roc_figures_curve_is_scikit_learns_and_its_area_the_auc():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(4)
    positive = rng.random(200) < 0.3
    scores = np.round(rng.random(200) * 0.5 + 0.4 * positive, 2)
    fpr, tpr = metrics.roc(positive, scores)
    expected_fpr, expected_tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)


def test_a_resample_as_weights_scores_like_the_repeated_images():
    labels, probs = _predictions(300)
    drawn = metrics.stratified_indices(labels, np.random.default_rng(5), 1)
    weighted = metrics.resampled(labels, probs, CLASSES, metrics.draw_counts(drawn, len(labels)))
    repeated = metrics.evaluate(labels[drawn[0]], probs[drawn[0]], CLASSES)
    for name, values in weighted.items():
        assert values[0] == pytest.approx(repeated[name], abs=1e-12), name


def test_every_resample_keeps_the_class_counts():
    labels = np.repeat([0, 1, 2], [50, 7, 3])  # 3 Viral Pneumonia images: an unstratified draw often has none
    drawn = metrics.stratified_indices(labels, np.random.default_rng(0), 200)
    assert drawn.shape == (200, 60)
    assert all((np.bincount(labels[row], minlength=3) == [50, 7, 3]).all() for row in drawn)


def test_intervals_contain_the_point_estimate():
    labels, probs = _predictions(450)
    point = metrics.evaluate(labels, probs, CLASSES)
    bounds = metrics.intervals(labels, probs, CLASSES)
    assert set(bounds) == {"accuracy", "sensitivity_covid_19", "specificity_covid_19", "macro_f1", "auc"}
    for name, (low, high) in bounds.items():
        assert low < point[name] < high, name


def test_intervals_narrow_with_more_images():
    small, large = metrics.intervals(*_right_on(0.8, 60), CLASSES), metrics.intervals(*_right_on(0.8, 600), CLASSES)
    for name in ("accuracy", "sensitivity_covid_19", "macro_f1"):
        assert large[name][1] - large[name][0] < 0.5 * (small[name][1] - small[name][0]), name


def test_the_seed_fixes_the_intervals():
    labels, probs = _predictions(200)
    assert metrics.intervals(labels, probs, CLASSES, seed=3) == metrics.intervals(labels, probs, CLASSES, seed=3)
    assert metrics.intervals(labels, probs, CLASSES, seed=3) != metrics.intervals(labels, probs, CLASSES, seed=4)


def test_without_a_covid_class_every_class_gets_sensitivity_and_specificity_intervals():
    labels, probs = _predictions(90)
    bounds = metrics.intervals(labels, probs, ["cat", "dog", "fish"], resamples=50)
    assert {"sensitivity_cat", "specificity_fish"} <= set(bounds) and "sensitivity_covid_19" not in bounds


def test_a_metric_never_defined_has_no_interval():
    labels, probs = LABELS[LABELS != 2], (np.eye(3)[LABELS] * 0.9 + 0.05)[LABELS != 2]  # no Viral Pneumonia image
    bounds = metrics.intervals(labels, probs, CLASSES, resamples=50)
    assert "auc" not in bounds and "accuracy" in bounds


def test_interval_metrics_are_named_for_mlflow():
    flat = metrics.interval_metrics({"accuracy": (0.9, 0.95), "auc": (0.97, 0.99)}, "test_")
    assert flat == {"test_accuracy_ci_low": 0.9, "test_accuracy_ci_high": 0.95,
                    "test_auc_ci_low": 0.97, "test_auc_ci_high": 0.99}


def test_the_operating_threshold_is_the_highest_that_reaches_the_target():
    labels, probs = _predictions(450, ties=False)
    threshold = metrics.operating_threshold(labels, probs, CLASSES, target=0.97)
    at = metrics.at_threshold(labels, probs, CLASSES, threshold)
    assert at["sensitivity_covid_19_at_op"] >= 0.97
    above = np.nextafter(threshold, 1.0)
    assert metrics.at_threshold(labels, probs, CLASSES, above)["sensitivity_covid_19_at_op"] < 0.97
    assert at["specificity_covid_19_at_op"] <= metrics.evaluate(labels, probs, CLASSES)["specificity_covid_19"]


def test_ten_covid_images_need_a_threshold_at_the_lowest_for_full_sensitivity():
    covid = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1])
    probs = np.column_stack([covid, 1 - covid, np.zeros(10)])
    labels = np.zeros(10, dtype=int)
    assert metrics.operating_threshold(labels, probs, CLASSES, target=1.0) == 0.1
    assert metrics.operating_threshold(labels, probs, CLASSES, target=0.9) == 0.2  # 9 of 10
    assert metrics.operating_threshold(labels, probs, CLASSES, target=0.85) == 0.2


def test_no_threshold_without_covid_images():
    no_covid = LABELS[LABELS != 0]
    probs = np.eye(3)[no_covid] * 0.9 + 0.05
    assert metrics.operating_threshold(no_covid, probs, CLASSES) is None


def test_apply_threshold_calls_covid_at_or_above_it_and_the_likeliest_other_class_below():
    probs = np.array([[0.30, 0.60, 0.10],   # at the threshold: COVID-19 although Normal is likelier
                      [0.29, 0.20, 0.51],   # below: Viral Pneumonia
                      [0.10, 0.85, 0.05],   # below: Normal
                      [0.80, 0.15, 0.05]])  # COVID-19 either way
    assert metrics.apply_threshold(probs, 0, 0.3).tolist() == [0, 2, 1, 0]
    assert metrics.apply_threshold(probs, 0, 0.9).tolist() == [1, 2, 1, 1]


def test_at_threshold_reports_the_operating_point():
    probs = np.eye(3)[LABELS] * 0.9 + 0.05
    probs[0] = [0.2, 0.7, 0.1]  # a COVID-19 image the argmax misses
    probs[5] = [0.25, 0.7, 0.05]  # a Normal image a low threshold calls COVID-19
    at = metrics.at_threshold(LABELS, probs, CLASSES, 0.2)
    assert at == {"sensitivity_covid_19_at_op": 1.0, "specificity_covid_19_at_op": 7 / 8, "accuracy_at_op": 11 / 12}


def test_an_unknown_positive_class_is_refused():
    with pytest.raises(ValueError, match="Pneumonia"):
        metrics.operating_threshold(LABELS, np.eye(3)[LABELS], CLASSES, positive="Pneumonia")


def test_tp_fp_tn_fn_threshold_each_class_at_half_so_they_can_disagree_with_accuracy():
    """What THRESHOLD_NOTE tells readers, shown: a right likeliest class below 0.5 is correct yet a false negative."""
    labels = np.array([0, 1])
    probs = np.array([[0.45, 0.30, 0.25],   # COVID-19, the likeliest class but below 0.5
                      [0.10, 0.80, 0.10]])
    m = metrics.evaluate(labels, probs, CLASSES)
    assert m["accuracy"] == 1.0 and metrics.confusion(labels, probs).trace() == 2
    assert m["tp"] == 1 and m["fn"] == 1
    assert "0.5" in metrics.THRESHOLD_NOTE and "false negative" in metrics.THRESHOLD_NOTE


def test_an_estimate_shows_its_interval_when_it_has_one():
    assert text.estimate(0.925, (0.875, 0.96667)) == "0.9250 [0.875, 0.967]"
    assert text.estimate(0.925, None) == "0.9250" and text.estimate(None, (0.1, 0.2)) == "-"


def _row(accuracy: float | None, interval: tuple[float, float] | None = None, baseline: bool = False,
         status: str = "FINISHED") -> dict:
    """A leaderboard row (tracking.leaderboard) with what baseline_lead reads."""
    return {"status": status, "objective": 0.5, "baseline": baseline, "test_accuracy": accuracy,
            "test_accuracy_ci": interval, "test_images": 120.0}


def test_a_lead_inside_the_baselines_interval_may_be_noise():
    rows = [_row(0.95), _row(0.925, (0.875, 0.967), baseline=True)]
    assert tracking.baseline_lead(rows) == (
        "the best trial's test accuracy 0.950 vs the baseline's 0.925: inside the baseline's 95% interval "
        "[0.875, 0.967], so the difference may be noise (120 test images)")


def test_a_lead_above_the_interval_is_more_than_noise_and_a_score_below_it_favours_the_baseline():
    above = tracking.baseline_lead([_row(0.99), _row(0.9, (0.85, 0.95), baseline=True)])
    below = tracking.baseline_lead([_row(0.8), _row(0.9, (0.85, 0.95), baseline=True)])
    assert "0.990 vs the baseline's 0.900: above the baseline's 95% interval [0.850, 0.950], so the lead is more " \
           "than noise" in above
    assert "0.800 vs the baseline's 0.900: below the baseline's 95% interval [0.850, 0.950]" in below


def test_the_lead_line_needs_a_finished_baseline_with_an_interval_and_says_when_the_baseline_is_best():
    assert tracking.baseline_lead([_row(0.9), _row(0.8)]) is None  # --no-baseline
    assert tracking.baseline_lead([_row(0.9), _row(0.8, baseline=True)]) is None  # recorded before intervals
    assert tracking.baseline_lead([_row(0.9), _row(0.8, (0.7, 0.9), baseline=True, status="FAILED")]) is None
    assert tracking.baseline_lead([_row(0.9, (0.85, 0.95), baseline=True), _row(0.8)]) == (
        "the best trial is the baseline: test accuracy 0.900, 95% interval [0.850, 0.950] (120 test images)")
