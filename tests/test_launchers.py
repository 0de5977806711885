"""Scale-out presets: parallel jobs into one SQLite store (joblib), submitit's local executor for real,
and the SLURM / Ray presets composed."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import TINY, mlflow_runs, run_gb10exp

from gb10exp.tracking import store as store_mod


def _all_finished(tmp_path, count: int) -> None:
    _, runs = mlflow_runs(tmp_path)
    assert Counter(r.info.status for r in runs) == {"FINISHED": count}
    assert len({r.data.tags["config_hash"] for r in runs}) == count


def test_submitit_local_executor(tmp_path):
    out = run_gb10exp(*TINY, "qformat=bf16,fp8", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                      store=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    _all_finished(tmp_path, 2)
    assert list((tmp_path / "outputs" / ".submitit").iterdir())  # really went through submitit


@pytest.mark.parametrize(("preset", "expected"), [
    ("slurm", "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("local_parallel", "_target_: hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
])
def test_launcher_presets_compose(preset, expected):
    out = run_gb10exp("model=tiny_llama", f"hydra/launcher={preset}", "--cfg", "hydra", "--package", "hydra.launcher")
    assert out.returncode == 0 and expected in out.stdout, out.stderr[-2000:]


def test_lock_errors_are_retried(monkeypatch):
    monkeypatch.setattr(store_mod, "RETRY_DELAYS_S", (0, 0, 0))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert store_mod.with_retry(flaky)() == "ok" and len(calls) == 3
    with pytest.raises(ValueError, match="other"):
        store_mod.with_retry(lambda: (_ for _ in ()).throw(ValueError("other")))()
