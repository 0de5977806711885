"""Which RUNNING run is really running (a fresh heartbeat), and what a SIGTERM or Ctrl-C does.

A job killed with SIGKILL (or on a lost node) never marks its run, which MLflow shows RUNNING forever. Resume
leaves a run another machine is running right now alone (no duplicate) and marks a dead one KILLED, with
``superseded_by``, when its replacement starts. A run is live only while its owner's ``heartbeat`` tag is
fresh: a restarted container has the same hostname and hands out the same pids again, so a pid alone never
counts. It only makes a dead owner stale sooner, when it certainly names the owner's process: same host,
kernel boot and pid namespace, and the process with that pid started at the recorded time (or is gone).

SIGTERM (docker stop, SLURM's time limit, kill) and SIGINT (Ctrl-C) raise ``Interrupted`` in the main
thread: the job's run is marked KILLED with a note (tracking.Recorder.run), temporary cache folders are
removed as the stack unwinds, and the process exits with 128 + the signal (143, 130).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from gb10exp.utils import owner_gone, process_identity

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


_received: list[int] = []  # the signal that raised Interrupted, if one did


def _raise_interrupted(signum: int, frame: Any) -> None:
    # A second signal while the first one's cleanup runs kills the process the default way.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _received.append(signum)
    raise Interrupted(signum)


def received() -> int | None:
    """The signal that raised ``Interrupted`` in this process, if any: a library that catches the
    exception and raises a plain KeyboardInterrupt instead (Ray's ray.wait does) loses which one it was."""
    return _received[0] if _received else None


def handle_signals() -> None:
    """SIGTERM and SIGINT raise ``Interrupted`` (main thread only: signals are delivered there)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_interrupted)


def owner_tags() -> dict[str, str]:
    return process_identity() | {"heartbeat": str(int(time.time()))}


def is_stale(run: Any, now: float | None = None) -> bool:
    """True when a RUNNING run's owner is gone: no fresh heartbeat, or its process provably ended."""
    tags = run.data.tags
    last = float(tags.get("heartbeat") or run.info.start_time / 1000)
    if (now or time.time()) - last > STALE_AFTER_S:
        return True
    return owner_gone(tags)


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
