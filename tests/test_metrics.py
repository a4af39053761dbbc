"""The metrics every trial reports, on predictions whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from covidsearch import metrics

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
