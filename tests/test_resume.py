"""Resume: identical FINISHED runs are skipped, failed and missing ones rerun, force=true reruns all; a
sweep killed with SIGKILL mid-job is completed by a rerun with exactly one FINISHED run per config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import ROOT, TINY, store_args
from inprocess import all_runs, client, new_store, run_job


def test_skips_finished_reruns_failed_and_force(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    done = run_job(["qformat=fp8"], store)
    assert run_job(["qformat=fp8"], store) == {"skipped": True, "run_id": done["run_id"]}
    assert "run_id" in run_job(["qformat=fp8", "force=true"], store) and not run_job(["qformat=fp8", "force=true"], store).get("skipped")

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr("gb10exp.runner.evaluate_accuracy", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_job(["qformat=int4"], store)
    monkeypatch.undo()
    rerun = run_job(["qformat=int4"], store)  # the failed one is not "done"
    assert not rerun.get("skipped")
    statuses = Counter((r.data.params["qformat.name"], r.info.status) for r in all_runs(store))
    assert statuses == {("fp8", "FINISHED"): 3, ("int4", "FAILED"): 1, ("int4", "FINISHED"): 1}


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the sweep to reach the kill point")


def test_sigkill_mid_sweep_then_rerun_completes_it(tmp_path):
    store = new_store(tmp_path)
    # A bigger evaluation gives the second job a few seconds in which to be killed.
    sweep = [*TINY, "qformat=bf16,fp8", "eval.num_windows=48", "eval.seq_len=128", *store_args(store)]
    command = [sys.executable, "-m", "gb10exp", *sweep]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def second_job_running() -> bool:
        if not (store / "mlflow.db").exists():
            return False
        runs = all_runs(store)
        return [r.info.status for r in runs] == ["FINISHED", "RUNNING"]

    _wait_for(second_job_running, 300, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = all_runs(store)[1]
    assert killed.info.status == "RUNNING"  # never FINISHED: nothing got to mark it

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "skipping tiny_llama-bf16" in rerun.stdout + rerun.stderr  # finished before the kill

    runs = all_runs(store)
    finished = Counter(r.data.tags["config_hash"] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == 2 and set(finished.values()) == {1}
    old = client(store).get_run(killed.info.run_id)
    replacement = [r for r in runs if r.info.status == "FINISHED" and r.info.run_id != runs[0].info.run_id][0]
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == replacement.info.run_id
    assert replacement.data.tags["config_hash"] == old.data.tags["config_hash"]
