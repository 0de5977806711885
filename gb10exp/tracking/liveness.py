"""Which RUNNING run is really running (a fresh heartbeat), and what a SIGTERM or Ctrl-C does.

A job killed with SIGKILL (or a lost node) never gets to mark its run; MLflow shows it RUNNING forever.
Resume must tell such a run from one that another machine is running right now: the live one is left
alone (no duplicate), the dead one is marked KILLED with ``superseded_by`` when its replacement starts.

A run is live only while its owner's ``heartbeat`` tag is fresh. The owner's pid alone never counts:
a restarted container has the same hostname and hands out the same pids again. The pid only makes a
dead owner stale sooner, and only when it certainly names the owner's process: same host, same kernel
boot, same pid namespace, and the process with that pid started at the recorded time (or is gone).

SIGTERM (docker stop, SLURM's time limit, kill) and SIGINT (Ctrl-C) raise ``Interrupted`` in the main
thread: the current job's run is marked KILLED with a note (tracking.Recorder.run), temporary cache
folders are removed as the stack unwinds, and the process exits with 128 + the signal (143, 130).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S  # a busy process still beats within this; a dead one never does


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: the job stops, its run becomes KILLED. A KeyboardInterrupt, so that
    code which cleans up after Ctrl-C cleans up after SIGTERM too; not an Exception, so that nothing
    that catches Exception (Hydra's job runner, our per-job error handling) swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received (Ctrl-C, docker stop, SLURM time limit or kill): the job was stopped; "
            "rerun the same command to resume"
        )

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _raise_interrupted(signum: int, frame: Any) -> None:
    # A second signal while the first one's cleanup runs kills the process the default way.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    raise Interrupted(signum)


def handle_signals() -> None:
    """SIGTERM and SIGINT raise ``Interrupted`` (main thread only: signals are delivered there)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_interrupted)


def _machine() -> str:
    """This kernel boot and pid namespace: pids mean the same process only within one of these."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: no way to know, so the pid is never trusted
        return ""
    return hashlib.sha256(f"{boot} {pidns}".encode()).hexdigest()[:16]


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ')' may hold spaces


def owner_tags() -> dict[str, str]:
    return {
        "owner_host": socket.gethostname(),
        "owner_pid": str(os.getpid()),
        "owner_machine": _machine(),
        "owner_start": _start_ticks(os.getpid()) or "",
        "heartbeat": str(int(time.time())),
    }


def _owner_certainly_gone(tags: dict[str, str]) -> bool:
    """True only when the recorded pid provably no longer names the owner (see the module docstring)."""
    machine = _machine()
    if not machine or tags.get("owner_machine") != machine or tags.get("owner_host") != socket.gethostname():
        return False
    pid, started = tags.get("owner_pid", ""), tags.get("owner_start", "")
    if not (pid.isdigit() and started):
        return False
    return _start_ticks(int(pid)) != started  # gone, or the pid now belongs to another process


def owner_alive(tags: dict[str, str]) -> bool:
    """True when ``tags`` (from ``owner_tags``) name a process that provably still runs on this machine."""
    machine = _machine()
    if not machine or tags.get("owner_machine") != machine or tags.get("owner_host") != socket.gethostname():
        return False
    pid, started = tags.get("owner_pid", ""), tags.get("owner_start", "")
    return pid.isdigit() and bool(started) and _start_ticks(int(pid)) == started


def is_stale(run: Any, now: float | None = None) -> bool:
    """True when a RUNNING run's owner is gone: no fresh heartbeat, or its process provably ended."""
    tags = run.data.tags
    last = float(tags.get("heartbeat") or run.info.start_time / 1000)
    if (now or time.time()) - last > STALE_AFTER_S:
        return True
    return _owner_certainly_gone(tags)


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
