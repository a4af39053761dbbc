"""Where `--space NAME` finds its file: a user's own experiments/ folder, then the spaces covidsearch ships
(also from a wheel, where there is no source checkout beside the package)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from covidsearch import spaces

REPO = Path(__file__).resolve().parents[1]


def test_a_space_in_my_experiments_folder_is_found_by_name_and_comes_before_a_built_in_one(workdir):
    (workdir / "experiments").mkdir()
    mine = (REPO / "experiments" / "vanilla.toml").read_text().replace("max_trials = 20", "max_trials = 7")
    (workdir / "experiments" / "vanilla.toml").write_text(mine)
    (workdir / "experiments" / "wide.toml").write_text(mine)

    assert spaces.load("wide").search["max_trials"] == 7
    assert spaces.load("vanilla").search["max_trials"] == 7  # mine, not the built-in one
    assert spaces.load("transfer").fixed["model"] == "transfer"  # built in, still found


def test_the_built_in_spaces_are_found_by_name_from_an_installed_wheel(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for folder in ("covidsearch", "experiments"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    (built,) = (tmp_path / "dist").glob("covidsearch-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(built)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]

    (tmp_path / "elsewhere").mkdir()  # no experiments/ here, and no checkout beside the installed package
    shown = subprocess.run([sys.executable, "-c", "from covidsearch import spaces\n"
                            "for name in ('vanilla', 'transfer'): print(spaces.resolve(name))"],
                           cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.split() == [str(tmp_path / "site" / "covidsearch" / "experiments" / f"{name}.toml")
                                    for name in ("vanilla", "transfer")]


# A hyperparameter that contradicts itself, and the error that names the contradiction (not its symptom).
CONTRADICTIONS = {
    "min above max": ('dropout = { type = "float", min = 0.7, max = 0.1, default = 0.5 }',
                      "hyperparameter 'dropout': min 0.7 is greater than max 0.1"),
    "zero step": ('filters = { type = "int", min = 16, max = 64, step = 0, default = 32 }',
                  "hyperparameter 'filters': step 0 must be greater than 0"),
    "negative step": ('dropout = { type = "float", min = 0.0, max = 0.7, step = -0.1, default = 0.5 }',
                      "hyperparameter 'dropout': step -0.1 must be greater than 0"),
    "no choices": ('optimizer = { type = "choice", values = [], default = "adam" }',
                   "hyperparameter 'optimizer': values is empty; a choice needs at least one value"),
    "log from zero": ('learning_rate = { type = "float", min = 0.0, max = 1e-2, sampling = "log", default = 1e-3 }',
                      "hyperparameter 'learning_rate': log sampling needs min greater than 0, got min 0.0"),
    "fractional int": ('filters = { type = "int", min = 16.5, max = 64, default = 32 }',
                       "hyperparameter 'filters': min 16.5 must be a whole number for type int"),
    "text for a number": ('dropout = { type = "float", min = "none", max = 0.7, default = 0.5 }',
                          "hyperparameter 'dropout': min must be a number, got 'none'"),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_a_hyperparameter_that_contradicts_itself_is_reported_as_that_problem(tmp_path, case):
    entry, problem = CONTRADICTIONS[case]
    space = tmp_path / "mine.toml"
    space.write_text(f"[hyperparameters]\n{entry}\n")
    with pytest.raises(spaces.SpaceError) as err:
        spaces.load(str(space))
    assert str(err.value) == f"{space}: {problem}"
