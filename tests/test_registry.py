"""Issue #4: promote a trial to the model registry, undo it, then evaluate and predict with the champion."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, small_search
from covidsearch import demo, inference, metrics, registry, text, tracking
from covidsearch.cli import main

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]


@pytest.fixture(scope="module")
def store(xray_dir, tmp_path_factory):
    """A finished 2-trial search in a private store: its trials, best first, are what gets promoted."""
    work = tmp_path_factory.mktemp("registry")
    client, experiment_id, _ = small_search(work, xray_dir)
    uri = client.tracking_uri
    search = client.search_runs([experiment_id], "tags.covidsearch_kind = 'search'")[0]
    best, other = (row["run_id"] for row in tracking.leaderboard(client, search.info.run_id))
    return SimpleNamespace(work=work, uri=uri, client=client, experiment_id=experiment_id, search=search,
                           best=best, other=other)


def covidsearch(capsys, *args: str) -> SimpleNamespace:
    """The covidsearch command in this process (fast); `cli` runs it in a fresh one."""
    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def registry_state(client: MlflowClient) -> list:
    """Everything a promotion could change: versions, their tags and the aliases."""
    return sorted((v.name, str(v.version), v.run_id, sorted(v.tags.items()), sorted(v.aliases))
                  for v in client.search_model_versions())


@pytest.fixture(scope="module")
def champion(store):
    """The best trial promoted through the CLI, as a user starts."""
    result = cli("promote", store.best, "--tracking-uri", store.uri, cwd=store.work)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_promote_makes_the_best_trial_the_champion_with_its_record(store, champion, capsys):
    client = store.client
    version = client.get_model_version_by_alias("covid-cxr", "champion")
    assert f"registered run {store.best} as covid-cxr version {version.version}" in champion.stdout
    assert "covid-cxr@champion -> version" in champion.stdout

    run = client.get_run(store.best)
    logged = client.search_logged_models([store.experiment_id], filter_string=f"source_run_id = '{store.best}'")
    assert version.run_id == store.best and version.source == f"models:/{logged[0].model_id}"
    tags = version.tags
    assert float(tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"])
    assert float(tags["test_sensitivity_covid_19"]) == pytest.approx(run.data.metrics["test_sensitivity_covid_19"])
    assert tags["hp.learning_rate"] == run.data.params["learning_rate"]
    assert tags["hp.input_size"] == run.data.params["input_size"]
    assert tags["search_run_id"] == store.search.info.run_id
    assert tags["data_fingerprint"] == store.search.data.tags["data_fingerprint"]
    assert tags["classes"] == "COVID-19|Normal|Viral Pneumonia"

    before = registry_state(client)
    again = covidsearch(capsys, "promote", store.best, "--tracking-uri", store.uri)
    assert again.returncode == 0 and "already points to version" in again.stdout
    assert registry_state(client) == before  # no second version, nothing retagged


def test_promoting_another_trial_moves_the_alias_and_the_printed_undo_moves_it_back(store, champion, capsys):
    client = store.client
    first = client.get_model_version_by_alias("covid-cxr", "champion").version

    moved = covidsearch(capsys, "promote", store.other, "--tracking-uri", store.uri)
    assert moved.returncode == 0, moved.stderr
    second = client.get_model_version_by_alias("covid-cxr", "champion")
    assert second.run_id == store.other and second.version != first
    assert second.tags["champion.previous_version"] == str(first)
    demoted = client.get_model_version("covid-cxr", first)
    assert demoted.tags["champion.replaced_by"] == str(second.version) and demoted.tags["champion.demoted_at"]
    undo = f"covidsearch promote --version {first} --name covid-cxr --alias champion"
    assert f"undo: {undo}" in moved.stdout

    restored = covidsearch(capsys, *undo.split()[1:], "--tracking-uri", store.uri)
    assert restored.returncode == 0, restored.stderr
    assert client.get_model_version_by_alias("covid-cxr", "champion").version == first
    assert len(client.search_model_versions("name = 'covid-cxr'")) == 2  # the undo registered nothing
    assert "champion.demoted_at" not in client.get_model_version("covid-cxr", first).tags
    assert client.get_model_version("covid-cxr", second.version).tags["champion.replaced_by"] == str(first)


def test_require_refuses_a_trial_that_misses_a_bound_and_changes_nothing(store, champion, capsys):
    before = registry_state(store.client)
    accuracy = store.client.get_run(store.other).data.metrics["test_accuracy"]
    refused = covidsearch(capsys, "promote", store.other, "--require", "test_accuracy>=1.01",
                          "--require", "test_loss<=100", "--tracking-uri", store.uri)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"covidsearch: error: run {store.other} refused: "
                                      f"test_accuracy = {accuracy:.4f}, required >= 1.01")
    assert registry_state(store.client) == before

    unknown = covidsearch(capsys, "promote", store.other, "--require", "test_f2>=0.5", "--tracking-uri", store.uri)
    assert unknown.returncode == 2 and "has no metric 'test_f2'" in unknown.stderr
    garbled = covidsearch(capsys, "promote", store.other, "--require", "test_accuracy>high", "--tracking-uri", store.uri)
    assert garbled.returncode == 2 and "write METRIC>=VALUE or METRIC<=VALUE" in garbled.stderr
    passed = covidsearch(capsys, "promote", store.best, "--require", "test_accuracy>=0", "--tracking-uri", store.uri)
    assert passed.returncode == 0 and registry_state(store.client) == before


def test_a_promoted_version_carries_the_test_intervals_and_a_gate_on_them_works(store, champion, capsys):
    version = store.client.get_model_version_by_alias("covid-cxr", "champion")
    low = store.client.get_run(version.run_id).data.metrics["test_accuracy_ci_low"]
    assert float(version.tags["test_accuracy_ci_low"]) == pytest.approx(low)
    assert {"test_accuracy_ci_high", "test_sensitivity_covid_19_ci_low", "test_auc_ci_high"} <= set(version.tags)
    before = registry_state(store.client)
    for args in (["promote", version.run_id], ["promote", "--version", str(version.version)]):  # run metrics, version tags
        refused = covidsearch(capsys, *args, "--require", "test_accuracy_ci_low>=1.01", "--tracking-uri", store.uri)
        assert refused.returncode == 2 and f"test_accuracy_ci_low = {low:.4f}, required >= 1.01" in refused.stderr
        passed = covidsearch(capsys, *args, "--require", f"test_accuracy_ci_low>={low}", "--tracking-uri", store.uri)
        assert passed.returncode == 0, passed.stderr
    assert registry_state(store.client) == before


@pytest.fixture(scope="module")
def broken_trials(store):
    """A FAILED trial and a finished trial that logged no model, made directly (no slow search)."""
    client, parent = store.client, store.search.info.run_id
    failed = tracking.create_run(client, store.experiment_id, "trial-98", {"covidsearch_kind": "trial"}, parent)
    tracking.end_run(client, failed, "FAILED", "TrialFailed: training loss became NaN")
    no_model = tracking.create_run(client, store.experiment_id, "trial-99", {"covidsearch_kind": "trial"}, parent)
    client.log_metric(no_model, "test_accuracy", 0.9)
    client.set_terminated(no_model, "FINISHED")
    return SimpleNamespace(failed=failed, no_model=no_model)


def test_promote_refuses_what_is_not_a_finished_trial_with_a_model(store, champion, broken_trials, capsys):
    cases = {
        "0123456789abcdef0123456789abcdef": "unknown run id '0123456789abcdef0123456789abcdef'",
        store.search.info.run_id: "is a search run, not a trial",
        broken_trials.failed: "is FAILED, not FINISHED: only a finished trial's model can be used "
                              "(its error: TrialFailed: training loss became NaN)",
        broken_trials.no_model: "has no logged model named 'model'",
    }
    before = registry_state(store.client)
    for run_id, message in cases.items():
        result = covidsearch(capsys, "promote", run_id, "--tracking-uri", store.uri)
        assert result.returncode == 2
        assert result.stderr.startswith("covidsearch: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert registry_state(store.client) == before
    missing = covidsearch(capsys, "promote", "--version", "99", "--tracking-uri", store.uri)
    assert missing.returncode == 2 and "registered model 'covid-cxr' has no version 99" in missing.stderr


def test_evaluate_the_champion_in_a_fresh_process_with_only_the_store_uri(store, champion, xray_dir, tmp_path):
    result = cli("evaluate", "models:/covid-cxr@champion", "--data", str(xray_dir), "--log", cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": store.uri})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    version = store.client.get_model_version_by_alias("covid-cxr", "champion")
    assert f"covid-cxr version {version.version} on {xray_dir}: 120 images" in out
    # the search trained and validated on 96 of these 120 images (24 held out): said, not hidden
    assert ("warning: 96 of 120 images were in this model's training or validation split: these scores are not on "
            "unseen images") in result.stderr
    for label in ["loss", "accuracy", "TP", "FP", "TN", "FN", "precision", "recall", "macro F1", "AUC",
                  "sensitivity", "specificity", "confusion matrix"]:
        assert label in out, label
    lines = out.splitlines()
    start = lines.index("confusion matrix (rows: true class, columns: predicted)") + 2
    assert sum(int(n) for line in lines[start:start + 3] for n in line.split()[-3:]) == 120

    run_id = out.split("logged as run ")[1].split()[0]
    run = store.client.get_run(run_id)
    assert run.data.tags["covidsearch_kind"] == "evaluation" and run.data.tags["registered_version"] == str(version.version)
    accuracy = run.data.metrics["eval_accuracy"]
    assert f"accuracy   {accuracy:.4f}" in out
    bounds = tracking.interval(run.data.metrics, "eval_accuracy")
    assert bounds[0] <= accuracy <= bounds[1] and f"accuracy   {accuracy:.4f}  95% CI {text.span(bounds)}" in out
    assert text.span(tracking.interval(run.data.metrics, "eval_sensitivity_covid_19")) in out  # the class table
    assert metrics.THRESHOLD_NOTE in " ".join(out.split())  # wrapped in the output
    linked = store.client.get_logged_model(version.tags["model_id"]).metrics
    assert any(m.key == "eval_accuracy" and m.run_id == run_id and m.dataset_name == xray_dir.name for m in linked)


def test_evaluate_on_unseen_images_gives_no_overlap_warning(store, champion, tmp_path, capsys):
    unseen = demo.make_dataset(tmp_path / "unseen", per_class=6, size=48, seed=99)
    result = covidsearch(capsys, "evaluate", "models:/covid-cxr@champion", "--data", str(unseen),
                         "--tracking-uri", store.uri)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and ": 18 images" in result.stdout


def test_predict_with_the_champion_in_a_fresh_process(store, champion, xray_dir, tmp_path):
    image = xray_dir / "NORMAL" / "NORMAL-0.png"
    result = cli("predict", "models:/covid-cxr@champion", str(image), str(xray_dir / "COVID-19"), "--format", "json",
                 "--tracking-uri", store.uri, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert len(rows) == 41 and rows[0]["image"] == str(image)
    for row in rows:
        probs = row["probabilities"]
        assert list(probs) == CLASSES and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == max(probs, key=probs.get)


def test_predict_formats_and_every_way_to_name_the_model_agree(store, champion, xray_dir, tmp_path, capsys):
    image = str(xray_dir / "COVID-19" / "COVID-19-0.png")
    version = store.client.get_model_version_by_alias("covid-cxr", "champion").version
    mlflow.set_tracking_uri(store.uri)
    keras_file = tmp_path / "champion.keras"
    tracking.load_keras("models:/covid-cxr@champion").save(keras_file)

    csvs = {ref: covidsearch(capsys, "predict", ref, image, "--format", "csv", "--tracking-uri", store.uri).stdout
            for ref in ("models:/covid-cxr@champion", f"models:/covid-cxr/{version}", store.best, str(keras_file))}
    assert len(set(csvs.values())) == 1, csvs  # same model, same preprocessing, same classes
    header, row = next(iter(csvs.values())).splitlines()
    assert header == "image,predicted,COVID-19,Normal,Viral Pneumonia" and row.startswith(image + ",")

    table = covidsearch(capsys, "predict", store.best, image, "--tracking-uri", store.uri).stdout
    assert table.splitlines()[0].split() == ["image", "predicted", *"COVID-19 Normal Viral Pneumonia".split()]


def test_a_bare_keras_file_needs_three_outputs_for_the_default_classes(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 1), dtype="uint8")
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    model.save(tmp_path / "two.keras")
    with pytest.raises(registry.RegistryError, match="has 2 outputs and no class names"):
        inference.load(str(tmp_path / "two.keras"))


def test_evaluate_and_predict_name_what_they_cannot_find_or_read(store, champion, broken_trials, tmp_path, capsys):
    garbage = tmp_path / "scan.png"
    garbage.write_bytes(b"not a png")
    cases = [
        (["predict", "models:/nope@champion", str(garbage)], "no registered model 'nope'"),
        (["predict", "models:/covid-cxr@nope", str(garbage)], "registered model 'covid-cxr' has no alias 'nope' "
                                                              "(its aliases: champion)"),
        (["evaluate", "models:/covid-cxr/99", "--data", str(tmp_path)], "registered model 'covid-cxr' has no version 99"),
        (["predict", "0123456789abcdef0123456789abcdef", str(garbage)], "unknown run id"),
        (["predict", broken_trials.failed, str(garbage)], "is FAILED, not FINISHED"),
        (["predict", broken_trials.no_model, str(garbage)], "has no logged model"),
        (["predict", "models:/covid-cxr@champion", str(tmp_path / "typo.png")], "no such image or folder"),
        (["predict", "models:/covid-cxr@champion", str(garbage)], f"cannot read image {garbage}"),
        (["predict", str(tmp_path / "missing.keras"), str(garbage)], "model file not found"),
    ]
    before = registry_state(store.client)
    for args, message in cases:
        result = covidsearch(capsys, *args, "--tracking-uri", store.uri)
        assert result.returncode == 2, args
        assert result.stderr.startswith("covidsearch: error: ") and message in result.stderr, result.stderr
    assert registry_state(store.client) == before


def test_a_refused_command_in_a_fresh_process_is_one_line_and_exit_2(store, xray_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri in this process exports it
    result = cli("promote", "0123456789abcdef0123456789abcdef", "--tracking-uri", store.uri, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("covidsearch: error: unknown run id")
    image = str(xray_dir / "NORMAL" / "NORMAL-0.png")
    missing_store = cli("predict", "models:/covid-cxr@champion", image, cwd=tmp_path)
    assert missing_store.returncode == 2 and "no MLflow store at" in missing_store.stderr
    assert not (Path(tmp_path) / "mlruns").exists()  # looking for a model creates no store
