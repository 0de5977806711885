"""End to end, as a user runs it: a sweep on the embedded SmolLM2-135M, recorded in a real MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import E2E_SWEEP, mlflow_runs, shared_sweep


@pytest.mark.slow
def test_embedded_default_sweep_records_real_numbers(tmp_path_factory, tmp_path):
    store, out = shared_sweep(tmp_path_factory, *E2E_SWEEP)
    assert "Launching 3 jobs locally" in out.stdout + out.stderr
    assert "smollm2_135m-nvfp4-calib4-hf  FINISHED" in out.stdout  # the end-of-sweep table

    client, runs = mlflow_runs(store)
    by_format = {r.data.params["qformat.name"]: r for r in runs}
    assert sorted(by_format) == ["bf16", "fp8", "nvfp4"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1  # grouped as one sweep

    base = by_format["bf16"].data.metrics
    assert math.isfinite(base["perplexity"]) and 5.0 < base["perplexity"] < 60.0
    assert base["eval_tokens"] == 4 * 63  # eval.protocol=llamacpp: the second half of each window, less one
    for name in ("fp8", "nvfp4"):
        m = by_format[name].data.metrics
        assert m["kl_mean"] > 1e-4 and m["top1_agreement"] < 1.0, name  # the logits did change
        assert m["weight_gib"] < base["weight_gib"]
        # the in-run reference is the bf16 model on the same windows: its perplexity, at no extra cost
        assert m["reference_perplexity"] == pytest.approx(base["perplexity"], rel=1e-5), name
    assert by_format["nvfp4"].data.metrics["kl_mean"] > by_format["fp8"].data.metrics["kl_mean"]
    assert by_format["nvfp4"].data.metrics["perplexity"] > base["perplexity"]

    run = by_format["nvfp4"]
    assert run.data.params["calib_size"] == "4" and run.data.params["model.source"] == "embedded"
    assert run.data.tags["nvfp4"] == "simulated" and run.data.tags["compute_dtype"] == "float32"
    assert run.data.tags["version.nvidia-modelopt"].startswith("0.47")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "results.json"} <= artifacts
    results = json.loads(Path(client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))).read_text())
    assert results["metrics"]["perplexity"] == pytest.approx(run.data.metrics["perplexity"])
    assert len(results["windows"]["nll"]) == 4
