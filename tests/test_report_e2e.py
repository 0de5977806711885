"""End to end: the nvfp4_claim preset on the tiny model, then the report CLI on its sweep; and the report
read through an MLflow tracking server instead of a local store."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, cli_error, free_port, run_gb10exp, serving
from inprocess import run_job
from test_report import BASE_NLL, EXPERIMENT, log_run, shifted

from gb10exp.report import Selection, build_report
from gb10exp.report.__main__ import main as report_main

TASKS = Path(__file__).parent / "fixtures" / "lm_eval_tasks"


def report_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m gb10exp.report ARGS`` through the module's main() in this process (the seconds of a Python
    start; tests/test_secrets_server.py runs the module as a command)."""
    capsys.readouterr()  # what the test printed before
    code = report_main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["gb10exp.report", *args], code, out.out, out.err)


@pytest.mark.slow
def test_claim_preset_then_report(tmp_path, capsys):
    args = [a for a in TINY if not a.startswith("calib_size=")]
    preset = ["+experiment=nvfp4_claim", *args, "eval.tasks=[gb10exp_mini_mc]", f"eval.task_include_path={TASKS}",
              "eval.task_limit=4"]
    # A calibration size the text cannot supply fails every job of the preset in preflight: nothing runs.
    assert "calib_size=100000 is not allowed" in cli_error(*preset, "calib_size=4,8,100000", store=tmp_path)
    sweep = run_gb10exp(*preset, "calib_size=4,8", store=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    # Calibration does not touch bf16: its calib-8 job finds the calib-4 run and skips.
    assert "skipping tiny_llama-bf16-hf: identical run" in sweep.stdout + sweep.stderr

    out = tmp_path / "report"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = report_cli(capsys, "--tracking-uri", uri, "--sweep-dir", str(tmp_path / "outputs"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_llama nvfp4 (calib 8): vs bf16" in result.stdout

    data = json.loads((out / "report.json").read_text())
    assert len(data["rows"]) == 9  # bf16 once, four formats at two calibration sizes
    rows = {r["qformat"]: r for r in data["rows"] if r["calib_size"] in (None, 8)}
    bf16_ppl = rows["bf16"]["metrics"]["perplexity"]
    for name in ("fp8", "nvfp4", "nvfp4_awq", "int4_awq"):
        change = rows[name]["vs_bf16"]["change"]
        # The bootstrap's point estimate from the windows equals the logged perplexities' ratio.
        assert change["point"] == pytest.approx(rows[name]["metrics"]["perplexity"] / bf16_ppl - 1, rel=1e-6)
        assert change["lo"] <= change["point"] <= change["hi"] and change["has_ci"]
        assert rows[name]["vs_bf16"]["verdict"] in ("pass", "fail", "inconclusive")
        assert 0.0 <= rows[name]["metrics"]["task/gb10exp_mini_mc/acc"] <= 1.0
    assert rows["nvfp4"]["vs_fp8"]["reference"] == rows["fp8"]["run_id"]
    assert {(v["qformat"], v["calib_size"]) for v in data["verdicts"]} == {
        ("fp8", 8),
        ("nvfp4", 8),
        ("nvfp4_awq", 8),
        ("int4_awq", 8),
    }
    assert data["prerun_failures"] == []  # jobs failing before MLflow: tests/test_report.py covers the listing

    md = (out / "report.md").read_text()
    assert (
        "gb10exp_mini_mc/acc" in md
        and "![loss against model size](loss.png)" in md
    )
    assert (out / "loss.png").stat().st_size > 10_000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("nvfp4-claim-tiny_llama")
    reports = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'report'")
    assert len(reports) == 1 and reports[0].info.run_name == "report-outputs"


@pytest.fixture
def mlflow_server(tmp_path):
    """An MLflow tracking server on loopback: the suite's own (PostgreSQL behind it, started by `make test`),
    else one started here (SQLite behind it, artifacts served by the server)."""
    if uri := os.environ.get("GB10EXP_TEST_MLFLOW_URI"):
        yield uri
        return
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination",
        str(tmp_path / "served"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # no background job workers (several 200 MB processes this test does not need)
    env = {"MLFLOW_HOME": str(tmp_path), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    with serving(command, f"{url}/health", "mlflow server", env):
        yield url


@pytest.mark.slow
def test_report_reads_a_tracking_server(mlflow_server, tmp_path):
    log_run(mlflow_server, "bf16", BASE_NLL)
    log_run(mlflow_server, "nvfp4", shifted(math.log(1.005)))
    log_run(mlflow_server, "int4_awq", None, status="FAILED", error="RuntimeError: boom")
    report = build_report(mlflow_server, Selection(experiment=EXPERIMENT), tmp_path / "r")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    nv = next(r for r in data["rows"] if r["qformat"] == "nvfp4")
    assert nv["vs_bf16"]["change"]["point"] == pytest.approx(0.005, abs=1e-12)
    assert nv["vs_bf16"]["change"]["has_ci"]  # results.json came through the server's artifact proxy
    assert [r.error for r in report.collected.unfinished] == ["RuntimeError: boom"]


def card_sweep_then_report(tmp_path: Path, capsys, in_run: bool) -> None:
    """The project card's sweep (two formats x two calibration sizes, no bf16 job) on the tiny model, then:
    the report gives every run a verdict against bf16 from its in-run reference (``in_run``), prints the
    command that adds the missing fp8 runs, which works; a separate bf16 run added afterwards gives the
    same bf16 verdicts."""
    args = [a for a in TINY if not a.startswith("calib_size=")]
    sweep = run_gb10exp(*args, "qformat=nvfp4,int4", "calib_size=4,8", store=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "ppl vs ref" in sweep.stdout
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = report_cli(
        capsys,
        "--tracking-uri",
        uri,
        "--sweep-dir",
        str(tmp_path / "outputs"),
        "--out",
        str(tmp_path / "a"),
        "--no-log",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((tmp_path / "a" / "report.json").read_text())
    command = data["fp8_command"]
    assert command is not None and f"`{command}`" in (tmp_path / "a" / "report.md").read_text()
    assert "qformat=fp8" in command and "calib_size=4,8" in command and "model=tiny_llama" in command
    assert command in first.stdout
    before = {(r["qformat"], r["calib_size"]): r["vs_bf16"] for r in data["rows"]}
    assert len(before) >= 3  # int4 needs no calibration: its second job may be skipped as identical
    if in_run:
        for c in before.values():
            assert c["source"] == "in-run reference" and c["verdict"] in ("pass", "fail", "inconclusive")

    # The printed command, as a user pastes it (into its own output folder), adds the fp8 runs.
    fp8 = subprocess.run(
        [sys.executable, *shlex.split(command)[1:], f"hydra.sweep.dir={tmp_path}/outputs-fp8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert fp8.returncode == 0, fp8.stderr[-3000:]
    # And a separate bf16 job on the same windows, into the same store.
    run_job(["qformat=bf16"], tmp_path)  # into the same store (tmp_path/mlflow.db), in this process
    second = report_cli(capsys, "--tracking-uri", uri, "--out", str(tmp_path / "b"), "--no-log")
    assert second.returncode == 0, second.stderr[-3000:]
    after = json.loads((tmp_path / "b" / "report.json").read_text())
    assert after["fp8_command"] is None
    for r in after["rows"]:
        if r["qformat"] not in ("nvfp4", "int4"):
            continue
        assert r["vs_fp8"]["source"].startswith("fp8 run ") and r["vs_fp8"]["verdict"] is not None
        c, old = r["vs_bf16"], before[(r["qformat"], r["calib_size"])]
        assert c["source"].startswith("bf16 run ")
        if in_run:  # the in-run reference and the separate bf16 run: the same numbers
            assert c["verdict"] == old["verdict"]
            for key in ("point", "lo", "hi"):
                assert c["change"][key] == pytest.approx(old["change"][key], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_card_sweep_then_report_uses_the_in_run_reference(tmp_path, capsys):
    card_sweep_then_report(tmp_path, capsys, in_run=True)
