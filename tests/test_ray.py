"""Sweeps through gb10exp's Ray launcher, against the real services .ci/services.sh starts: a 2-node Ray cluster
on loopback (head 127.0.0.2, node 127.0.0.3, 1 CPU each, token authentication, a bare environment) and an
MLflow server with basic-auth backed by PostgreSQL. The driver gets the cluster's token file and the MLflow
user's credentials in the variables Ray and MLflow read; the nodes have neither, so every recorded run also
shows that the launcher forwarded them.

- one FINISHED run per configuration, each tagged with the node that ran it, both nodes used; the sweep's
  relative paths land in the driver's working directory, not the nodes';
- the node running a job is SIGKILLed mid-job: its run ends KILLED, the rest of the sweep completes, the
  summary prints and the exit status is 1; the same command again runs only the lost job;
- a request without credentials is refused (401), and neither the MLflow password nor Ray's token appears in
  any output, Hydra folder, run, artifact, Ray log (both nodes), server log or database row.

hydra/launcher=ray_local (a private Ray in the driver) and the launcher's own refusals need Ray but no service.
Locally without the services the others are skipped; in CI (CI set) a missing service fails them.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from gb10exp.config import ConfigError
from gb10exp.preflight import preflight

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # .ci/services.sh
SERVICES = ("GB10EXP_TEST_RAY_ADDRESS", "GB10EXP_TEST_RAY_TOKEN_PATH", "GB10EXP_TEST_MLFLOW_LOGIN_URI",
            "GB10EXP_TEST_MLFLOW_LOGIN_USER", "GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD", "GB10EXP_TEST_PG_LOGIN_RUNS_URI",
            "GB10EXP_TEST_PG_LOGIN_USERS_URI")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
_outputs: list[str] = []  # every sweep's stdout and stderr, for the secrets test


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    missing = [name for name in SERVICES if not os.environ.get(name)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} unset in CI: .ci/run must source .ci/services.sh")
        pytest.skip("no Ray cluster / MLflow basic-auth server: source .ci/services.sh")
    return {name: os.environ[name] for name in SERVICES}


@pytest.fixture(scope="module")
def driver_env(services) -> dict[str, str]:
    """What a user exports on the driver: the cluster, its token file, the MLflow user's credentials."""
    return {"RAY_ADDRESS": services["GB10EXP_TEST_RAY_ADDRESS"],
            "RAY_AUTH_TOKEN_PATH": services["GB10EXP_TEST_RAY_TOKEN_PATH"],
            "MLFLOW_TRACKING_USERNAME": services["GB10EXP_TEST_MLFLOW_LOGIN_USER"],
            "MLFLOW_TRACKING_PASSWORD": services["GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The driver's working directory: every sweep here runs from it, with relative paths."""
    return tmp_path_factory.mktemp("ray-driver")


def _two_nodes(services) -> None:
    """Both nodes up: a node killed by an earlier test comes back (ray start, ~15 s)."""
    if not (_ray_dir() / "worker.sid").is_file():
        subprocess.run([str(ROOT / ".ci/ray_node.sh"), "start", "worker", WORKER_IP,
                        services["GB10EXP_TEST_RAY_ADDRESS"]], check=True, timeout=120)


def _need_ray() -> None:
    """Skip without Ray, without importing it: Ray reads its token settings when first imported."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -e '.[ray]'")


def _ray_dir() -> Path:
    return Path(os.environ["GB10EXP_SERVICES_DIR"]) / "ray"


@pytest.fixture(scope="module")
def client(services):
    """An MLflow client of the basic-auth server, as the test's user (MLflow reads the credentials from this
    process's environment at every request; restored after the module)."""
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"] = services["GB10EXP_TEST_MLFLOW_LOGIN_USER"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = services["GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD"]
    yield MlflowClient(tracking_uri=services["GB10EXP_TEST_MLFLOW_LOGIN_URI"])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []


def _sweep_args(services, experiment: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "gb10exp", *TINY, *args, "hydra/launcher=ray_cluster", "tracking=server",
            f"tracking.uri={services['GB10EXP_TEST_MLFLOW_LOGIN_URI']}", f"tracking.experiment={experiment}"]


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    _outputs.extend([out.stdout, out.stderr])
    return out


@pytest.fixture(scope="module")
def two_job_sweep(services, driver_env, workdir):
    """bf16 and fp8 at once: with 1 CPU per node, one job per node. A relative hydra.sweep.dir."""
    _two_nodes(services)
    experiment = f"ray-{uuid.uuid4().hex[:8]}"
    out = _run(_sweep_args(services, experiment, "qformat=bf16,fp8", "hydra.sweep.dir=sweep"), workdir, driver_env)
    return out, experiment


@pytest.mark.server
def test_sweep_runs_one_job_per_node_into_the_authenticated_server(services, client, workdir, two_job_sweep):
    out, experiment = two_job_sweep
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    runs = _runs(client, experiment)
    # Recorded although the server refuses anonymous requests and the nodes have no credentials: the launcher
    # forwarded the driver's.
    assert sorted((r.data.tags["qformat"], r.info.status) for r in runs) == [("bf16", "FINISHED"), ("fp8", "FINISHED")]
    assert sorted(r.data.tags["ray.node_ip"] for r in runs) == [HEAD_IP, WORKER_IP]
    assert len({r.data.tags["ray.node_id"] for r in runs}) == 2
    # The summary, as with the default launcher, read from the server by the driver.
    assert "== sweep sweep: 2 MLflow run(s)" in out.stdout and "FAILED" not in out.stdout
    # hydra.sweep.dir=sweep is the driver's folder (the nodes run where `ray start` ran: the checkout).
    assert sorted(p.name for p in (workdir / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]
    assert {r.data.tags["sweep_dir"] for r in runs} == {str((workdir / "sweep").resolve())}
    assert not (ROOT / "sweep").exists()


@pytest.mark.server
def test_a_job_nobody_can_run_is_refused_before_any_is_sent(services, driver_env, monkeypatch):
    """preflight joins the cluster (in this process here) and finds no node with the resource asked for."""
    _need_ray()
    import gb10exp.__main__  # noqa: F401  (registers the schemas and ${sweep_uid:}, as python -m gb10exp does)

    _two_nodes(services)
    for name, value in driver_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what the launcher would set for good in this process
    try:
        with pytest.raises(ConfigError) as refused:
            preflight([*TINY, "qformat=bf16,fp8", "hydra/launcher=ray_cluster", "+hydra.launcher.resources.spark_9=1"])
    finally:
        import ray  # imported by the launcher, after the token settings (Ray reads them when imported)

        ray.shutdown()
    assert str(refused.value).startswith("hydra.launcher: job #0 asks for {'CPU': 1.0, 'spark_9': 1.0}, more than any "
                                         f"node of the Ray cluster at {services['GB10EXP_TEST_RAY_ADDRESS']} has")
    assert f"{HEAD_IP} {{CPU: 1}}" in str(refused.value) and f"{WORKER_IP} {{CPU: 1}}" in str(refused.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["hydra.launcher.address=null"], "hydra.launcher.address=None is not allowed: give the head's host:port"),
    (["+hydra.launcher.remote.max_retries=3"], "hydra.launcher.remote.max_retries=3 is not allowed: only 0"),
    (["+hydra.launcher.init.runtime_env={env_vars: {MLFLOW_TRACKING_PASSWORD: x}}"],
     "hydra.launcher.init.runtime_env.env_vars.MLFLOW_TRACKING_PASSWORD is not allowed: Ray writes runtime_env"),
])
def test_launcher_options_that_cannot_work_are_refused(overrides, message):
    # Checked before the cluster is joined: the address (a closed port) is never tried.
    address = [] if "address" in overrides[0] else ["hydra.launcher.address=127.0.0.1:9"]
    import gb10exp.__main__  # noqa: F401  (registers the schemas and ${sweep_uid:}, as python -m gb10exp does)

    with pytest.raises(ConfigError, match=re.escape(message)):
        preflight([*TINY, "qformat=bf16,fp8", "hydra/launcher=ray_cluster", *address, *overrides])


def test_ray_token_file_is_a_secret_and_its_path_is_not(tmp_path, monkeypatch):
    from gb10exp.tracking.secrets import redact

    token = uuid.uuid4().hex * 2  # the format of Ray's tokens: 64 hex characters
    path = tmp_path / "auth_token"
    path.write_text(token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Ray's default ~/.ray/auth_token
    assert redact(f"token {token} from {path}") == f"token *** from {path}"
    (tmp_path / "home/.ray").mkdir(parents=True)
    (tmp_path / "home/.ray/auth_token").write_text("ray-default-" + token[:20])
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert redact(f"{token} ray-default-{token[:20]}") == f"{token} ***"


def _start_sweep(services, driver_env, workdir, prefix: str, windows: str):
    """A 3-job sweep (bf16, fp8, int4) on the two-node cluster, started in the background: (experiment, its
    command, the driver process)."""
    _two_nodes(services)
    experiment = f"{prefix}-{uuid.uuid4().hex[:8]}"
    command = _sweep_args(services, experiment, "qformat=bf16,fp8,int4", windows)
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **driver_env})
    return experiment, command, proc


