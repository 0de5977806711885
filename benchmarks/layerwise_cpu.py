"""Peak memory of one job on the embedded model (SmolLM2-135M, float32, 513 MiB of weights) with and without
layer-by-layer calibration and disk offload, on the CPU.

    python benchmarks/layerwise_cpu.py            # writes benchmarks/results/layerwise_cpu.{json,log}
    python benchmarks/layerwise_cpu.py --fp8      # adds the fp8 pair (128 x 512 calibration tokens: slow on a CPU)

Fresh processes run the same job (qformat=nvfp4_wo: load, calibrate, perplexity + KL + top-1 on 1 window
of 128 tokens, export): ordinary in memory; quant.layerwise=true in memory; quant.layerwise=true with
quant.offload_dir; then qformat=fp8 (activations quantized too) ordinary and with quant.offload_dir. Each
layerwise job's perplexity, KL and top-1 are compared with the ordinary job's of the same format (TOLERANCE). Each one's figures are the run's own MLflow metrics (peak resident memory per phase from
the kernel's VmHWM, reset at each phase; wall seconds per phase; bytes kept on disk and read back). All three
run with MALLOC_MMAP_THRESHOLD_=131072 (glibc returns freed large blocks at once), so the only difference is
the mode. The memory-capped proof is tests/test_layerwise.py (RLIMIT_DATA below the model's size).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gb10exp, not whichever one the environment installed
JOB = ["qformat=nvfp4_wo", "eval.seq_len=128", "eval.num_windows=1", "eval.batch_size=1", "bench.enabled=false",
       "cache=false", "export=true"]  # the job of tests/test_layerwise.py
VARIANTS = {
    "ordinary": [],
    "layerwise_in_memory": ["quant.layerwise=true"],
    "layerwise_offload": ["quant.layerwise=true", "quant.offload_dir={tmp}/offload"],
    # With --fp8: a format that quantizes activations too (FP8 weights and inputs): its input scales come from calibration
    # data, so this pair checks that layer-by-layer calibration sees the same activations as a whole-model pass.
    "fp8_ordinary": ["qformat=fp8"],
    "fp8_layerwise_offload": ["qformat=fp8", "quant.layerwise=true", "quant.offload_dir={tmp}/offload"],
}
# Layerwise vs ordinary, same format: the accuracy metrics may differ by at most this much (absolute). With
# max calibration and modelopt's default get_qdq_activations_from_prev_layer=False, every layer sees the
# full-precision activations of a whole-model pass, so the expected difference is exactly 0.
TOLERANCE = 0.0
PAIRS = {"nvfp4_wo": ("ordinary", "layerwise_offload"), "nvfp4_wo_in_memory": ("ordinary", "layerwise_in_memory"),
         "fp8": ("fp8_ordinary", "fp8_layerwise_offload")}
KEYS = ("mem_rss_peak_gib", "mem_rss_peak_load_gib", "mem_rss_peak_quantize_gib", "mem_rss_peak_evaluate_gib",
        "mem_rss_peak_export_gib", "load_s", "quantize_s", "evaluate_s", "export_s", "total_s", "perplexity", "kl_mean",
        "top1_agreement", "offload_gib", "offload_resident_gib", "offload_read_gib", "offload_read_quantize_gib",
        "offload_read_evaluate_gib", "offload_read_export_gib")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    from mlflow.tracking import MlflowClient

    out = ROOT / "benchmarks" / "results"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    results: dict = {"command": " ".join(["python benchmarks/layerwise_cpu.py", *sys.argv[1:]]), "commit": commit + ("-dirty" if dirty else ""), "cpu": cpu_model(),
                     "cores": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "job": JOB, "env": {"MALLOC_MMAP_THRESHOLD_": "131072"},
                     # the machine is shared: its load says how far the wall times are from an idle machine's
                     "loadavg_start": os.getloadavg(), "variants": {}}
    log = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            if name.startswith("fp8") and "--fp8" not in sys.argv:
                continue
            store = Path(tmp) / name
            keys = {e.split("=")[0] for e in extra}  # a variant's qformat replaces JOB's (Hydra refuses two)
            args = [*(a for a in JOB if a.split("=")[0] not in keys), *(e.format(tmp=tmp) for e in extra), f"export_dir={store}/export",
                    f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_root={store}/artifacts",
                    f"hydra.sweep.dir={store}/outputs"]
            proc = subprocess.run([sys.executable, "-m", "gb10exp", *args], cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            log += [f"== {name}: python -m gb10exp {' '.join(args)}", *proc.stdout.splitlines()[-6:],
                    f"exit {proc.returncode}"]
            if proc.returncode:
                log.append(proc.stderr[-3000:])
                continue
            client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
            run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
            results["variants"][name] = {"overrides": extra, **{k: run.data.metrics[k] for k in KEYS
                                                                 if k in run.data.metrics}}
            print(name, json.dumps(results["variants"][name]), flush=True)
    results["loadavg_end"] = os.getloadavg()
    from gb10exp.models import EMBEDDED, embedded_cache

    results["model_file_bytes"] = (embedded_cache(EMBEDDED) / "model.safetensors").stat().st_size  # float32
    results["tolerance"] = TOLERANCE
    results["comparisons"] = {}
    for pair, (a, b) in PAIRS.items():
        if a in results["variants"] and b in results["variants"]:
            diff = {k: abs(results["variants"][a][k] - results["variants"][b][k])
                    for k in ("perplexity", "kl_mean", "top1_agreement")}
            results["comparisons"][pair] = {"ordinary": a, "layerwise": b, "abs_diff": diff,
                                            "within_tolerance": max(diff.values()) <= TOLERANCE}
    table = ["variant                peak RSS GiB (load / quantize / evaluate / export)    wall s   ppl"]
    for name, m in results["variants"].items():
        table.append(f"{name:22s} {m['mem_rss_peak_gib']:.3f} ({m['mem_rss_peak_load_gib']:.3f} / "
                     f"{m['mem_rss_peak_quantize_gib']:.3f} / {m['mem_rss_peak_evaluate_gib']:.3f} / "
                     f"{m['mem_rss_peak_export_gib']:.3f})   {m['total_s']:.0f}   {m['perplexity']:.4f}")
    table += [f"{pair}: |ordinary - layerwise| {c['abs_diff']} within tolerance {TOLERANCE}: {c['within_tolerance']}"
              for pair, c in results["comparisons"].items()]
    (out / "layerwise_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "layerwise_cpu.log").write_text("\n".join([*(f"{k}: {results[k]}" for k in ("command", "commit", "cpu",
                                                                                     "cores", "date", "loadavg_start",
                                                                                     "loadavg_end", "job", "env")),
                                                      "", *log, "", *table]) + "\n")
    print("\n".join(table))
    return 0 if all(results["comparisons"].get(p, {}).get("within_tolerance") for p in results["comparisons"]) \
        and len(results["variants"]) == len([n for n in VARIANTS if "--fp8" in sys.argv or not n.startswith("fp8")]) else 1


if __name__ == "__main__":
    sys.exit(main())
