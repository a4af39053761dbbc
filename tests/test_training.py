"""The training levers of the spaces, the kept checkpoint and the time budget, as a user would check them."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest

from conftest import cli, is_mapped, store
from covidsearch import data, demo, models, oracles, tracking, trial

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
CONVNET = {"model": "convnet", "input_size": 32, "filters": 4, "dense_units": 8, "dropout": 0.5,
           "learning_rate": 1e-3}
MOBILENET = {"model": "transfer", "backbone": "MobileNet", "alpha": 0.25, "weights": "none", "input_size": 32,
             "head_units": "16", "dropout": 0.0, "learning_rate": 1e-2, "fine_tune": "full", "head_epochs": 1}
AUGMENTED = {"augment_rotation": 10, "augment_zoom": 0.1, "augment_translation": 0.1, "augment_contrast": 0.2,
             "augment_brightness": 0.2, "augment_flip": True}


def _images(n: int = 6, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _weighted(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer.weights and layer.name != "augmentation"]


def test_augmentation_changes_training_batches_only_and_is_inert_at_predict_time():
    keras.utils.set_random_seed(1)
    augmented, plain = models.build({**CONVNET, **AUGMENTED}, 3), models.build(CONVNET, 3)
    for mine, theirs in zip(_weighted(augmented), _weighted(plain)):
        theirs.set_weights(mine.get_weights())
    x = _images()
    first, second = augmented.predict(x, verbose=0), augmented.predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, plain.predict(x, verbose=0), rtol=1e-6)
    trained = keras.ops.convert_to_numpy(augmented(x, training=True))
    assert not np.allclose(trained, first), "in training the random layers must change the images"


def test_without_augmentation_the_model_has_no_random_layer():
    assert "augmentation" not in [layer.name for layer in models.build(CONVNET, 3).layers]


def _backbone(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def _head(model: keras.Model) -> list[np.ndarray]:
    return [w.copy() for layer in model.layers if isinstance(layer, keras.layers.Dense) for w in layer.get_weights()]


def _fit_one_epoch(model: keras.Model) -> None:
    labels = keras.utils.to_categorical(np.arange(6) % 3, 3)
    model.fit(_images(), labels, batch_size=6, epochs=1, verbose=0)


def test_two_phases_train_the_head_on_a_frozen_backbone_then_fine_tune_it():
    assert models.phases(MOBILENET, 0, 5) == [(0, 1, "head"), (1, 5, "tune")]
    assert models.phases({**MOBILENET, "head_epochs": 0}, 0, 5) == [(0, 5, None)]
    assert models.phases(MOBILENET, 2, 5) == [(2, 5, "tune")]  # a Hyperband round that continues past the head
    model = models.build(MOBILENET, 3)
    backbone_before = [w.copy() for w in _backbone(model).get_weights()]
    head_before = _head(model)

    models.start_phase(model, MOBILENET, "head")
    _fit_one_epoch(model)
    assert all(np.array_equal(a, b) for a, b in zip(backbone_before, _backbone(model).get_weights()))
    assert any(not np.array_equal(a, b) for a, b in zip(head_before, _head(model)))

    models.start_phase(model, MOBILENET, "tune")
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(1e-2 * 0.1)
    trained = {w.path for w in model.trainable_weights}
    backbone = _backbone(model)
    assert {w.path for w in backbone.weights if "bn" not in w.path} <= trained  # every conv of the backbone
    assert not any("bn" in path for path in trained)  # BatchNorm stays as ImageNet left it
    _fit_one_epoch(model)
    moving = [w for w in _backbone(model).non_trainable_weights if "moving" in w.path]
    assert moving and all(np.array_equal(dict(zip((v.path for v in _backbone(model).weights), backbone_before))
                                         [w.path], w.numpy()) for w in moving), "BatchNorm statistics stay frozen"


def test_learning_rate_schedules_warm_up_then_decay_or_hold():
    def rates(config: dict, first: int = 0, end: int = 5) -> list[float]:
        schedule = trial.LearningRate(config, first, end)
        schedule.base = 1.0
        return [round(schedule.rate(epoch), 4) for epoch in range(first, end)]

    assert rates({}) == [1.0] * 5  # constant: the tutorial
    assert rates({"lr_schedule": "cosine"}) == [1.0, 0.9045, 0.6545, 0.3455, 0.0955]
    assert rates({"lr_schedule": "cosine", "warmup_epochs": 1}) == [0.5, 1.0, 0.8536, 0.5, 0.1464]
    assert rates({"lr_schedule": "constant", "warmup_epochs": 1}, first=2) == [0.5, 1.0, 1.0]


def _probabilities_model(logits: np.ndarray) -> keras.Model:
    """A model whose softmax outputs are set by hand: image i (a one-hot input) gets row i of `logits`."""
    model = keras.Sequential([keras.Input((len(logits),)), keras.layers.Dense(3, activation="softmax")])
    model.layers[0].set_weights([logits.astype("float32"), np.zeros(3, "float32")])
    return model


@pytest.mark.parametrize("objective, kept", [("val_accuracy", "surer_but_wrong_once"), ("val_loss", "cautious")])
def test_the_checkpoint_kept_is_the_epoch_best_by_the_objective(objective: str, kept: str):
    labels = np.array([0, 1, 2, 0])
    epochs = {  # 3 of 4 right but one badly wrong (high loss) / 2 of 4 right, never sure (low loss)
        "surer_but_wrong_once": np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 10, 0]]),
        "cautious": np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]),
    }
    validation = trial.ValidationMetrics(np.eye(4, dtype="float32"), labels, CLASSES, 4, objective,
                                         last_epoch=1)
    model = _probabilities_model(epochs["surer_but_wrong_once"])
    validation.set_model(model)
    seen = []
    for epoch, logits in enumerate(epochs.values()):
        model.layers[0].set_weights([logits.astype("float32"), np.zeros(3, "float32")])
        validation.on_epoch_end(epoch, {})
        seen.append(validation.epochs[-1])
    assert seen[0]["val_accuracy"] > seen[1]["val_accuracy"] and seen[0]["val_loss"] > seen[1]["val_loss"]
    assert validation.best() == seen[list(epochs).index(kept)]
    validation.restore_best()
    np.testing.assert_array_equal(model.layers[0].get_weights()[0], epochs[kept])


def test_a_trial_reads_its_split_from_the_cache_batch_by_batch_without_copying_it(tmp_path: Path):
    dataset = data.scan(demo.make_dataset(tmp_path / "xrays", per_class=150, size=48))
    parts = data.split(dataset, 28, 0.2, 8)
    plan = trial.Plan(dataset, parts, data.class_weights(dataset.labels[parts.train], 3), str(tmp_path),
                      "val_loss", 28)
    config = {**CONVNET, "input_size": 192}
    data.arrays(dataset, 192, "rgb", tmp_path)  # the scan's decode, before the trial
    model = models.build(config, 3)
    warm = data.Rows(_images(8, 192), np.arange(8))
    model.fit(trial.Batches(warm, 8, keras.utils.to_categorical(np.arange(8) % 3, 3)), verbose=0)  # traced once
    tracemalloc.start()  # numpy's allocations are traced: a copy of the split would show in full
    x_train, y_train, *_ = trial._arrays(config, plan)
    model.fit(trial.Batches(x_train, 8, keras.utils.to_categorical(y_train, 3), shuffle=True), epochs=1, verbose=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    split_bytes = int(np.prod(x_train.shape))
    assert is_mapped(x_train.pixels) and split_bytes > 30_000_000
    assert peak < split_bytes / 4, f"{peak} bytes allocated to train on a {split_bytes}-byte split"


def test_batches_hold_every_image_once_per_epoch_in_a_new_order():
    rows = data.Rows(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), np.arange(10)[::-1])
    feed = trial.Batches(rows, 4, np.arange(10), shuffle=True, seed=3)
    epochs = []
    for _ in range(2):
        batches = [feed[i] for i in range(len(feed))]
        assert all(np.array_equal(x.ravel(), 9 - y) for x, y in batches)  # pixels and labels stay paired
        epochs.append(np.concatenate([y for _, y in batches]))
        feed.on_epoch_end()
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10)) and list(epochs[0]) != list(epochs[1])


class _Clock:
    """time.monotonic for the oracle, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _budgeted(directory: Path, budget: float, reload: bool = False) -> kt.Oracle:
    oracle = oracles.make_oracle("random", "val_loss", 50, 2, seed=1, baseline=False, max_failures=3,
                                 budget=budget)
    oracle._set_project_dir(str(directory), "budget")
    if reload:
        oracle.reload()
    hp = kt.HyperParameters()
    hp.Float("learning_rate", 1e-4, 1e-2, sampling="log")
    oracle.update_space(hp)
    return oracle


