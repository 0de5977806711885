#!/usr/bin/env bash
# The fast path's cold start per compile setting, side by side in one device call (issue 19, "Cold start"):
# each entry of CONFIGS runs benchmarks/hf_decode.py (Llama-3.1-8B shape, bf16, batch 1, 128 + 256 tokens)
# on its own empty $GB10EXP_CACHE: the first process compiles cold (nothing compiled or tuned on disk), a
# second (if asked) finds that cache (warm). compile_s and compile_stats (Inductor's phases, coordinate
# descent's benchmarks, cache hits) per process; tokens/s per process; the logit check against the
# transformers reference in every process unless the entry says nocheck.
# Usage, from the checkout to measure (GB10EXP_COMMIT names it where there is no .git):
#   CONFIGS="fast:2 fast_autotune:2 fast_untuned:1:nocheck" GB10EXP_COMMIT=$(git rev-parse --short HEAD) \
#     bash benchmarks/cold_start_gpu.sh
# An entry is mode:processes[:nocheck] (modes: hf_decode.py's MODES; fast is the default, compiled by layer since
# b415395, fast_whole the whole step as one graph). Everything lands in
# $OUT/cold_start_<gpu>.tar.gz (one JSON + log per entry; the device call returns 8 files at most) and a
# table of every process is printed last. BUDGET_S (default 570) stops starting entries near the 10-minute
# limit of a device call.
set -uo pipefail
out=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
work=$(mktemp -d)
start=$SECONDS; budget=${BUDGET_S:-570}
left() { echo $((budget - (SECONDS - start))); }
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
case "$gpu" in *H200*) short=h200;; *H100*) short=h100;; *) short=gpu;; esac
versions=$(python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)")
echo "GPU $gpu; commit ${GB10EXP_COMMIT:-unknown}; $versions; $(nproc) CPUs; $(date -u +%FT%TZ)" | tee "$work/header.txt"
for entry in ${CONFIGS:-fast:2}; do
  IFS=: read -r mode runs check <<< "$entry"
  if (( $(left) < 60 )); then echo "== $mode skipped: $(left) s left"; continue; fi
  cache=$(mktemp -d /tmp/gb10exp-cache.XXXXXX)  # empty: a fresh machine for this setting
  flags=(); [[ ${check:-} == nocheck ]] && flags+=(--no-check-logits)
  echo "== $mode: $runs process(es) on an empty \$GB10EXP_CACHE ($(left) s left)"
  GB10EXP_CACHE=$cache timeout "$(left)" python3 benchmarks/hf_decode.py --shape llama3_1_8b --runs "$runs" \
    --warmup 1 --repeats 3 --modes "$mode" "${flags[@]}" --out "$work/hf_decode_cold_${mode}_${short}.json" \
    > "$work/$mode.console" 2>&1
  echo "   rc=$? after $((SECONDS - start)) s"; grep -E "tok/s|failed|Error" "$work/$mode.console" | tail -4
done
tar -C "$work" -czf "$out/cold_start_${short}.tar.gz" .
python3 - "$work" <<'EOF'
import json, pathlib, sys
print(f"\n{'mode':24} {'proc':>4} {'compile s':>9} {'tok/s':>7} {'coordesc':>8} {'fx hit/miss':>11} {'logit max diff':>14} {'argmax agree':>12}  phases (s)")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    for i, run in enumerate(r["per_run"]):
        for mode, m in run["modes"].items():
            s, c = m.get("compile_stats", {}), m.get("logit_check", {})
            phases = ", ".join(f"{k} {v}" for k, v in list(s.get("phase_s", {}).items())[:12])
            print(f"{mode:24} {i + 1:>4} {m['compile_s']:9.1f} {m['decode_tokens_per_s']:7.1f} "
                  f"{s.get('coordesc_tuning_bench', '-'):>8} {s.get('fxgraph_cache_hit', '-')}/{s.get('fxgraph_cache_miss', '-'):<9} "
                  f"{c.get('max_abs_diff', float('nan')):14.3f} {c.get('argmax_agreement', float('nan')):12.3f}  {phases}")
EOF
echo "done in $((SECONDS - start)) s"
