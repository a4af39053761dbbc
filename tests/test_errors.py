"""Bad input: one clear line, a non-zero exit, no traceback, and nothing already recorded is lost."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from covidsearch import tracking
from covidsearch.cli import main


@pytest.fixture
def recorded(workdir):
    """A store that already holds a search with one finished trial."""
    client, experiment_id = tracking.connect()
    search = tracking.create_run(client, experiment_id, "search-earlier", {"covidsearch_kind": "search"})
    child = tracking.create_run(client, experiment_id, "trial-0", {"covidsearch_kind": "trial"}, parent_id=search)
    client.log_metric(child, "test_accuracy", 0.9)
    for run_id in (child, search):
        client.set_terminated(run_id, "FINISHED")
    return client, experiment_id


def _fails_clearly(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("covidsearch: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err
    return err


def _nothing_lost(client, experiment_id) -> None:
    runs = client.search_runs([experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("search-earlier", "FINISHED"),
                                                                       ("trial-0", "FINISHED")]
    assert next(r for r in runs if r.info.run_name == "trial-0").data.metrics["test_accuracy"] == 0.9


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _space_file(tmp: Path, text: str) -> str:
    path = tmp / "bad.toml"
    path.write_text(text)
    return str(path)


def test_missing_data_directory(recorded, capsys, tmp_path):
    _fails_clearly(capsys, ["run", "--data", str(tmp_path / "nowhere")], "data directory not found")
    _nothing_lost(*recorded)


def test_empty_class_folder(recorded, capsys, xray_dir, tmp_path):
    data = _copy(xray_dir, tmp_path / "data")
    for png in (data / "COVID-19").iterdir():
        png.unlink()
    _fails_clearly(capsys, ["run", "--data", str(data)], "COVID-19", "no readable image")
    _nothing_lost(*recorded)


def test_only_one_class(recorded, capsys, xray_dir):
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--classes", "COVID-19"], "at least two classes")
    _nothing_lost(*recorded)


def test_unknown_space(recorded, capsys, xray_dir):
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", "nosuch"], "unknown space 'nosuch'",
                   "vanilla")
    _nothing_lost(*recorded)


def test_space_file_with_a_syntax_error(recorded, capsys, xray_dir, tmp_path):
    space = _space_file(tmp_path, "[hyperparameters\nx = 1\n")
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", space], "not valid TOML")
    _nothing_lost(*recorded)


def test_space_file_with_an_unknown_hyperparameter_type(recorded, capsys, xray_dir, tmp_path):
    space = _space_file(tmp_path, '[hyperparameters]\nwidth = { type = "gaussian", default = 3 }\n')
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", space], "unknown type 'gaussian'")
    _nothing_lost(*recorded)


@pytest.mark.parametrize("assignment, message", [
    ("nosuch=1", "unknown name"),
    ("input_size=51", "not one of"),
    ("dropout=0.9", "outside the space"),
    ("batch_size", "expected NAME=VALUE"),
])
def test_set_of_an_unknown_name_or_a_value_outside_the_space(recorded, capsys, xray_dir, assignment, message):
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--set", assignment], message)
    _nothing_lost(*recorded)


def test_unwritable_store(capsys, xray_dir, workdir):
    blocker = workdir / "not-a-directory"
    blocker.write_text("")
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--tracking-uri", f"sqlite:///{blocker}/mlflow.db"],
                   "cannot write tracking store")


def test_unknown_run_id(recorded, capsys):
    _fails_clearly(capsys, ["runs", "--search", "0123456789abcdef"], "unknown run id '0123456789abcdef'")
    _nothing_lost(*recorded)


def test_imagenet_weights_that_cannot_be_downloaded(recorded, capsys, xray_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    err = _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", "transfer"],
                         "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "--weights PATH")
    assert "cannot download" in err
    _nothing_lost(*recorded)


def test_a_weights_file_that_does_not_fit_the_backbone(recorded, capsys, xray_dir, tmp_path):
    wrong = tmp_path / "mobilenet-alpha-0.5.weights.h5"
    keras.applications.MobileNet(alpha=0.5, weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(
        wrong)
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", "transfer", "--set", "backbone=MobileNet",
                            "--set", "alpha=0.25", "--set", "input_size=96", "--weights", str(wrong)],
                   "does not fit MobileNet alpha 0.25")
    _nothing_lost(*recorded)


def test_a_weights_file_needs_a_pinned_backbone(recorded, capsys, xray_dir, tmp_path):
    weights = tmp_path / "some.weights.h5"
    weights.write_bytes(b"")
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", "transfer", "--weights", str(weights)],
                   "pin it")
    _nothing_lost(*recorded)


def test_weights_of_another_architecture_are_refused_not_half_loaded(recorded, capsys, xray_dir, tmp_path):
    other = tmp_path / "densenet.weights.h5"
    keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(other)
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--space", "transfer", "--set", "backbone=MobileNet",
                            "--set", "alpha=0.25", "--set", "input_size=96", "--weights", str(other)],
                   "does not fit MobileNet alpha 0.25")
    _nothing_lost(*recorded)


def test_help_and_a_mistyped_option_answer_at_once_without_loading_keras(workdir):
    """The parser loads neither Keras, TensorFlow nor MLflow (seconds each), only a command that needs them;
    `runs` needs MLflow only."""
    probe = ("import sys\nfrom covidsearch import cli\ncli.parser().format_help()\n"
             "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'mlflow') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]"
    probe = ("import sys\nfrom covidsearch.cli import main\ncode = main(['runs'])\n"
             "print(code, sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))")
    runs = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=workdir)
    assert runs.stdout.strip() == "2 []", runs.stderr[-2000:]  # no store here yet: a one-line error, no Keras
    assert runs.stderr.strip().startswith("covidsearch: error: no tracking store")
    mistyped = subprocess.run([sys.executable, "-m", "covidsearch.cli", "run", "--data", "xrays", "--max-trails", "3"],
                              capture_output=True, text=True, timeout=120)
    assert mistyped.returncode == 2 and "unrecognized arguments: --max-trails" in mistyped.stderr


def test_the_program_exits_with_its_commands_status_after_every_exit_handler():
    """The covidsearch program ends without the interpreter's teardown, but only after the exit handlers a command
    registered have run and printed, with the command's status or, for an uncaught error, 1 and its traceback."""
    probe = ("import atexit, sys\nfrom covidsearch import cli\n"
             "def main():\n    atexit.register(print, 'handler ran')\n    {body}\n"
             "cli.main = main\ncli.command()\nprint('never here')")
    ended = subprocess.run([sys.executable, "-c", probe.format(body="return 3")], capture_output=True, text=True,
                           timeout=120)
    assert (ended.returncode, ended.stdout) == (3, "handler ran\n"), ended.stderr
    failed = subprocess.run([sys.executable, "-c", probe.format(body="raise RuntimeError('no luck')")],
                            capture_output=True, text=True, timeout=120)
    assert (failed.returncode, failed.stdout) == (1, "handler ran\n")
    assert "RuntimeError: no luck" in failed.stderr


@pytest.mark.parametrize("option, expected", [
    (["--max-trials", "0"], "--max-trials must be at least 1, not 0"),
    (["--max-trials", "-1"], "--max-trials must be at least 1, not -1"),
    (["--max-epochs", "0"], "--max-epochs must be at least 1, not 0"),
    (["--max-failures", "0"], "--max-failures must be at least 1, not 0"),
    (["--trials-per-worker", "0"], "--trials-per-worker must be at least 1, not 0"),
    (["--max-worker-growth", "0"], "--max-worker-growth must be a percentage above 0, not 0.0"),
    (["--workers-per-gpu", "0"], "--workers-per-gpu must be at least 1, not 0"),
    (["--test-per-class", "0"], "--test-per-class must be at least 1, not 0"),
    (["--objective", "val_nonsense"], "objective 'val_nonsense' is not a validation metric of this search"),
    (["--objective", "val_sensitivity_lung_opacity"], "val_sensitivity_covid_19"),
])
def test_a_nonsense_search_option_is_one_line_before_anything_trains(recorded, capsys, xray_dir, option, expected):
    _fails_clearly(capsys, ["run", "--data", str(xray_dir), "--tuner", "random", *option], expected)
    _nothing_lost(*recorded)
