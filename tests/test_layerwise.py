"""Models larger than memory: ``quant.layerwise=true quant.offload_dir=PATH`` (docs/large_models.md).

The slow test runs the embedded model (SmolLM2-135M, float32: 513 MiB of weights) under a real memory limit
that the whole model does not fit in, in child processes: RLIMIT_DATA set to the memory the process holds
after its imports plus 90% of the model's bytes (the layers alone do not fit beside the resident embedding). RLIMIT_DATA (not RLIMIT_AS, which counts every
mapping and thread stack) with glibc's mmap threshold pinned is the limit that separates "the model fits" from
"layer by layer works" (the research behind it: /tmp/research/layerwise/REPORT.md, section 3). Linux only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_error, mlflow_runs, store_args

# A weight-only format: the quantized weights must be bit-identical to ordinary calibration's. NVFP4_wo exports
# on this model (576 is a multiple of its 16-value blocks; INT4's 128 is not).
# One window at batch 1: the (batch x positions x 49152) float32 logits, twice (quantized and reference), and
# their log-softmax chunks are the largest activations of this small-bodied, large-vocabulary model.
SMALL = ["qformat=nvfp4_wo", "eval.seq_len=128", "eval.num_windows=1", "eval.batch_size=1", "bench.enabled=false",
         "cache=false", "export=true"]
# Of the model's bytes, above what the process holds after its imports. At 0.75 the evaluation passed once and
# failed once (12 MB short, with the 108 MiB embedding resident): the job itself (MLflow, Hydra, data, logits,
# freed-but-mapped heap) takes a few hundred MiB beside the layer it streams.
LIMIT_FRACTION = 0.9

# The child: import what the job will use, then cap the data segment (heap and private writable mappings)
# at what it holds now plus the budget, then run `python -m gb10exp ARGS` in the same process.
CHILD = """
import resource, runpy, sys
import torch, transformers, accelerate, mlflow, safetensors, sqlalchemy, alembic  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import modelopt.torch.quantization, modelopt.torch.export, modelopt.torch.opt  # noqa: F401
import hydra, gb10exp.runner  # noqa: F401 (not gb10exp.__main__: runpy runs it below)
budget = int(sys.argv.pop(1))
if budget:
    status = open("/proc/self/status").read()
    vmdata = int(status.split("VmData:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (vmdata + budget, resource.RLIM_INFINITY))
sys.argv[0] = "gb10exp"
runpy.run_module("gb10exp", run_name="__main__", alter_sys=True)
"""


def run_capped(budget: int, *args: str, store: Path) -> subprocess.CompletedProcess:
    """``python -m gb10exp ARGS`` with RLIMIT_DATA = (data after imports) + ``budget`` bytes (0: no limit)."""
    # MALLOC_MMAP_THRESHOLD_: freed large blocks leave the data segment at once (glibc's dynamic threshold keeps
    # them in the heap, where the limit still counts them)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, str(budget), *args, *store_args(store)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, env=env)


def only_run(store: Path):
    _, runs = mlflow_runs(store)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def tensors(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and glibc's mmap threshold are Linux's")
def test_layerwise_offload_runs_under_a_limit_the_model_does_not_fit_and_matches_ordinary(tmp_path):
    # The reference: ordinary calibration in memory, no limit (it also writes the embedded model's cache).
    ref = run_capped(0, *SMALL, f"export_dir={tmp_path / 'ref_export'}", store=tmp_path / "ref")
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    from gb10exp.models import EMBEDDED, embedded_cache

    model_bytes = (embedded_cache(EMBEDDED) / "model.safetensors").stat().st_size
    budget = int(model_bytes * LIMIT_FRACTION)
    embedding = 49152 * 576 * 4  # resident (tied with lm_head)
    layers = model_bytes - embedding
    assert budget < model_bytes and budget - embedding < layers  # neither the model nor its layers fit

    # The negative control: the same ordinary job under the limit fails (the cap is real).
    neg = run_capped(budget, *SMALL, f"export_dir={tmp_path / 'neg_export'}", store=tmp_path / "neg")
    assert neg.returncode != 0
    assert re.search(r"unable to mmap|can't allocate|MemoryError|Cannot allocate", neg.stdout + neg.stderr), \
        neg.stdout[-2000:] + neg.stderr[-2000:]

    # Layer by layer with the decoder layers on disk, under the same limit: it finishes.
    lw = run_capped(budget, *SMALL, "quant.layerwise=true", f"quant.offload_dir={tmp_path / 'offload'}",
                    f"export_dir={tmp_path / 'lw_export'}", store=tmp_path / "lw")
    assert lw.returncode == 0, lw.stdout[-2000:] + lw.stderr[-3000:]

    a, b = tensors(tmp_path / "ref_export"), tensors(tmp_path / "lw_export")
    assert a.keys() == b.keys() and len(a) > 200
    different = [k for k in a if a[k].dtype != b[k].dtype or not a[k].equal(b[k])]
    assert not different, different[:5]  # the quantized weights and every scale, bit for bit
    m_ref, m_lw = only_run(tmp_path / "ref").data.metrics, only_run(tmp_path / "lw").data.metrics
    # Identical weights and identical arithmetic per layer: the metrics are equal, not merely close.
    for key in ("perplexity", "kl_mean", "top1_agreement", "reference_perplexity"):
        assert m_lw[key] == m_ref[key], (key, m_lw[key], m_ref[key])
    assert abs(m_lw["offload_gib"] * 2**30 - layers) < 2**20
    # Each layer read once to calibrate, at least once per evaluation pass and twice to export.
    assert m_lw["offload_read_gib"] * 2**30 >= 3 * layers
    assert m_lw["mem_rss_peak_gib"] < m_ref["mem_rss_peak_gib"]
    print(json.dumps({"model_bytes": model_bytes, "budget": budget,
                      "rss_peak_gib": {"ordinary": m_ref["mem_rss_peak_gib"], "layerwise": m_lw["mem_rss_peak_gib"]},
                      "negative": [line for line in neg.stdout.splitlines() if "FAILED job" in line]}))


@pytest.mark.parametrize(("args", "match"), [
    (["quant.offload_dir=/tmp/x"], r"quant.offload_dir='/tmp/x' is not allowed: .*together with quant.layerwise=true"),
    (["quant.layerwise=true", "qformat=nvfp4_awq"], r"qformat=nvfp4_awq \(algorithm awq_lite\).*AWQ"),
    (["quant.layerwise=true", "qformat=nvfp4_svdquant"], r"algorithm svdquant"),
    (["quant.layerwise=true", "qformat=int4_awq"], r"algorithm awq_lite"),
    (["quant.layerwise=true", "qformat=auto"], r"qformat=auto \(kind=auto\)"),
    (["quant.layerwise=true", "qformat=bf16"], r"qformat=bf16 \(kind=none\)"),
    (["quant.layerwise=true", "quant.offload_dir=/tmp/x", "model=tiny_llama"], r"source=random.*safetensors"),
    (["quant.layerwise=true", "quant.offload_dir=/tmp/x", "bench.measure_fake_quant=true"],
     r"bench.measure_fake_quant=true is not allowed with quant.offload_dir"),
    (["quant.layerwise=true", "quant.offload_dir=/tmp/x", "eval.tasks=[arc_easy]"], r"eval.tasks=\['arc_easy'\]"),
])
def test_what_layerwise_cannot_do_is_refused_in_one_line(args, match, tmp_path):
    line = cli_error(*args, store=tmp_path)
    assert re.search(match, line), line


def test_layerwise_in_memory_equals_ordinary_on_the_tiny_model(tmp_path):
    """Without offload, quant.layerwise changes how calibration runs, never its result (max calibration)."""
    from tests.inprocess import new_store, run_job

    results = {lw: run_job(["qformat=fp8", "cache=false", f"quant.layerwise={lw}"], new_store(tmp_path / str(lw)))
               for lw in (False, True)}
    for key in ("perplexity", "kl_mean", "top1_agreement"):
        assert results[True]["metrics"][key] == results[False]["metrics"][key], key
    assert results[True]["metrics"]["mem_rss_peak_quantize_gib"] > 0
