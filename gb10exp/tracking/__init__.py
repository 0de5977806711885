"""MLflow recording: one run per job, the same record every time.

params: the flattened resolved config. tags: environment (hardware, versions, git commit), the sweep, the run
identity (resume key: ``gb10exp.tracking.identity``) and its parts. artifacts: config.yaml, overrides.yaml,
results.json, and traceback.txt for a run that raised, which is marked FAILED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gb10exp.config import Config, ConfigError, TrackingConfig
from gb10exp.tracking.liveness import heartbeat, is_stale, owner_tags
from gb10exp.tracking.secrets import basic_auth_header, redact, tracking_uri
from gb10exp.tracking.store import RetryingClient, check_sqlite, init_sqlite, sqlite_path
from gb10exp.tracking.ui import ensure_view, rounded
from gb10exp.utils import check_writable

log = logging.getLogger(__name__)

# Keys that never change what a run measures: excluded from the config hash so that a rerun into
# another store, or with force=true, still finds its twin.
HASH_EXCLUDED = ("tracking", "force", "cache")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def sha16(obj: Any) -> str:
    """sha256[:16] of ``obj`` as sorted JSON: the digest of configs and of run identities."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(resolved: dict) -> str:
    """A stable hash of everything that determines a run's results."""
    return sha16({k: v for k, v in resolved.items() if k not in HASH_EXCLUDED})


_checked: set[str] = set()


def check(cfg: Config) -> None:
    """Preflight: the store can be written or the server reached (once per distinct tracking setting)."""
    if repr(cfg.tracking) not in _checked:
        check_store(cfg.tracking)
        _checked.add(repr(cfg.tracking))


def check_store(cfg: TrackingConfig) -> None:
    """Fail before quantizing when the store cannot be written or the server cannot be reached."""
    if (path := sqlite_path(cfg.uri)) is not None:
        check_writable(path.parent if str(path.parent) else Path("."), "tracking.uri", cfg.uri)
        check_sqlite(cfg.uri)
        _check_artifact_root(cfg)
    elif cfg.uri.startswith("postgresql"):
        _check_database(cfg.uri)
        _check_artifact_root(cfg)
    elif cfg.uri.startswith(("http://", "https://")):
        uri = tracking_uri(cfg.uri)  # user:password@ go to MLflow's basic-auth variables, never into a URL
        request = urllib.request.Request(uri.rstrip("/") + "/health", headers=basic_auth_header())
        try:
            urllib.request.urlopen(request, timeout=5).read()
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"tracking.uri={redact(cfg.uri)!r} cannot be reached "
                              f"({redact(str(getattr(exc, 'reason', exc)))}); start the server (mlflow "
                              "server ...), check its credentials, or use tracking=local") from exc
    else:
        raise ConfigError(f"tracking.uri={redact(cfg.uri)!r} is not allowed: use sqlite:///path/mlflow.db, "
                          "http(s)://host:port (an MLflow server) or postgresql://USER@HOST/DB (a database)")


def _check_artifact_root(cfg: TrackingConfig) -> None:
    """An unwritable artifact folder would fail after the run exists: a half-recorded run."""
    if cfg.artifact_root:
        check_writable(cfg.artifact_root, "tracking.artifact_root")


def _init_sqlite(uri: str) -> None:
    """Create a SQLite store's tables once, under a file lock: parallel jobs would race to create them."""
    try:
        init_sqlite(uri)
    except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
        raise ConfigError(f"tracking.uri={uri!r} is not a usable MLflow SQLite store ({exc}); point it at a new file") from exc


