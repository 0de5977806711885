"""Resume: identical FINISHED runs are skipped, failed and missing ones rerun, force=true reruns all; a
sweep killed with SIGKILL mid-job is completed by a rerun with exactly one FINISHED run per config. Sweeps
get unique ids, and a job leaves no global setting changed for the next one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import ROOT, TINY, store_args
from inprocess import all_runs, client, fresh_cache, new_store, run_job


def test_skips_finished_reruns_failed_and_force(tmp_path, monkeypatch):
    fresh_cache(tmp_path / "cache", monkeypatch)  # an int4 evaluation cached by an earlier test would hide the break
    store = new_store(tmp_path)
    done = run_job(["qformat=fp8"], store)
    assert run_job(["qformat=fp8"], store) == {"skipped": True, "run_id": done["run_id"]}
    assert "run_id" in run_job(["qformat=fp8", "force=true"], store) and not run_job(
        ["qformat=fp8", "force=true"], store
    ).get("skipped")

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
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

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


def test_sweeps_started_in_the_same_second_get_different_ids(monkeypatch):
    import datetime as dt

    import hydra.core.utils
    from hydra import compose, initialize_config_dir

    from gb10exp.__main__ import CONF_DIR

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 26, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)  # what Hydra's ${now:} resolver reads
    dirs = []
    for _ in range(2):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            hydra_cfg = compose("config", return_hydra_config=True).hydra
            dirs.append(str(hydra_cfg.sweep.dir))
            assert str(hydra_cfg.sweep.dir) == dirs[-1]  # drawn once per sweep, stable when read again
    assert dirs[0] != dirs[1]
    assert all(re.fullmatch(r"outputs/2026-11-26_12-00-00-[0-9a-f]{6}", d) for d in dirs), dirs


def test_two_concurrent_sweeps_each_keep_one_id_across_their_jobs(tmp_path):
    store = new_store(tmp_path)
    default_dir = f"hydra.sweep.dir={tmp_path}/outputs/${{now:%Y-%m-%d_%H-%M-%S}}-${{sweep_uid:}}"
    common = [
        *TINY,
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        f"tracking.artifact_root={store}/artifacts",
        default_dir,
    ]
    sweeps = [
        # Two jobs in the launcher's process (parallel workers keep their sweep's id too: tests/test_load.py).
        [*common, "qformat=bf16,int4"],
        [*common, "qformat=bf16", "eval.num_windows=2"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gb10exp", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in sweeps
    ]
    for proc in procs:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    ids = Counter(r.data.tags["sweep_id"] for r in all_runs(store))
    assert sorted(ids.values()) == [1, 2], ids  # the 2-job sweep shares one id, the other has its own
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{6}", i) for i in ids), ids
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == sorted(ids)


def test_a_job_restores_the_global_settings_it_changed(tmp_path, monkeypatch):
    import random

    import torch

    store = new_store(tmp_path)
    torch.manual_seed(1234)
    random.seed(1234)
    rng, py_rng, threads = torch.get_rng_state(), random.getstate(), torch.get_num_threads()
    run_job(["qformat=bf16"], store)  # the random model's loader seeds torch's generator
    assert torch.equal(torch.get_rng_state(), rng)

    from gb10exp import runner

    real = runner.evaluate_accuracy

    def meddling(*args, **kwargs):
        real(*args, **kwargs)
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        random.seed(99)
        torch.set_grad_enabled(False)
        raise RuntimeError("failed after changing global settings")

    monkeypatch.setattr(runner, "evaluate_accuracy", meddling)
    with pytest.raises(RuntimeError, match="failed after changing"):
        run_job(["qformat=bf16", "eval.num_windows=2", "cache=false"], store)
    assert torch.get_default_dtype() == torch.float32 and torch.get_num_threads() == threads
    assert random.getstate() == py_rng and torch.is_grad_enabled() and torch.equal(torch.get_rng_state(), rng)
