"""A shared MLflow tracking server backed by PostgreSQL, started on loopback by .ci/services.sh.

Locally without it these tests are skipped; in CI (CI set) a missing or unreachable server fails them.
"""

from __future__ import annotations

import os
import uuid

import pytest
from conftest import TINY, run_gb10exp

from gb10exp.config import TrackingConfig
from gb10exp.tracking import check_store

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server_uri() -> str:
    uri = os.environ.get("GB10EXP_TEST_MLFLOW_URI")
    if not uri:
        if os.environ.get("CI"):
            pytest.fail("GB10EXP_TEST_MLFLOW_URI is not set in CI: .ci/run must source .ci/services.sh")
        pytest.skip("no MLflow server: source .ci/services.sh to start PostgreSQL + mlflow server")
    check_store(TrackingConfig(uri=uri, experiment="probe"))  # unreachable: fails, never skips
    return uri


def test_parallel_sweep_into_the_server_arrives_complete(tmp_path, server_uri):
    from mlflow.tracking import MlflowClient

    experiment = f"ci-{uuid.uuid4().hex[:8]}"
    out = run_gb10exp(*TINY, "qformat=bf16,fp8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      f"tracking.uri={server_uri}", f"tracking.experiment={experiment}",
                      f"hydra.sweep.dir={tmp_path}/outputs")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    client = MlflowClient(tracking_uri=server_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(r.data.params["qformat.name"] for r in runs) == ["bf16", "fp8"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"perplexity", "kl_mean", "weight_gib"} <= set(run.data.metrics)
        assert run.data.tags["config_hash"] and run.data.params["model.name"] == "tiny_llama"
        assert {"config.yaml", "overrides.yaml", "results.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_database_uri_is_checked(server_uri):
    if uri := os.environ.get("GB10EXP_TEST_PG_URI"):
        check_store(TrackingConfig(uri=uri, experiment="probe"))  # the server's own store, reachable