def _wait_for_running(client, experiment: str, proc: subprocess.Popen, enough) -> list:
    """Poll the sweep's RUNNING runs until ``enough(runs)`` holds (the sweep must still be running)."""
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        running = [r for r in _runs(client, experiment) if r.info.status == "RUNNING"]
        if enough(running):
            return running
        time.sleep(0.5)  # two requests to the server per look
    raise AssertionError(f"the sweep never got there (exit {proc.poll()}): {proc.communicate()[0][-3000:]}")


@pytest.mark.server
def test_sigterm_in_the_driver_stops_every_job_and_marks_its_run_killed(services, client, driver_env, workdir):
    # 256 windows (of the 263 the text holds): ~8 s of evaluation per job, so that a job seen running is still
    # running when the signal lands (one node may start its job seconds after the other; at 64 windows a job
    # finished in between). Both are stopped: the length costs nothing.
    experiment, _, proc = _start_sweep(services, driver_env, workdir, "ray-term", "eval.num_windows=256")
    running = _wait_for_running(client, experiment, proc, lambda running: len(running) == 2)  # one job per node
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    _outputs.append(log)
    assert proc.returncode == 143, log[-4000:]  # as with the default launcher
    assert "gb10exp: stopped: SIGTERM received" in log
    # The two jobs running at the signal are stopped and their runs say why. A job that finished before both
    # nodes were busy (a node can start its job seconds after the other) stays FINISHED; no job starts after.
    ended = {r.info.run_id: (r.info.status, r.data.tags.get("error")) for r in _runs(client, experiment)}
    killed = ("KILLED", "stopped: SIGTERM in the driver")
    assert [ended[r.info.run_id] for r in running] == [killed, killed], ended
    assert Counter(ended.values()) == Counter({killed: 2, ("FINISHED", None): len(ended) - 2}), ended


