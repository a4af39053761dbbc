# The two set-up commands of README.md. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/covidsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/covidsearch  ## 2-trial search on synthetic images, then the leaderboard
	$(BIN)/covidsearch demo

test: $(BIN)/covidsearch  ## the test suite (CI runs exactly this); a test file per CPU core at a time
	$(BIN)/python -m pytest -q -n auto --dist loadfile

.PHONY: demo test
