"""Issue #14, item 3: an ensemble champion, the mean probabilities of a search's best trials as one servable model."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import cli, store
from covidsearch import inference, tracking
from covidsearch.cli import main

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
# Two points only, 32 and 40 px: the baseline is 32 px, so the second trial (never a duplicate) is 40 px.
SPACE = """
[search]
tuner = "random"

[fixed]
model = "convnet"
color_mode = "rgb"
val_fraction = 0.2
patience = 5
min_delta = 0.01

[hyperparameters]
input_size = { type = "choice", values = [32, 40], default = 32 }
filters = { type = "choice", values = [8], default = 8 }
dense_units = { type = "choice", values = [32], default = 32 }
dropout = { type = "choice", values = [0.2], default = 0.2 }
batch_size = { type = "choice", values = [32], default = 32 }
learning_rate = { type = "choice", values = [0.003], default = 0.003 }
"""


@pytest.fixture(scope="module")
def searched(xray_dir, tmp_path_factory):
    """A finished 2-trial search (32 and 40 px, 2 epochs each) and its top-2 ensemble made through the CLI."""
    work = tmp_path_factory.mktemp("ensemble")
    (work / "two-sizes.toml").write_text(SPACE)
    ran = cli("run", "--space", str(work / "two-sizes.toml"), "--data", str(xray_dir), "--max-trials", "2",
              "--max-epochs", "2", "--test-per-class", "8", "--quiet", cwd=work)
    assert ran.returncode == 0, ran.stderr[-3000:]
    client, experiment_id = store(work)
    mlflow.set_tracking_uri(client.tracking_uri)  # where models:/ URIs resolve
    search = tracking.latest_search(client, experiment_id)
    trials = [row["run_id"] for row in tracking.leaderboard(client, search)]
    made = cli("ensemble", "--top", "2", "--target-sensitivity", "0.9", cwd=work)
    assert made.returncode == 0, made.stderr[-3000:]
    run_id = made.stdout.split("ensemble run ")[1].split()[0]
    return SimpleNamespace(work=work, uri=client.tracking_uri, client=client, search=search, trials=trials,
                           run_id=run_id, output=made.stdout)


def test_the_ensemble_is_a_child_run_of_the_search_with_every_metric_a_trial_has(searched):
    run = searched.client.get_run(searched.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["covidsearch_kind"] == "ensemble"
    assert run.data.tags["mlflow.parentRunId"] == searched.search
    assert run.data.tags["ensemble_members"] == ",".join(searched.trials)  # best first
    sizes = [searched.client.get_run(t).data.params["input_size"] for t in searched.trials]
    assert sorted(sizes) == ["32", "40"] and run.data.params["member_input_sizes"] == ",".join(sizes)

    trial_metrics = {k for k in searched.client.get_run(searched.trials[0]).data.metrics if k.startswith("test_")}
    assert trial_metrics and trial_metrics <= set(run.data.metrics)
    assert {"covid_threshold", "test_sensitivity_covid_19_at_op", "test_specificity_covid_19_at_op_ci_low"} \
        <= set(run.data.metrics)
    assert run.data.tags["target_sensitivity"] == "0.9"
    assert "confusion_matrix.json" in {a.path for a in searched.client.list_artifacts(searched.run_id)}
    model = tracking.load_keras(f"models:/{tracking.logged_model(searched.client, run)}")
    assert model.input_shape == (None, 40, 40, 3) and model.input.dtype == "uint8"

    best = searched.client.get_run(searched.trials[0]).data.metrics["test_accuracy"]
    row = next(line for line in searched.output.splitlines() if line.startswith("accuracy "))
    assert f"{run.data.metrics['test_accuracy']:.4f} [" in row and f"{best:.4f} [" in row  # beside the best member
    listed = {r["run_id"]: r["trial"] for r in tracking.leaderboard(searched.client, searched.search)}
    assert listed[searched.run_id] == "ensemble"


@pytest.fixture(scope="module")
def committee(searched):
    """The ensemble promoted through the CLI as covid-cxr@committee."""
    result = cli("promote", searched.run_id, "--alias", "committee", "--tracking-uri", searched.uri, cwd=searched.work)
    assert result.returncode == 0, result.stderr[-3000:]
    return searched.client.get_model_version_by_alias("covid-cxr", "committee")


def members_mean(searched, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Each member's probabilities on what the ensemble feeds it (the 40 px pixels, resized and rounded for the
    32 px member), averaged; and the average of the members' own predictions of the files (their own decode)."""
    pixels = inference.pixels(files, 40, "rgb")
    fed, own = [], []
    for run_id in searched.trials:
        member = inference.load(run_id, searched.uri)
        resized = keras.ops.image.resize(pixels.astype("float32"), (member.size, member.size), antialias=True)
        x = pixels if member.size == 40 else np.floor(keras.ops.convert_to_numpy(resized) + 0.5).astype(np.uint8)
        fed.append(member.model.predict(x, verbose=0))
        own.append(inference.probabilities(member, files))
    return np.mean(fed, axis=0), np.mean(own, axis=0)


def test_the_promoted_ensemble_predicts_its_members_mean_in_a_fresh_process_and_when_served(searched, committee,
                                                                                        xray_dir):
    assert committee.run_id == searched.run_id and committee.tags["covidsearch_kind"] == "ensemble"
    assert committee.tags["ensemble_members"] == ",".join(searched.trials)
    files = sorted((xray_dir / "COVID-19").glob("*.png"))[:6] + sorted((xray_dir / "NORMAL").glob("*.png"))[:6]
    result = cli("predict", "models:/covid-cxr@committee", *map(str, files), "--format", "json",
                 "--tracking-uri", searched.uri, cwd=searched.work)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.array([[row["probabilities"][c] for c in CLASSES] for row in json.loads(result.stdout)])

    fed, own = members_mean(searched, files)
    np.testing.assert_allclose(predicted, fed, atol=1e-5)
    np.testing.assert_allclose(predicted, own, atol=0.05)  # resizing inside moves a pixel by at most a grey level

    served = mlflow.pyfunc.load_model("models:/covid-cxr@committee")  # what `covidsearch serve` answers with
    sent = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    np.testing.assert_allclose(served.predict(sent)[CLASSES].to_numpy(dtype=float), predicted, atol=1e-6)


def test_evaluate_takes_the_ensemble_run_like_a_trial(searched, xray_dir, capsys):
    code = main(["evaluate", searched.run_id, "--data", str(xray_dir), "--tracking-uri", searched.uri])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"run {searched.run_id} on ") and "input 40x40 rgb" in out


@pytest.mark.parametrize("args, message", [
    (["--top", "1"], "--top must be at least 2, not 1: one trial is its own model"),
    (["--top", "3"], "has 2 finished trial(s): --top 3 needs as many"),
    (["--top", "2", "--target-sensitivity", "1.2"], "--target-sensitivity must be in (0, 1], e.g. 0.97, not 1.2"),
])
def test_bad_top_or_target_values_are_one_line_errors_before_anything_is_recorded(searched, args, message, capsys):
    experiment_id = searched.client.get_run(searched.search).info.experiment_id
    before = len(searched.client.search_runs([experiment_id]))
    code = main(["ensemble", searched.search, *args, "--tracking-uri", searched.uri])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("covidsearch: error: ") and message in err
    assert len(searched.client.search_runs([experiment_id])) == before