def _check_database(uri: str) -> None:
    """A database URI (the server's own store, used directly): connect once, with a short timeout."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5}).connect().close()
    except Exception as exc:  # driver errors vary (OperationalError, ImportError for a missing driver)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"tracking.uri={redact(uri)!r} cannot be reached ({redact(first)[:160]}); "
                          "start the database or fix the URI") from exc


def _experiment_id(client, cfg: TrackingConfig) -> str:
    import mlflow

    existing = client.get_experiment_by_name(cfg.experiment)
    if existing is not None:
        return existing.experiment_id
    location = Path(cfg.artifact_root, cfg.experiment).resolve().as_uri() if cfg.artifact_root else None
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # a parallel job created it first
        return client.get_experiment_by_name(cfg.experiment).experiment_id


@dataclass(frozen=True)
class FoundRun:
    """A run that resume matched, described for the log line that says why a job was skipped."""

    run_id: str
    name: str
    started: str
    sweep: str

    @classmethod
    def of(cls, run) -> FoundRun:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run.info.start_time / 1000))
        return cls(run.info.run_id, run.info.run_name or "", started, run.data.tags.get("sweep_id", "?"))

    def __str__(self) -> str:
        return f"{self.run_id} ({self.name!r}, sweep {self.sweep}, started {self.started})"


class Recorder:
    """The MLflow run of one job. Use ``with recorder.run(...)``: exceptions mark it FAILED."""

    def __init__(self, cfg: TrackingConfig):
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        _init_sqlite(cfg.uri)
        self.client = RetryingClient(MlflowClient(tracking_uri=tracking_uri(cfg.uri)))  # parallel jobs share one SQLite file
        self.experiment_id = _experiment_id(self.client, cfg)
        ensure_view(self.client, self.experiment_id)  # the UI opens on a runs table with metric columns
        self.run_id: str | None = None

    def find_finished(self, identity: str) -> FoundRun | None:
        """The FINISHED run with this run identity in this experiment, if any (resume)."""
        where = f"tags.run_identity = '{identity}' and attributes.status = 'FINISHED'"
        runs = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1)
        return FoundRun.of(runs[0]) if runs else None

    def _running_twins(self, identity: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.run_identity = '{identity}' and attributes.status = 'RUNNING'"
        )

    def find_running(self, identity: str) -> FoundRun | None:
        """The RUNNING run with this identity whose process is alive (another job or machine), if any."""
        live = [r for r in self._running_twins(identity) if r.info.run_id != self.run_id and not is_stale(r)]
        return FoundRun.of(live[0]) if live else None

    def _supersede_stale(self, identity: str | None) -> None:
        """Mark this identity's dead RUNNING runs (SIGKILL, lost node) KILLED, pointing at this run."""
        if not identity:
            return
        for r in self._running_twins(identity):
            if r.info.run_id != self.run_id and is_stale(r):
                log.info("marking run %s KILLED: its process is gone; superseded by %s", r.info.run_id, self.run_id)
                self.client.set_tag(r.info.run_id, "superseded_by", self.run_id)
                self.client.set_terminated(r.info.run_id, status="KILLED")

    def end_lost_runs(self, tags: dict[str, str], reason: str) -> list[str]:
        """Mark KILLED the RUNNING runs carrying ``tags`` (a job's sweep_dir and job_num) whose process was lost
        with its machine (a Ray node died): it cannot mark them itself, and until its heartbeat goes stale a
        rerun elsewhere would take them for live twins. Returns their ids."""
        where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=f"{where} and attributes.status = 'RUNNING'")
        for r in runs:
            self.client.set_tag(r.info.run_id, "error", redact(reason)[:400])
            self.client.set_terminated(r.info.run_id, status="KILLED")
        return [r.info.run_id for r in runs]

    @contextlib.contextmanager
    def run(self, name: str, resolved: dict, overrides: list[str], tags: dict[str, str]) -> Iterator[Recorder]:
        tags = {k: redact(str(v)) for k, v in (tags | owner_tags()).items()}
        run = self.client.create_run(self.experiment_id, run_name=redact(name), tags=tags)
        self.run_id = run.info.run_id
        try:
            self._supersede_stale(tags.get("run_identity"))
            self.log_params(flatten(resolved))
            self.log_text(OmegaConf.to_yaml(DictConfig(resolved)), "config.yaml")
            self.log_text("\n".join(overrides) + "\n", "overrides.yaml")
            with heartbeat(self.client, self.run_id):
                yield self
        except BaseException as exc:
            self.log_text("".join(traceback.format_exception(exc)), "traceback.txt")
            self.client.set_tag(self.run_id, "error", redact(f"{type(exc).__name__}: {str(exc)[:400]}"))
            self.client.set_terminated(self.run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
            raise
        self.client.set_terminated(self.run_id, status="FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """The metrics as given, plus the runs table's rounded copies of the headline ones (``tracking.ui``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in (metrics | rounded(metrics)).items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_inputs(self, datasets: list) -> None:
        """MLflow dataset inputs (``gb10exp.tracking.ui.dataset_inputs``): the Datasets column and filter."""
        self.client.log_inputs(self.run_id, datasets=datasets)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, redact(text), name)

    def log_dict(self, data: dict, name: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), name)
