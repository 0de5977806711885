#!/usr/bin/env bash
# Sweep wall time on this machine: the same 4 jobs with Hydra's basic launcher (one after the other) and with
# hydra/launcher=ray_cluster on the 2-node loopback cluster of .ci/services.sh (1 CPU per node: two jobs at once).
# Each sweep runs from a fresh folder into its own SQLite store (the default tracking), cache=false.
#   source .ci/services.sh && nice -n 19 benchmarks/ray_vs_basic.sh [REPEATS] | tee benchmarks/results/ray_vs_basic_cpu.log
# Prints the command, commit, CPU, then per sweep: launcher, wall s of the whole command (driver start,
# preflight, jobs, summary), exit status, load averages before and after, and the sweep's summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GB10EXP_TEST_RAY_ADDRESS:?source .ci/services.sh first (it starts the Ray cluster)}"
PY=${PY:-$PWD/.venv/bin/python}
REPEATS=${1:-1}
JOBS=(model=tiny_llama qformat=bf16,fp8,int4,int4_awq calib_size=4 calib.seq_len=64 eval.seq_len=64
      eval.num_windows=4 bench.enabled=false cache=false)
echo "# $0 $REPEATS; commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- gb10exp hydra_plugins conf || echo ' (modified)');" \
     "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores; $(date -u +%FT%TZ); nice $(nice)"
echo "# jobs: ${JOBS[*]}"
for repeat in $(seq "$REPEATS"); do
    for launcher in basic ray_cluster; do
        dir=$(mktemp -d)
        load0=$(cut -d' ' -f1-3 /proc/loadavg)
        t0=$(date +%s.%N)
        rc=0
        (cd "$dir" && RAY_ADDRESS=$GB10EXP_TEST_RAY_ADDRESS RAY_AUTH_TOKEN_PATH=$GB10EXP_TEST_RAY_TOKEN_PATH \
            "$PY" -m gb10exp "${JOBS[@]}" "hydra/launcher=$launcher") >"$dir/out.log" 2>&1 || rc=$?
        t1=$(date +%s.%N)
        echo "launcher=$launcher repeat=$repeat wall_s=$(echo "$t1 - $t0" | bc | xargs printf '%.1f') exit=$rc" \
             "load_before=[$load0] load_after=[$(cut -d' ' -f1-3 /proc/loadavg)]"
        sed -n '/^== sweep/,$p' "$dir/out.log" | grep -v '^(_run_job' | sed 's/^/    /'
        [ "$rc" = 0 ] || tail -20 "$dir/out.log"
        rm -rf "$dir"
    done
done