def _complete(oracle: kt.Oracle, found: kt.engine.trial.Trial) -> None:
    oracle.update_trial(found.trial_id, {"val_loss": 0.5})
    found.status = kt.engine.trial.TrialStatus.COMPLETED
    oracle.end_trial(found)


def test_a_budget_starts_no_trial_that_would_not_fit_and_a_resume_has_what_is_left(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    clock = _Clock()
    monkeypatch.setattr(oracles.time, "monotonic", clock)
    running = kt.engine.trial.TrialStatus.RUNNING
    oracle = _budgeted(tmp_path, budget=100)
    first = oracle.create_trial("tuner0")  # no estimate yet: the first trial always runs
    assert first.status == running
    clock.now = 30
    _complete(oracle, first)
    second = oracle.create_trial("tuner0")  # like the first (30 s): 70 s left
    assert second.status == running
    clock.now = 75
    _complete(oracle, second)
    stopped = oracle.create_trial("tuner0")  # 25 s left, and the slower of the two took 45 s
    assert stopped.status == kt.engine.trial.TrialStatus.STOPPED
    assert oracle.stop_reason == "budget: 1:15 of 1:40 spent; the next trial (about 0:45) would not fit"
    oracle.save()

    clock.now = 5000  # stopped for a while: that time is not the search's
    resumed = _budgeted(tmp_path, budget=100, reload=True)
    assert resumed.budget_left() == pytest.approx(25)
    assert resumed.create_trial("tuner0").status == kt.engine.trial.TrialStatus.STOPPED
    resumed.save()
    more = _budgeted(tmp_path, budget=200, reload=True)
    again = more.create_trial("tuner0")
    assert again.status == running and again.trial_id == "02"  # the trial handed back runs first


def test_the_first_trial_runs_even_when_setting_up_took_the_whole_budget(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    clock = _Clock()
    monkeypatch.setattr(oracles.time, "monotonic", clock)
    oracle = _budgeted(tmp_path, budget=1)
    oracle.save()  # the tuner saves its oracle while it sets up: the budget's clock is running
    clock.now = 3  # a slow machine: loading the data and starting the workers took longer than the budget
    first = oracle.create_trial("tuner0")
    assert first.status == kt.engine.trial.TrialStatus.RUNNING
    _complete(oracle, first)
    assert oracle.create_trial("tuner0").status == kt.engine.trial.TrialStatus.STOPPED


def test_a_search_with_a_budget_ends_finished_with_its_leaderboard(xray_dir: Path, workdir: Path):
    result = cli("run", "--space", "vanilla", "--data", str(xray_dir), "--tuner", "random", "--budget", "1s",
                 "--max-epochs", "1", "--test-per-class", "8", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "of 0:01 spent: the search ends here" in result.stderr
    client, experiment_id = store(workdir)
    search = client.search_runs([experiment_id], f"tags.{tracking.KIND} = '{tracking.SEARCH}'")[0]
    assert search.info.status == "FINISHED" and search.data.tags[tracking.BUDGET] == f"{1 / 60:g}"
    trials = tracking.trial_runs(client, search.info.run_id)
    assert [r.info.status for r in trials] == ["FINISHED"]
    assert trials[0].info.run_id in result.stdout  # the leaderboard


@pytest.mark.parametrize("budget", ["90", "5 weeks"])
def test_a_budget_without_a_unit_or_above_zero_is_refused_before_anything_is_recorded(xray_dir: Path,
                                                                                     workdir: Path, budget: str):
    result = cli("run", "--space", "vanilla", "--data", str(xray_dir), "--budget", budget, cwd=workdir)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"covidsearch: error: --budget {budget!r}")
    assert not (workdir / "mlruns").exists()
