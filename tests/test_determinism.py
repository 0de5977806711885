"""The same configuration run twice on the CPU gives identical metrics (cache off, so both compute)."""

from __future__ import annotations

import pytest
from conftest import E2E_SWEEP, runs_by_format, shared_sweep
from inprocess import accuracy, new_store, run_job


@pytest.mark.parametrize("qformat", ["bf16", "nvfp4"])
def test_same_config_twice_gives_identical_metrics(tmp_path, qformat):
    store = new_store(tmp_path)
    first = run_job([f"qformat={qformat}", "cache=false"], store)
    second = run_job([f"qformat={qformat}", "cache=false", "force=true"], store)
    assert accuracy(first["metrics"]) == accuracy(second["metrics"])
    assert first["windows"] == second["windows"]


@pytest.mark.slow
def test_embedded_default_twice_gives_identical_metrics(tmp_path_factory, tmp_path):
    # The shared sweep's nvfp4 run (computed in another process: that sweep's, or the llama.cpp sweep's,
    # which evaluates the same job first and shares the session's evaluation cache) against the same job
    # computed again here, in this process, with the cache off.
    first = runs_by_format(shared_sweep(tmp_path_factory, *E2E_SWEEP)[0])["nvfp4"]
    args = [a for a in E2E_SWEEP if not a.startswith("qformat=")]
    second = run_job(["model=smollm2_135m", *args, "qformat=nvfp4", "cache=false"], new_store(tmp_path))
    again = accuracy(second["metrics"])
    assert {"perplexity", "kl_mean", "top1_agreement"} <= set(again)
    assert again == {k: first.data.metrics.get(k) for k in again}
