# Two entry points (see README): `make train` and `make test`. Both set up .venv/ first.
PY := .venv/bin/python

.PHONY: setup train test lint format
setup: .venv/.setup-done

.venv/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

# the quick start evaluates every 50 steps on the training prompts: accuracy, distinct correct
# answers and coverage of the valid set beside the batch figures (ARGS may override it)
train: setup
	$(PY) -m flowrl_async train evaluation.every=50 evaluation.split=train $(ARGS)

test: setup
	$(PY) -m pytest -m "not slow" --durations=30 $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
