#!/usr/bin/env bash
# The GPU checks of one device call (issue 8.7 / 9.1): modelopt's export of nvfp4, fp8 and int4_awq on the
# GPU with the checkpoint's files checked, then the opt-in GPU tests. Logs land in $OUT (default ./gpu_out):
#   GB10EXP_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_checks.sh
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
short=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print(next((k.lower() for k in ('H200','H100','B200','GB10') if k in n), 'gpu'))")
header="commit ${GB10EXP_COMMIT:-unknown} · GPU ${gpu} · $(date -u +%FT%TZ)"
{ echo "$header"; echo "\$ python benchmarks/export_check.py --out $out"; } > "$out/export_check_${short}.log"
python3 benchmarks/export_check.py --out "$out" >> "$out/export_check_${short}.log" 2>&1; rc1=$?
[ -f "$out/export_check.json" ] && mv "$out/export_check.json" "$out/export_check_${short}.json"
{ echo "$header"; echo "\$ python -m pytest -m gpu tests/test_gpu.py -v"; } > "$out/gpu_tests_${short}.log"
python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider >> "$out/gpu_tests_${short}.log" 2>&1; rc2=$?
tail -15 "$out/export_check_${short}.log"; tail -8 "$out/gpu_tests_${short}.log"
echo "export_check rc=$rc1 gpu tests rc=$rc2"
