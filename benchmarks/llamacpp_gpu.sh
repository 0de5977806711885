#!/usr/bin/env bash
# The device call of benchmarks/llamacpp_gpu.py: llama.cpp built with CUDA there, the GGUFs made there, all
# benchmarked in one process on one GPU. From the repository root, carrying .whl and .cache/lgpu:
#
#   GB10EXP_COMMIT=<commit> benchmarks/llamacpp_gpu.sh --shape llama3_1_8b --deadline-s 540
#
# What it needs, made on a machine with network (all ignored by git):
#   .whl/                        ../shared/device/wheels.sh nvidia-modelopt==0.47.0 (what the image lacks)
#   .cache/lgpu/llama.cpp.tar.gz the pinned llama.cpp (llama-cpp-python 0.3.36's vendor/llama.cpp), trimmed:
#                                top-level CMakeLists.txt, LICENSE, cmake/ common/ include/ src/ vendor/ app/
#                                licenses/ tools/ (without tools/ui); of ggml/ its CMake files, include/, the
#                                core src/ files, src/ggml-cpu/ and src/ggml-cuda/ (5 MB)
#   .cache/lgpu/converter/       what `make converter` installs: convert_hf_to_gguf.py, conversion/, gguf-py/
#   .cache/lgpu/tokenizer/       the embedded model's tokenizer, saved (what gb10exp gives random models)
# Results: $OUT (else /tmp/lgpu-out)/llamacpp_gpu_<gpu>.json and .log.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
PYTHONUNBUFFERED=1 exec python3 benchmarks/llamacpp_gpu.py --src .cache/lgpu/llama.cpp.tar.gz \
  --converter .cache/lgpu/converter --tokenizer .cache/lgpu/tokenizer --work /tmp/lgpu --out "${OUT:-/tmp/lgpu-out}" "$@"
