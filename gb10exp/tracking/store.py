"""The MLflow store under load: parallel jobs writing one SQLite file, and transient lock errors.

Two jobs that open a new SQLite store at once race to create MLflow's tables ("table ... already
exists"), and two writers can still collide on the database lock. So the store is created once, under
a file lock, and switched to WAL (readers never block the writer); every client call that meets
"database is locked" is retried with backoff instead of failing the job.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gb10exp.config import ConfigError

log = logging.getLogger(__name__)

LOCAL_URI = "sqlite:///mlruns/mlflow.db"  # the default store (conf/tracking/local.yaml), relative to the cwd
RETRY_DELAYS_S = (0.2, 0.5, 1, 2, 4, 8, 15)  # ~30 s in all: longer than any single MLflow write
TRANSIENT = ("database is locked", "database table is locked")
_initialized: set[str] = set()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store): the one parser of such URIs."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_sqlite(uri: str) -> None:
    """An existing file must be a SQLite database: MLflow would fail on it later, once per job, with two
    SQLAlchemy tracebacks ("file is not a database")."""
    path = sqlite_path(uri)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"tracking.uri={uri!r} is not allowed: {path} is not a SQLite database ({exc}); "
                          "point it at a new file or an MLflow store") from None


def init_sqlite(uri: str) -> None:
    """Create the MLflow tables of a SQLite store once (under a file lock) and turn on WAL."""
    path = sqlite_path(uri)
    if path is None or uri in _initialized:
        return
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.init-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second job waits here until the tables exist
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        with sqlite3.connect(path, timeout=30) as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
    _initialized.add(uri)


def with_retry(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if delay is None or not any(t in str(exc) for t in TRANSIENT):
                    raise
                log.warning("MLflow store busy (%s); retrying in %s s", str(exc).splitlines()[0][:80], delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return call


class RetryingClient:
    """An MlflowClient whose every method retries on transient SQLite lock errors."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        return with_retry(attr) if callable(attr) else attr
