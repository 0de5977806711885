#!/usr/bin/env bash
# The Efficiency Audit on this machine, written where the README reads it: docs/efficiency_audit/.
#   bash benchmarks/efficiency_audit.sh [extra overrides]
# Runs the preset (experiments/efficiency_audit.yaml: 16-bit, Q4_K_M, llama.cpp's NVFP4 and modelopt's nvfp4,
# nvfp4_wo, nvfp4_awq_clip deployed, all in llama.cpp) into its own store, then the report; the log starts with
# the command, the commit, the CPU and the machine's load, so every figure says where it came from.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/efficiency_audit
STORE=${STORE:-/tmp/gb10exp-efficiency-audit}
mkdir -p "$OUT" "$STORE"
PY=${PY:-.venv/bin/python}
COMMAND=("$PY" -m gb10exp +experiment=efficiency_audit "tracking.uri=sqlite:///$STORE/mlflow.db"
         "tracking.artifact_root=$STORE/artifacts" "hydra.sweep.dir=$STORE/outputs" "$@")
{
    echo "# command: ${COMMAND[*]}"
    echo "# commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- gb10exp conf experiments || echo ' (with uncommitted changes)')"
    echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores; AMX: $(grep -o -m1 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | xargs || true)"
    echo "# date: $(date -u +%FT%TZ); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    "${COMMAND[@]}" 2>&1
    echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PY" -m gb10exp.report --tracking-uri "sqlite:///$STORE/mlflow.db" --experiment efficiency-audit-smollm2_135m \
        --out "$OUT" --no-log 2>&1
} | tee "$OUT/run.log"
