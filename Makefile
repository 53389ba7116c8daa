# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
DEMO_USERS ?= 1 100 500

.PHONY: install lint format test test-fast demo serve bench clean

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

demo: install
	$(BIN)/recommender data fetch ml-100k
	$(BIN)/recommender train --dataset ml-100k --out $(RUN) --overwrite
	$(BIN)/recommender evaluate --run $(RUN)
	for u in $(DEMO_USERS); do $(BIN)/recommender recommend --run $(RUN) --user $$u --k 10 --explain; done

serve: install
	$(BIN)/recommender serve --run $(RUN)

# Needs the demo run (make demo) for the serving benchmark; see docs/BENCHMARKS.md.
bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_loop.py
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_serving.py --run $(RUN)
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