@pytest.mark.server
def test_lost_node_fails_its_job_only_and_a_rerun_finishes_the_sweep(services, client, driver_env, workdir):
    # 96 windows: the job on the node has ~3 s of evaluation in which to lose its node (32 windows take ~1 s,
    # about what stopping the node takes); the other jobs run to the end, so more costs time.
    experiment, command, proc = _start_sweep(services, driver_env, workdir, "ray-lost", "eval.num_windows=96")
    running = _wait_for_running(client, experiment, proc,
                                lambda running: any(r.data.tags.get("ray.node_ip") == WORKER_IP for r in running))
    victim = next(r for r in running if r.data.tags.get("ray.node_ip") == WORKER_IP)
    subprocess.run([str(ROOT / ".ci/ray_node.sh"), "stop", "worker", "KILL"], check=True, timeout=60)
    log = proc.communicate(timeout=600)[0]
    _outputs.append(log)

    assert proc.returncode == 1, log[-4000:]
    runs = {r.info.run_id: r for r in _runs(client, experiment)}
    lost = runs.pop(victim.info.run_id)
    assert lost.info.status == "KILLED" and "NodeDiedError" in lost.data.tags["error"]
    assert [r.info.status for r in runs.values()] == ["FINISHED", "FINISHED"]
    assert "MLflow run(s)" in log and f"FAILED job {victim.data.tags['job_num']}: lost on Ray: NodeDiedError" in log

    rerun = _run(command, workdir, driver_env)  # the same command: only the lost job runs
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    after = _runs(client, experiment)
    assert Counter((r.data.tags["qformat"], r.info.status) for r in after) == {
        ("bf16", "FINISHED"): 1, ("fp8", "FINISHED"): 1, ("int4", "FINISHED"): 1,
        (victim.data.tags["qformat"], "KILLED"): 1}
    assert "== sweep" in rerun.stdout and ": 1 MLflow run(s)" in rerun.stdout


