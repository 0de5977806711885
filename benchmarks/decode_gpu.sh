#!/usr/bin/env bash
# The hf fast path's GPU evidence in one device call (issue 19), logs in $OUT (default ./gpu_out):
#   1. hf_decode.py, Llama-3.1-8B shape, 3 processes on a fresh $GB10EXP_CACHE: the first compiles cold, the
#      others find its compile cache (compile_s and compile_stats per process); the copy bound by
#      hardware.measure_bandwidth and by the method before issue 19, in each process; every mode checked
#      against the reference model (logit differences).
#   2. the same benchmark from a checkout of the base commit ($BASE), same GPU, same call, with the PDL
#      setting the branch used (so the two compile the same candidate): tokens/s side by side.
#   3. the fast path's GPU tests (tests/test_gpu.py -k fast_path), on the compile cache of step 1.
# Usage, from the checkout to measure (GB10EXP_COMMIT names it where there is no .git):
#   BASE=../base BASE_COMMIT=30b0337 GB10EXP_COMMIT=$(git rev-parse HEAD) bash benchmarks/decode_gpu.sh
# STEPS (default "1 2 3") picks steps, TESTS (default fast_path) the tests' -k. All three fitted one call
# (567 s on an H100) when the step was compiled by layer; the whole-step default compiles about twice as
# long cold (and step 1's check compiles its own step), so give steps 1-2 and step 3 a call each there.
set -uo pipefail
out=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
logs=$(mktemp -d)  # each step's console; copied to $out only when the step failed ($OUT takes 8 files)
start=$SECONDS; budget=${BUDGET_S:-585}  # the device's 10-minute call, less a margin to write the logs
left() { echo $((budget - (SECONDS - start))); }
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
case "$gpu" in *H200*) short=h200; base_mode=fast_pdl;; *H100*) short=h100; base_mode=fast_nopdl;; *) short=gpu; base_mode=fast;; esac
export GB10EXP_CACHE; GB10EXP_CACHE=$(mktemp -d /tmp/gb10exp-cache.XXXXXX)  # a fresh machine: nothing compiled
versions=$(python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)")
echo "GPU $gpu; commit ${GB10EXP_COMMIT:-unknown}; base ${BASE_COMMIT:-none}; $versions; $(date -u +%FT%TZ)"

steps=" ${STEPS:-1 2 3} "
if [[ $steps == *" 1 "* ]]; then
echo "== 1. branch: cold, then warm ($(left) s left)"
timeout "$(left)" python3 benchmarks/hf_decode.py --shape llama3_1_8b --runs 3 --warmup 1 --repeats 3 --modes fast \
  --compare-bandwidth-methods --out "$out/hf_decode_cold_warm_${short}.json" > "$logs/step1.txt" 2>&1
tail -14 "$logs/step1.txt"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if 'fast' in r['modes'] else 1)" \
  "$out/hf_decode_cold_warm_${short}.json" || { echo "the fast path failed: stopping"; cp "$logs/step1.txt" "$out/"; tail -60 "$logs/step1.txt"; exit 1; }
grep -q "PDL on" "$out/hf_decode_cold_warm_${short}.json" && base_mode=fast_pdl
grep -q "PDL off" "$out/hf_decode_cold_warm_${short}.json" && base_mode=fast_nopdl
fi

if [[ $steps == *" 2 "* && -n "${BASE:-}" ]]; then
  echo "== 2. base ${BASE_COMMIT:-?}, mode $base_mode ($(left) s left)"
  (cd "$BASE" && GB10EXP_COMMIT=${BASE_COMMIT:-unknown} timeout "$(left)" python3 benchmarks/hf_decode.py \
    --shape llama3_1_8b --runs 2 --warmup 1 --repeats 3 --modes "$base_mode" --deadline-s $(( $(left) - 200 )) \
    --out "$out/hf_decode_base_${short}.json") > "$logs/step2.txt" 2>&1 || cp "$logs/step2.txt" "$out/"
  tail -6 "$logs/step2.txt"
fi

if [[ $steps == *" 3 "* ]]; then
echo "== 3. tests ($(left) s left)"
compiled=$(ls -d "$GB10EXP_CACHE"/compile/* 2>/dev/null | head -1)
compiled=${compiled:-$GB10EXP_CACHE/compile/tests}  # step 1 not run: the tests compile into a fresh cache
{ echo "commit ${GB10EXP_COMMIT:-unknown} · GPU $gpu · $(date -u +%FT%TZ) · $versions"
  echo "\$ TORCHINDUCTOR_CACHE_DIR=<step 1's compile cache> python -m pytest -m gpu tests/test_gpu.py -k ${TESTS:-fast_path} -v -s"
} > "$out/gpu_tests_fast_path_${short}.log"
TORCHINDUCTOR_CACHE_DIR=$compiled TRITON_CACHE_DIR=$compiled/triton timeout "$(left)" \
  python3 -m pytest -m gpu tests/test_gpu.py -k "${TESTS:-fast_path}" -v -s -p no:cacheprovider \
  >> "$out/gpu_tests_fast_path_${short}.log" 2>&1
echo "tests rc=$?"; grep -E "^\[|^  |PASS|FAIL|passed|failed" "$out/gpu_tests_fast_path_${short}.log" | tail -30
fi
echo "done in $((SECONDS - start)) s"
