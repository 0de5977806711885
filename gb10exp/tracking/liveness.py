"""Which RUNNING run is really running: a heartbeat tag, and the owner's host and pid.

A job killed with SIGKILL (or a lost node) never gets to mark its run; MLflow shows it RUNNING forever.
Resume must tell such a run from one that another machine is running right now: the live one is left
alone (no duplicate), the dead one is marked KILLED with ``superseded_by`` when its replacement starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S  # a busy process still beats within this; a dead one never does


def owner_tags() -> dict[str, str]:
    return {"owner_host": socket.gethostname(), "owner_pid": str(os.getpid()), "heartbeat": str(int(time.time()))}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(run: Any, now: float | None = None) -> bool:
    """True when a RUNNING run's process is gone: dead pid on this host, or no heartbeat for a while."""
    tags = run.data.tags
    if tags.get("owner_host") == socket.gethostname() and tags.get("owner_pid", "").isdigit():
        return not _pid_alive(int(tags["owner_pid"]))
    last = float(tags.get("heartbeat") or run.info.start_time / 1000)
    return (now or time.time()) - last > STALE_AFTER_S


@contextlib.contextmanager
def heartbeat(client: Any, run_id: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Refresh the run's ``heartbeat`` tag from a daemon thread while the body runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                client.set_tag(run_id, "heartbeat", str(int(time.time())))
            except Exception as exc:  # a missed beat only delays resume; never fail the job for it
                log.debug("heartbeat failed: %s", exc)

    thread = threading.Thread(target=beat, name="mlflow-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
