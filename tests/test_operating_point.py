"""Issue #14, item 2: a clinical operating point, the COVID-19 threshold that reaches a target sensitivity on validation."""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from conftest import cli, store
from covidsearch import inference, metrics, operating, serving, tracking
from covidsearch.cli import main

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
TARGET = 0.9


@pytest.fixture(scope="module")
def searched(xray_dir, tmp_path_factory):
    """A real 1-trial search (input 32 px, 2 epochs) run with --target-sensitivity, in a private store."""
    work = tmp_path_factory.mktemp("operating")
    result = cli("run", "--space", "vanilla", "--data", str(xray_dir), "--tuner", "random", "--max-trials", "1",
                 "--max-epochs", "2", "--set", "input_size=32", "--test-per-class", "8", "--quiet",
                 "--target-sensitivity", str(TARGET), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    client, experiment_id = store(work)
    search = tracking.latest_search(client, experiment_id)
    run_id = tracking.leaderboard(client, search)[0]["run_id"]
    return SimpleNamespace(work=work, uri=client.tracking_uri, client=client, search=search, run_id=run_id)


def split(searched, loaded: inference.Loaded, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the model's probabilities on one split of the search, read from its manifest."""
    pixels, labels = inference.split_pixels(searched.client, searched.search, name, CLASSES, loaded.size,
                                            loaded.color_mode)
    return labels, loaded.model.predict(pixels, verbose=0)


def rule(probs: dict[str, float], threshold: float) -> str:
    """The operating point's call: COVID-19 from the threshold on, else the likeliest other class."""
    if probs["COVID-19"] >= threshold:
        return "COVID-19"
    return max((c for c in CLASSES if c != "COVID-19"), key=probs.__getitem__)


def test_each_trial_finds_the_highest_threshold_reaching_the_target_on_validation_and_carries_it(searched):
    run = searched.client.get_run(searched.run_id)
    threshold = run.data.metrics["covid_threshold"]
    assert run.data.tags["target_sensitivity"] == "0.9" and run.data.tags["covid_threshold_reached"] == "true"
    loaded = inference.load(searched.run_id, searched.uri)
    assert (loaded.threshold, loaded.target) == (pytest.approx(threshold), TARGET)  # the logged model carries it

    y_val, val_probs = split(searched, loaded, "val")
    reached = metrics.at_threshold(y_val, val_probs, CLASSES, threshold * (1 - 1e-5))  # this process's float noise
    assert reached["sensitivity_covid_19_at_op"] >= TARGET
    higher = metrics.at_threshold(y_val, val_probs, CLASSES, threshold * (1 + 1e-5))  # the highest: any above misses
    assert higher["sensitivity_covid_19_at_op"] < TARGET

    y_test, test_probs = split(searched, loaded, "test")  # the test scores beside argmax's are the rule's
    on_test = metrics.at_threshold(y_test, test_probs, CLASSES, threshold)
    for name in ("sensitivity_covid_19_at_op", "specificity_covid_19_at_op", "accuracy_at_op"):
        assert run.data.metrics[f"test_{name}"] == pytest.approx(on_test[name])
        low, high = tracking.interval(run.data.metrics, f"test_{name}")
        assert low <= on_test[name] <= high
    assert "test_sensitivity_covid_19" in run.data.metrics  # argmax's stays


@pytest.fixture(scope="module")
def screening(searched):
    """The trial promoted through the CLI at target 1.0 (every validation COVID-19 image caught) as alias screening."""
    result = cli("promote", searched.run_id, "--target-sensitivity", "1", "--alias", "screening",
                 "--tracking-uri", searched.uri, cwd=searched.work)
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(output=result.stdout,
                           version=searched.client.get_model_version_by_alias("covid-cxr", "screening"))


def test_promote_registers_a_version_carrying_the_threshold_found_on_validation(searched, screening, capsys):
    version = screening.version
    threshold = float(version.tags["covid_threshold"])
    assert version.run_id == searched.run_id and version.tags["target_sensitivity"] == "1"
    own = tracking.logged_model(searched.client, searched.client.get_run(searched.run_id))
    assert version.source != f"models:/{own}"  # the trial's own model carries the 0.9 threshold: logged again
    mlflow.set_tracking_uri(searched.uri)
    assert mlflow.models.get_model_info(version.source).metadata["covid_threshold"] == pytest.approx(threshold)

    loaded = inference.load(searched.run_id, searched.uri)
    y_val, val_probs = split(searched, loaded, "val")
    assert threshold == pytest.approx(metrics.operating_threshold(y_val, val_probs, CLASSES, 1.0))
    assert val_probs[y_val == 0, 0].min() == pytest.approx(threshold)  # target 1: the least sure COVID-19 image
    y_test, test_probs = split(searched, loaded, "test")
    expected = metrics.at_threshold(y_test, test_probs, CLASSES, threshold)
    assert float(version.tags["test_sensitivity_covid_19_at_op"]) == pytest.approx(expected["sensitivity_covid_19_at_op"])
    assert "test_sensitivity_covid_19_at_op_ci_low" in version.tags
    assert f"COVID-19 called from p >= {threshold:.4g} (operating point for sensitivity 1 on validation)" \
        in screening.output

    before = len(searched.client.search_model_versions("name = 'covid-cxr'"))
    again = main(["promote", searched.run_id, "--target-sensitivity", "1", "--alias", "screening",
                  "--tracking-uri", searched.uri])
    assert again == 0 and "already points to version" in capsys.readouterr().out
    assert len(searched.client.search_model_versions("name = 'covid-cxr'")) == before


def test_predict_from_the_alias_in_a_fresh_process_applies_the_threshold_and_says_so(searched, screening, xray_dir):
    threshold = float(screening.version.tags["covid_threshold"])
    result = cli("predict", "models:/covid-cxr@screening", str(xray_dir), "--format", "json",
                 "--tracking-uri", searched.uri, cwd=searched.work)
    assert result.returncode == 0, result.stderr[-3000:]
    note = f"COVID-19 called from p >= {threshold:.4g} (operating point for sensitivity 1 on validation)"
    assert note in result.stderr.splitlines()
    rows = json.loads(result.stdout)
    assert len(rows) == 120 and all(r["predicted"] == rule(r["probabilities"], threshold) for r in rows)
    argmax = [max(r["probabilities"], key=r["probabilities"].__getitem__) for r in rows]
    assert any(r["predicted"] != a for r, a in zip(rows, argmax))  # the threshold changed some calls

    table = cli("predict", "models:/covid-cxr@screening", str(xray_dir / "NORMAL"), "--tracking-uri", searched.uri,
                cwd=searched.work)
    assert table.returncode == 0 and table.stdout.splitlines()[0] == note


def test_evaluate_reports_and_logs_the_operating_point_beside_argmax(searched, screening, xray_dir, capsys):
    threshold = float(screening.version.tags["covid_threshold"])
    code = main(["evaluate", "models:/covid-cxr@screening", "--data", str(xray_dir), "--log",
                 "--tracking-uri", searched.uri])
    out = capsys.readouterr().out
    assert code == 0
    assert f"COVID-19 called from p >= {threshold:.4g} (operating point for sensitivity 1 on validation)" in out
    argmax_row = next(line for line in out.splitlines() if line.startswith("argmax "))
    op_row = next(line for line in out.splitlines() if line.startswith(f"p >= {threshold:.4g} "))
    logged = searched.client.get_run(out.split("logged as run ")[1].split()[0]).data
    assert logged.metrics["eval_covid_threshold"] == pytest.approx(threshold)
    assert logged.tags["target_sensitivity"] == "1"
    assert f"{logged.metrics['eval_sensitivity_covid_19_at_op']:.4f}" == op_row.split()[3]
    assert f"{logged.metrics['eval_sensitivity_covid_19']:.4f}" == argmax_row.split()[1]
    assert {"eval_specificity_covid_19_at_op", "eval_accuracy_at_op_ci_low"} <= set(logged.metrics)


def registry_state(client) -> list:
    return sorted((v.name, str(v.version), sorted(v.tags.items()), sorted(v.aliases))
                  for v in client.search_model_versions())


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_a_bad_target_sensitivity_is_a_one_line_error_before_anything_is_recorded(value, searched, xray_dir,
                                                                                 workdir, capsys):
    code = main(["run", "--data", str(xray_dir), "--target-sensitivity", value, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("covidsearch: error: --target-sensitivity must be in (0, 1], e.g. 0.97, not ")
    assert not (workdir / "mlruns").exists()  # no store, no run

    before, models = registry_state(searched.client), searched.client.search_logged_models(
        [searched.client.get_run(searched.run_id).info.experiment_id])
    code = main(["promote", searched.run_id, "--target-sensitivity", value, "--tracking-uri", searched.uri])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--target-sensitivity must be in (0, 1]" in err
    assert registry_state(searched.client) == before
    assert len(searched.client.search_logged_models([models[0].experiment_id])) == len(models)


def test_a_target_without_a_covid_class_or_with_a_version_is_refused(searched, xray_dir, workdir, capsys):
    code = main(["run", "--data", str(xray_dir), "--classes", "Normal", "Viral Pneumonia", "--target-sensitivity",
                 "0.97", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()  # after MLflow's lines creating the store's tables
    assert code == 2 and err[-1] == ("covidsearch: error: --target-sensitivity needs a COVID-19 class; the classes "
                                     "are Normal, Viral Pneumonia")
    client, experiment_id = store(workdir)
    assert client.search_runs([experiment_id]) == []

    code = main(["promote", "--version", "1", "--target-sensitivity", "0.97", "--tracking-uri", searched.uri])
    assert code == 2 and "--target-sensitivity takes a RUN_ID" in capsys.readouterr().err


def test_without_a_covid_19_image_on_validation_no_threshold_is_found_and_argmax_is_kept():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], 30)
    point = operating.find(0.97, np.array([1, 2] * 15), probs, np.arange(30) % 3, probs, CLASSES)
    assert point.threshold is None and point.metrics() == {}
    assert point.tags() == {"target_sensitivity": "0.97", "covid_threshold_reached": "false"}
    assert point.line() == ("no COVID-19 threshold reaches sensitivity 0.97 on validation (it has no COVID-19 image): "
                            "argmax kept")
    kept = serving.Classifier(CLASSES, 32, "rgb", point.threshold, point.target)  # what the trial logs then
    assert kept.metadata == {"classes": CLASSES, "input_size": 32, "color_mode": "rgb"}
