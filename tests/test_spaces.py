"""Where `--space NAME` finds its file: a user's own experiments/ folder, then the spaces covidsearch ships
(also from a wheel, where there is no source checkout beside the package)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
