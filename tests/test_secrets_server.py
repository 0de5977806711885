"""No secret anywhere, against the real PostgreSQL and MLflow server that CI starts (.ci/services.sh):
tokens planted in the environment, a password in a postgresql+psycopg2 URI and one in an http URI never
appear in the captured output, the Hydra output folders, the reports, the working tree, the server's
artifact root or any row of the database, after a sweep and a report through each URI.

Locally without the services these tests are skipped; in CI (CI set) a missing server fails them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_gb10exp

pytestmark = pytest.mark.server

# Fresh values every session, so that no file (this one included) holds them unless they leaked.
_SALT = uuid.uuid4().hex[:10]
PLANTED = {
    "HF_TOKEN": f"hf_planted{_SALT}",
    "MY_API_KEY": f"sk-planted-{_SALT}",
    "PGPASSWORD": f"plantedPW-{_SALT}",
}
HTTP_PASSWORD = f"plantedHTTP-{_SALT}"
# The CI database trusts loopback connections (initdb -A trust), so any password gets in: a planted one
# here, rather than the throwaway one written in .ci/services.sh.
PG_PASSWORD = f"plantedPG-{_SALT}"
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}


@pytest.fixture(scope="module")
def services() -> tuple[str, str]:
    mlflow_uri, pg_uri = os.environ.get("GB10EXP_TEST_MLFLOW_URI"), os.environ.get("GB10EXP_TEST_PG_URI")
    if not (mlflow_uri and pg_uri):
        if os.environ.get("CI"):
            pytest.fail(
                "GB10EXP_TEST_MLFLOW_URI / GB10EXP_TEST_PG_URI unset in CI: .ci/run must source .ci/services.sh"
            )
        pytest.skip("no MLflow server: source .ci/services.sh to start PostgreSQL + mlflow server")
    return mlflow_uri, pg_uri


def _with_password(uri: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, "", ""))


def _files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and path.stat().st_size < 50_000_000:
                yield path


def _database_text(pg_uri: str) -> str:
    """Every row of every table of the MLflow database, as one string."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_uri)
    with engine.connect() as db:
        tables = [
            t
            for (t,) in db.execute(
                sqlalchemy.text(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                )
            )
        ]
        return "\n".join(
            repr(row) for t in tables for row in db.execute(sqlalchemy.text(f'SELECT * FROM "{t}"'))
        )


def test_no_secret_anywhere_after_a_sweep_and_a_report(tmp_path, services):
    mlflow_uri, pg_uri = services
    http_uri = _with_password(mlflow_uri, "gbuser", HTTP_PASSWORD)
    db_uri = _with_password(pg_uri, urllib.parse.urlsplit(pg_uri).username, PG_PASSWORD)
    experiment = f"secrets-{uuid.uuid4().hex[:8]}"
    env = PLANTED | {"SECRET_URI": f"postgresql://me:{PG_PASSWORD}@db/x"}
    captured = []
    for label, uri, extra in [
        ("http", http_uri, []),
        ("pg", db_uri, [f"tracking.artifact_root={tmp_path}/artifacts"]),
    ]:
        out = run_gb10exp(
            *TINY,
            "qformat=bf16",
            f"tracking.uri={uri}",
            f"tracking.experiment={experiment}-{label}",
            "tracking.run_name=run-${oc.env:MY_API_KEY}",
            f"hydra.sweep.dir={tmp_path}/out-{label}",
            *extra,
            env=env,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        report = subprocess.run(
            [
                sys.executable,
                "-m",
                "gb10exp.report",
                "--tracking-uri",
                uri,
                "--experiment",
                f"{experiment}-{label}",
                "--out",
                str(tmp_path / f"report-{label}"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **env},
        )
        assert report.returncode == 0, (report.stdout + report.stderr)[-3000:]
        captured += [out.stdout, out.stderr, report.stdout, report.stderr]

    # The runs are there, recorded through the credentials, with the key masked in their names.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    for label in ("http", "pg"):
        runs = client.search_runs([client.get_experiment_by_name(f"{experiment}-{label}").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["report-" + f"{experiment}-{label}", "run-***"]
        assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "report-pg" / "report.md").is_file() and (
        tmp_path / "out-http" / "multirun.yaml"
    ).is_file()

    artifact_root = Path(os.environ["GB10EXP_SERVICES_DIR"]) / "artifacts"
    assert artifact_root.is_dir()
    places = {"captured output": "\n".join(captured), "database": _database_text(pg_uri)}
    for root in (tmp_path, ROOT, artifact_root):
        for path in _files(root):
            places[str(path)] = path.read_bytes().decode(errors="replace")
    assert len(places) > 20
    secrets = [*PLANTED.values(), HTTP_PASSWORD, PG_PASSWORD]
    hits = [(where, s) for where, text in places.items() for s in secrets if s in text]
    assert hits == [], hits


def test_http_credentials_go_to_mlflow_basic_auth(monkeypatch, services):
    from gb10exp.config import TrackingConfig
    from gb10exp.tracking import check_store
    from gb10exp.tracking.secrets import basic_auth_header, redact, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    mlflow_uri, _ = services
    uri = _with_password(mlflow_uri, "gbuser", "p%40ss-word99")
    assert tracking_uri(uri) == mlflow_uri
    assert (
        os.environ["MLFLOW_TRACKING_USERNAME"] == "gbuser"
        and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss-word99"
    )
    assert basic_auth_header() == {"Authorization": "Basic Z2J1c2VyOnBAc3Mtd29yZDk5"}
    check_store(TrackingConfig(uri=uri, experiment="probe"))  # /health with the credentials
    assert "p@ss-word99" not in redact(f"user gbuser with p@ss-word99 at {uri}")