def test_local_ray_runs_the_sweep_with_the_default_relative_store(tmp_path):
    """hydra/launcher=ray_local: a private Ray in the driver; the default store (sqlite:///mlruns/mlflow.db,
    relative) and the outputs land in the driver's folder; Ray's token stays in the process (HOME untouched)."""
    from inprocess import all_runs

    _need_ray()
    home = tmp_path / "home"
    home.mkdir()
    out = _run([sys.executable, "-m", "gb10exp", *TINY, "qformat=bf16", "hydra/launcher=ray_local"], tmp_path,
               {"HOME": str(home)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    runs = all_runs(tmp_path / "mlruns")
    assert [(r.info.status, r.data.tags["qformat"]) for r in runs] == [("FINISHED", "bf16")]
    assert runs[0].data.tags["ray.node_id"] and runs[0].data.tags["sweep_dir"].startswith(str(tmp_path / "outputs"))
    assert "== sweep" in out.stdout and ": 1 MLflow run(s) in sqlite:///mlruns/mlflow.db" in out.stdout
    assert not (home / ".ray").exists()  # Ray's token was made and kept in the process, not saved


def _files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                yield path


def _database_text(uri: str) -> str:
    import sqlalchemy

    with sqlalchemy.create_engine(uri).connect() as db:
        tables = [t for (t,) in db.execute(sqlalchemy.text(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"))]
        return "\n".join(repr(row) for t in tables for row in db.execute(sqlalchemy.text(f'SELECT * FROM "{t}"')))


@pytest.mark.server
def test_no_credentials_no_entry_and_no_secret_anywhere(services, workdir, two_job_sweep):
    uri = services["GB10EXP_TEST_MLFLOW_LOGIN_URI"]
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    user, password = services["GB10EXP_TEST_MLFLOW_LOGIN_USER"], services["GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD"]
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert urllib.request.urlopen(urllib.request.Request(search, headers={"Authorization": f"Basic {auth}"}),
                                  timeout=10).status == 200

    token_file = Path(services["GB10EXP_TEST_RAY_TOKEN_PATH"])
    token = token_file.read_text().strip()
    assert len(token) == 64 and len(password) > 12
    services_dir = Path(os.environ["GB10EXP_SERVICES_DIR"])
    places = {"sweep output": "\n".join(_outputs),
              "runs database": _database_text(services["GB10EXP_TEST_PG_LOGIN_RUNS_URI"]),
              "users database": _database_text(services["GB10EXP_TEST_PG_LOGIN_USERS_URI"])}
    # The driver's folder (Hydra outputs), the checkout, the server's artifacts and log, every Ray log of both nodes.
    roots = [workdir, ROOT, services_dir / "artifacts-auth", services_dir / "ray"]
    for path in [p for root in roots for p in _files(root)] + [services_dir / "mlflow-auth.log"]:
        if path != token_file:
            places[str(path)] = path.read_bytes().decode(errors="replace")
    ray_logs = [p for p in places if "/ray/head/session_" in p or "/ray/worker/session_" in p]
    assert len(ray_logs) > 20 and any("runtime_env_agent" in p for p in ray_logs)
    assert any(p.endswith("config.yaml") and "/artifacts-auth/" in p for p in places)  # the runs' artifacts
    hits = [(where, name) for where, text in places.items()
            for name, secret in (("MLflow password", password), ("Ray token", token)) if secret in text]
    assert hits == [], hits
