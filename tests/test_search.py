"""The main job: `covidsearch run` searches and MLflow holds every trial, as a user would check it."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from conftest import cli, small_search, store
from covidsearch import spaces, tracking

EIGHT = ["test_loss", "test_accuracy", "test_tp", "test_fp", "test_tn", "test_fn", "test_precision", "test_recall"]


@pytest.fixture(scope="module")
def finished_search(xray_dir, tmp_path_factory):
    """A 2-trial vanilla search run through the CLI into a private store."""
    work = tmp_path_factory.mktemp("search")
    client, experiment_id, stdout = small_search(work, xray_dir)
    return work, client, experiment_id, stdout


def _search_and_trials(client, experiment_id):
    searches = client.search_runs([experiment_id], "tags.covidsearch_kind = 'search'")
    assert len(searches) == 1
    parent = searches[0]
    trials = tracking.trial_runs(client, parent.info.run_id)
    return parent, sorted(trials, key=lambda r: r.data.tags["covidsearch_trial_id"])


def test_search_run_records_settings_data_and_provenance(finished_search):
    work, client, experiment_id, _ = finished_search
    parent, trials = _search_and_trials(client, experiment_id)
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["tuner"] == "random" and params["max_trials"] == "2" and params["objective"] == "val_loss"
    assert params["test_images"] == "24" and params["images"] == "120"
    assert float(params["class_weight_covid_19"]) == pytest.approx(1.0)
    assert parent.data.tags["git_commit"] and parent.data.tags["version.keras"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/vanilla.toml", "search/split_manifest.csv", "search/dataset.json", "search/leakage.json",
            "search/skipped_files.csv"} <= artifacts
    summary = json.loads(open(client.download_artifacts(parent.info.run_id, "search/dataset.json")).read())
    assert summary["counts"]["test"] == {"COVID-19": 8, "Normal": 8, "Viral Pneumonia": 8}
    best = parent.data.tags["best_trial_run_id"]
    assert best in {t.info.run_id for t in trials}
    best_loss = min(t.data.metrics["best_val_loss"] for t in trials)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best_loss)


def test_every_trial_is_a_finished_child_with_params_curves_test_metrics_and_model(finished_search):
    work, client, experiment_id, _ = finished_search
    _, trials = _search_and_trials(client, experiment_id)
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
    for run in trials:
        m = run.data.metrics
        assert set(spaces.load("vanilla").params) <= set(run.data.params)
        for name in EIGHT + ["test_macro_f1", "test_auc", "test_sensitivity_covid_19", "test_specificity_normal",
                             "test_sensitivity_viral_pneumonia"]:
            assert name in m, name
        assert m["test_tp"] + m["test_fn"] == 24  # one positive label per test image
        assert 0.0 <= m["test_sensitivity_covid_19"] <= 1.0
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert len(history) == int(m["epochs_trained"]) and len(client.get_metric_history(run.info.run_id, "loss"))
        table = client.load_table(experiment_id, "confusion_matrix.json", [run.info.run_id])  # as log_table left it
        assert list(table["true"]) == ["COVID-19", "Normal", "Viral Pneumonia"]
        assert table.filter(like="predicted").to_numpy().sum() == 24  # every test image once
        assert "confusion_matrix.json" in run.data.tags["mlflow.loggedArtifacts"]  # the UI shows it as a table
        models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert len(models) == 1
    mlflow.set_tracking_uri(client.tracking_uri)
    logged = client.search_logged_models([experiment_id])[0]
    model = tracking.load_keras(f"models:/{logged.model_id}")
    probs = model.predict(np.zeros((1, *model.input_shape[1:]), dtype=np.uint8), verbose=0)
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-4)
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.signature is not None


def test_first_trial_is_the_tutorial_baseline(finished_search):
    _, client, experiment_id, _ = finished_search
    _, trials = _search_and_trials(client, experiment_id)
    baseline = trials[0]
    assert baseline.data.tags["baseline"] == "true" and trials[1].data.tags["baseline"] == "false"
    p = baseline.data.params
    assert (p["input_size"], p["filters"], p["dense_units"], p["dropout"], p["batch_size"], p["learning_rate"]) == (
        "50", "32", "256", "0.5", "250", "0.001")


def test_runs_prints_the_leaderboard(finished_search):
    work, client, experiment_id, stdout = finished_search
    _, trials = _search_and_trials(client, experiment_id)
    result = cli("runs", cwd=work)
    assert result.returncode == 0, result.stderr
    for run in trials:
        assert run.info.run_id in result.stdout
    assert "baseline" in result.stdout and "covid_sens" in result.stdout


def test_in_a_hyperband_search_the_baseline_trains_as_long_as_the_tutorial(xray_dir, workdir):
    result = cli("run", "--data", str(xray_dir), "--tuner", "hyperband", "--max-trials", "2", "--max-epochs", "3",
                 "--test-per-class", "8", "--set", "input_size=32", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client, experiment_id = store(workdir)
    _, (baseline, first_bracket) = _search_and_trials(client, experiment_id)
    assert baseline.data.tags["baseline"] == "true"
    assert len(client.get_metric_history(baseline.info.run_id, "val_loss")) == 3  # --max-epochs, as the tutorial
    assert len(client.get_metric_history(first_bracket.info.run_id, "val_loss")) == 1  # Hyperband's first round


def test_trials_run_in_parallel_with_workers_per_gpu(xray_dir, workdir):
    result = cli("run", "--data", str(xray_dir), "--tuner", "random", "--max-trials", "3", "--max-epochs", "1",
                 "--test-per-class", "8", "--set", "input_size=32", "--workers-per-gpu", "2", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client, experiment_id = store(workdir)
    (search,) = client.search_runs([experiment_id], "tags.covidsearch_kind = 'search'")
    trials = tracking.trial_runs(client, search.info.run_id)
    assert sorted(t.data.tags["covidsearch_trial_id"] for t in trials) == ["0", "1", "2"]
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["covidsearch_worker_id"] for t in trials} == {"tuner0", "tuner1"}  # one id per slot
    starts_and_ends = sorted((t.info.start_time, t.info.end_time) for t in trials)
    assert any(later_start < end for (_, end), (later_start, _) in zip(starts_and_ends, starts_and_ends[1:]))


@pytest.mark.slow  # a second backend's whole flow: CI's slow pass
def test_the_whole_flow_runs_on_the_jax_backend(xray_dir, workdir):
    jax = {"KERAS_BACKEND": "jax"}
    ran = cli("run", "--data", str(xray_dir), "--tuner", "random", "--max-trials", "1", "--max-epochs", "1",
              "--test-per-class", "8", "--set", "input_size=32", "--quiet", cwd=workdir, env=jax)
    assert ran.returncode == 0, ran.stderr[-3000:]
    client, experiment_id = store(workdir)
    (search,) = client.search_runs([experiment_id], "tags.covidsearch_kind = 'search'")
    assert search.data.tags["keras_backend"] == "jax"
    (only,) = tracking.trial_runs(client, search.info.run_id)
    assert only.info.status == "FINISHED" and "test_sensitivity_covid_19" in only.data.metrics

    assert only.info.run_id in cli("runs", cwd=workdir, env=jax).stdout
    promoted = cli("promote", only.info.run_id, cwd=workdir, env=jax)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    evaluated = cli("evaluate", "models:/covid-cxr@champion", "--data", str(xray_dir), cwd=workdir, env=jax)
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout, evaluated.stderr[-2000:]
    image = next((xray_dir / "COVID-19").iterdir())
    predicted = cli("predict", "models:/covid-cxr@champion", str(image), "--format", "json", cwd=workdir, env=jax)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    (row,) = json.loads(predicted.stdout)
    assert row["predicted"] in ("COVID-19", "Normal", "Viral Pneumonia")
