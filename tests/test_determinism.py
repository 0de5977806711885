"""The same configuration run twice on the CPU gives identical metrics (cache off, so both compute)."""

from __future__ import annotations

import pytest
from inprocess import accuracy, new_store, run_job


@pytest.mark.parametrize("qformat", ["bf16", "nvfp4"])
def test_same_config_twice_gives_identical_metrics(tmp_path, qformat):
    store = new_store(tmp_path)
    first = run_job([f"qformat={qformat}", "cache=false"], store)
    second = run_job([f"qformat={qformat}", "cache=false", "force=true"], store)
    assert accuracy(first["metrics"]) == accuracy(second["metrics"])
    assert first["windows"] == second["windows"]


@pytest.mark.slow
def test_embedded_default_twice_gives_identical_metrics(tmp_path):
    store = new_store(tmp_path)
    small = ["model=smollm2_135m", "calib_size=4", "calib.seq_len=128", "eval.seq_len=128", "eval.num_windows=2"]
    first = run_job([*small, "qformat=nvfp4", "cache=false"], store)
    second = run_job([*small, "qformat=nvfp4", "cache=false", "force=true"], store)
    assert accuracy(first["metrics"]) == accuracy(second["metrics"])
