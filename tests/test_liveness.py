"""No hung or ghost runs: a run is live only while its owner's heartbeat is fresh (a reused pid never keeps
it alive), and SIGTERM / Ctrl-C end the current job cleanly: its run KILLED with a note, the process
exiting 143 / 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY, store_args
from inprocess import all_runs, client, fresh_cache, new_store, run_job

from gb10exp.tracking import liveness


def _run(tags: dict[str, str], start_ms: int | None = None):
    return SimpleNamespace(
        data=SimpleNamespace(tags=tags), info=SimpleNamespace(start_time=start_ms or int(time.time() * 1000))
    )


def _old(seconds: float = 3600) -> str:
    return str(int(time.time() - seconds))


def test_only_a_fresh_heartbeat_keeps_a_run_live():
    mine = liveness.owner_tags()
    assert mine["owner_machine"] and mine["owner_start"]  # Linux: boot id, pid namespace, start time
    assert not liveness.is_stale(_run(mine))
    # A restarted container: same hostname, same (live) pid, but nobody beats any more.
    assert liveness.is_stale(_run(mine | {"heartbeat": _old()}))
    assert liveness.is_stale(
        _run({"owner_host": mine["owner_host"], "owner_pid": str(os.getpid()), "heartbeat": _old()})
    )  # a run recorded before owner_machine existed
    # The pid now names another process (it started at another time): stale at once, heartbeat or not.
    assert liveness.is_stale(_run(mine | {"owner_start": str(int(mine["owner_start"]) + 1)}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert liveness.is_stale(_run(mine | {"owner_pid": str(dead.pid)}))
    # Another machine (or pid namespace): only its heartbeat tells.
    assert not liveness.is_stale(
        _run(mine | {"owner_machine": "elsewhere", "owner_pid": str(dead.pid), "heartbeat": _old(30)})
    )
    assert liveness.is_stale(_run(mine | {"owner_machine": "elsewhere", "heartbeat": _old()}))
    assert liveness.is_stale(
        _run({}, start_ms=int((time.time() - 3600) * 1000))
    )  # a run from before heartbeats


def test_stale_run_whose_pid_is_reused_is_rerun_and_marked_killed(tmp_path):
    store = new_store(tmp_path)
    first = run_job(["qformat=bf16"], store)
    c = client(store)
    # Turn it into what an OOM-killed job leaves after a container restart: RUNNING, owned by a pid that is
    # alive again (this very process) on this host, with a heartbeat from an hour ago.
    c.update_run(first["run_id"], status="RUNNING")
    for key, value in {"owner_pid": str(os.getpid()), "heartbeat": _old()}.items():
        c.set_tag(first["run_id"], key, value)
    rerun = run_job(["qformat=bf16"], store)
    assert not rerun.get("skipped") and rerun["run_id"] != first["run_id"]
    old = c.get_run(first["run_id"])
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == rerun["run_id"]
    assert [r.info.status for r in all_runs(store)] == ["KILLED", "FINISHED"]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_job_marks_the_run_killed_and_exits_conventionally(tmp_path, sig, status, monkeypatch):
    store = new_store(tmp_path)
    cache = fresh_cache(tmp_path / "cache", monkeypatch)  # its own: no other test's entry is being written there
    # A bigger evaluation gives a few seconds in which to send the signal.
    command = [
        sys.executable,
        "-m",
        "gb10exp",
        *TINY,
        "qformat=fp8",
        "eval.num_windows=48",
        "eval.seq_len=128",
        "cache=false",
        *store_args(store),
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not [r for r in all_runs(store) if r.info.status == "RUNNING"]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    time.sleep(1)  # inside the job's work, not at its first line
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == status, output[-3000:]
    assert f"gb10exp: stopped: {sig.name} received" in output
    (run,) = all_runs(store)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith(f"Interrupted: {sig.name} received")
    assert "perplexity" not in run.data.metrics
    # os.walk does not enter the link to the session's shared tokenizers
    left = [d for _, dirs, _ in os.walk(cache) for d in dirs if d.startswith(".tmp-")]
    assert not left, f"a temporary cache folder was left behind: {left}"
