"""Load: a 3-job sweep on 3 parallel workers (hydra/launcher=local_parallel) into SQLite and into the
PostgreSQL-backed MLflow server, one worker SIGKILLed mid-job; after a rerun every configuration has
exactly one FINISHED run, the killed worker's run is KILLED (superseded by its replacement), none is lost
and none is left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow
SWEEP = [
    "qformat=bf16,fp8,int4",
    "hydra/launcher=local_parallel",
    "hydra.launcher.n_jobs=3",
]


def _store(kind: str, tmp_path) -> tuple[str, list[str]]:
    if kind == "sqlite":
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        return uri, [f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path}/artifacts"]
    uri = os.environ.get("GB10EXP_TEST_MLFLOW_URI")
    if not uri:
        if os.environ.get("CI"):
            pytest.fail("GB10EXP_TEST_MLFLOW_URI is not set in CI: .ci/run must source .ci/services.sh")
        pytest.skip("no MLflow server: source .ci/services.sh to start PostgreSQL + mlflow server")
    return uri, [f"tracking.uri={uri}"]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("server", marks=pytest.mark.server)])
def test_parallel_sweep_with_a_killed_worker_is_completed_by_a_rerun(tmp_path, kind):
    from mlflow.tracking import MlflowClient

    uri, tracking = _store(kind, tmp_path)
    experiment = f"load-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable,
        "-m",
        "gb10exp",
        *TINY,
        *SWEEP,
        *tracking,
        f"tracking.experiment={experiment}",
        f"hydra.sweep.dir={tmp_path}/outputs",
    ]
    client = MlflowClient(tracking_uri=uri)

    def runs():
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id]) if exp else []

    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while True:
        try:
            running = [r for r in runs() if r.info.status == "RUNNING" and r.data.params]  # inside the job
        except Exception:  # the SQLite store is being created by the workers
            running = []
        if running:
            break
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    victim = running[0]
    worker = int(victim.data.tags["owner_pid"])
    assert worker != proc.pid  # a joblib worker, not the launcher
    os.kill(worker, signal.SIGKILL)
    try:
        log = proc.communicate(timeout=600)[0]  # joblib reports the lost worker; the other jobs end either way
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Three processes created the store and wrote to it at once: MLflow's table creation and writes must not collide.
    assert "database is locked" not in log and "already exists" not in log, log[-3000:]

    # The same command in a new sweep folder (as Hydra's default, timestamped, gives each invocation).
    again = [a for a in command if not a.startswith("hydra.sweep.dir=")] + [f"hydra.sweep.dir={tmp_path}/rerun"]
    rerun = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]

    final = runs()
    configs = {r.data.tags["config_hash"] for r in final}  # a run killed early has no params yet
    assert len(configs) == 3  # none lost
    finished = Counter(r.data.tags["config_hash"] for r in final if r.info.status == "FINISHED")
    assert finished == dict.fromkeys(configs, 1)
    assert not [r for r in final if r.info.status == "RUNNING"]
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    replacement = client.get_run(killed.data.tags["superseded_by"])
    assert replacement.info.status == "FINISHED"
    assert replacement.data.tags["config_hash"] == killed.data.tags["config_hash"]
    # Everything arrived: metrics, parameters, artifacts; and the workers of the first sweep shared its id.
    for run in (r for r in final if r.info.status == "FINISHED"):
        assert {"perplexity", "kl_mean", "weight_gib"} <= set(run.data.metrics)
        assert run.data.params["model.name"] == "tiny_llama"
        assert {"config.yaml", "overrides.yaml", "results.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # Two sweeps, two ids: every worker of a sweep records the id its launcher drew.
    assert len({r.data.tags["sweep_id"] for r in final}) == 2
    assert killed.data.tags["sweep_id"] != replacement.data.tags["sweep_id"]
