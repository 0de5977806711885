"""The report: its numbers against runs whose metrics are known, the verdict at its edges, failed runs.

Runs are written straight into a temporary SQLite store with the MLflow client (no model runs), with
per-window sums built so that every perplexity ratio is known in closed form.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from gb10exp.config import ConfigError
from gb10exp.report import Selection, build_report
from gb10exp.report.__main__ import main as report_main
from gb10exp.report.stats import Interval, WindowMismatch, relative_change
from gb10exp.report.verdict import Verdict, verdict

TOKENS = [63.0] * 8  # 8 windows of 63 predicted tokens
BASE_NLL = [2.0 * 63, 2.5 * 63, 1.8 * 63, 3.0 * 63, 2.2 * 63, 2.9 * 63, 2.1 * 63, 2.4 * 63]
EXPERIMENT = "gb10exp-known"


def shifted(per_token: list[float] | float) -> list[float]:
    """The baseline windows with each window's NLL raised by ``per_token`` nats per token."""
    shifts = per_token if isinstance(per_token, list) else [per_token] * len(BASE_NLL)
    return [n + s * t for n, s, t in zip(BASE_NLL, shifts, TOKENS, strict=True)]


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / sum(TOKENS))


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


# The identity helper's digest tags (CONTRACT): runs with equal values scored the same tokens the same way.
DIGESTS = {
    "eval_digest": "e1e1e1e1e1e1e1e1",
    "tokenizer_digest": "70c070c070c070c0",
    "compute_dtype": "float32",
}


QUANT_ALGO = {
    "fp8": "FP8",
    "nvfp4": "NVFP4",
    "nvfp4_wo": "W4A16_NVFP4",
    "nvfp4_awq": "NVFP4_AWQ",
    "int4": "W4A16_AWQ",
    "int4_awq": "W4A16_AWQ",
    "w4a8_awq": "W4A8_AWQ",
}


def log_run(
    uri: str,
    qformat: str,
    nll: list[float] | None,
    calib_size: int = 16,
    status: str = "FINISHED",
    experiment: str = EXPERIMENT,
    sweep: str = "sweep-a",
    sweep_dir: str | None = None,
    error: str | None = None,
    extra_metrics: dict[str, float] | None = None,
    config_hash: str | None = None,
    num_windows: int = 8,
    seed: int = 0,
    tags: dict[str, str] | None = None,
    ref_nll: list[float] | None = None,
    overrides: list[str] | None = None,
) -> str:
    """One run as gb10exp records it: params, tags, metrics, results.json and overrides.yaml.

    ``ref_nll``: the in-run reference exactly as the evaluation records it (CONTRACT): results.json
    ``windows.ref_nll`` beside ``windows.nll`` and metrics ``reference_perplexity``/``reference_nll_mean``.
    ``tags``: extra tags, e.g. ``DIGESTS`` (runs without them are old runs, paired by params)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    quantized = qformat != "bf16"
    suffix = f"-seed{seed}" if seed else ""
    all_tags = {
        "qformat": qformat,
        "model": "known",
        "sweep_id": sweep,
        "sweep_dir": sweep_dir or f"/nonexistent/{sweep}",
        "config_hash": config_hash or f"{qformat}-{calib_size}{suffix}",
        "cpu": "test cpu",
        "gpu": "none",
        "git_commit": "abc123",
        **(tags or {}),
    }
    if error:
        all_tags["error"] = error
    run = client.create_run(exp_id, run_name=f"known-{qformat}-calib{calib_size}{suffix}", tags=all_tags)
    rid = run.info.run_id
    params = {
        "model.name": "known",
        "model.source": "random",
        "qformat.name": qformat,
        "qformat.modelopt_cfg": "SOME_CFG" if quantized else "None",
        # as conf/qformat/*.yaml set it: the support matrix row of the format
        "qformat.quant_algo": QUANT_ALGO.get(qformat, "None"),
        "calib_size": str(calib_size),
        "seed": str(seed),
        "eval.dataset": "pydoc_topics",
        "eval.path": "None",
        "eval.seq_len": "64",
        "eval.num_windows": str(num_windows),
    }
    metrics = {}
    if nll is not None:
        metrics = {
            "perplexity": ppl(nll),
            "kl_mean": 0.01,
            "top1_agreement": 0.9,
            "weight_gib": {"bf16": 1.0, "fp8": 0.5}.get(qformat, 0.28),
            **(extra_metrics or {}),
        }
        if ref_nll is not None:
            metrics |= {
                "reference_perplexity": ppl(ref_nll),
                "reference_nll_mean": sum(ref_nll) / sum(TOKENS),
            }
    client.log_batch(
        rid,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    if nll is not None:
        windows = {"nll": nll, "kl": [0.0] * len(nll), "agree": [0] * len(nll), "tokens": TOKENS[: len(nll)]}
        if ref_nll is not None:
            windows["ref_nll"] = ref_nll
        client.log_text(rid, json.dumps({"windows": windows}), "results.json")
    if overrides is not None:
        client.log_text(rid, "\n".join(overrides) + "\n", "overrides.yaml")
    client.set_terminated(rid, status)
    return rid


def report_json(uri: str, tmp_path: Path, **selection) -> dict:
    build_report(uri, Selection(**selection), tmp_path / "report")
    return json.loads((tmp_path / "report" / "report.json").read_text())


def by_name(data: dict) -> dict:
    return {r["name"]: r for r in data["rows"]}


def _pct(i: dict) -> str:
    """An interval as the report's cells print it."""
    return f"{i['point'] * 100:+.2f}% [{i['lo'] * 100:+.2f}, {i['hi'] * 100:+.2f}]"


# --- statistics ------------------------------------------------------------------------------------------


def test_constant_shift_gives_exact_ratio_and_zero_width_interval():
    # Every window loses log(1.02) nats per token: every resample sees exactly +2%.
    change = relative_change(
        {"nll": shifted(math.log(1.02)), "tokens": TOKENS}, {"nll": BASE_NLL, "tokens": TOKENS}
    )
    assert change.point == pytest.approx(0.02, abs=1e-12)
    assert change.lo == pytest.approx(0.02, abs=1e-12) and change.hi == pytest.approx(0.02, abs=1e-12)


def test_interval_brackets_point_and_is_reproducible():
    q = {"nll": shifted([0.0, 0.02, 0.0, 0.03, 0.0, 0.01, 0.0, 0.02]), "tokens": TOKENS}
    ref = {"nll": BASE_NLL, "tokens": TOKENS}
    a, b = relative_change(q, ref), relative_change(q, ref)
    assert a == b  # seeded
    assert a.lo < a.point < a.hi
    assert a.point == pytest.approx(ppl(q["nll"]) / ppl(BASE_NLL) - 1, rel=1e-12)
    assert a.lo >= 0  # no window got better, so no resample can


def test_windows_of_other_lengths_are_refused():
    with pytest.raises(WindowMismatch, match="7 windows"):
        relative_change({"nll": BASE_NLL[:7], "tokens": TOKENS[:7]}, {"nll": BASE_NLL, "tokens": TOKENS})


# --- verdict at its edges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0.002, 0.009, Verdict.PASS),
        (-0.01, 0.0099999, Verdict.PASS),
        (0.01, 0.01, Verdict.FAIL),  # exactly 1% is not less than 1%
        (0.01, 0.03, Verdict.FAIL),  # lower bound exactly at 1%
        (0.005, 0.01, Verdict.INCONCLUSIVE),  # upper bound exactly at 1%
        (0.004, 0.016, Verdict.INCONCLUSIVE),  # straddles 1%
        (math.expm1(math.log(1.01)), math.expm1(math.log(1.01)), Verdict.FAIL),  # 1% after exp/log rounding
    ],
)
def test_verdict_edges(lo, hi, expected):
    assert verdict(Interval((lo + hi) / 2, lo, hi)) is expected


# --- the report on known runs ------------------------------------------------------------------------------


def test_report_numbers_and_verdicts(store, tmp_path):
    log_run(store, "bf16", BASE_NLL, calib_size=16)
    log_run(store, "fp8", shifted(math.log(1.004)), calib_size=16)
    log_run(store, "fp8", shifted(math.log(1.003)), calib_size=64)
    # nvfp4 at calib 16: +0.5% everywhere -> pass vs bf16; vs the calib-16 fp8: 1.005/1.004 - 1 -> pass.
    log_run(store, "nvfp4", shifted(math.log(1.005)), calib_size=16)
    # nvfp4 at calib 64: exactly +1.0% everywhere -> fail (not < 1%) vs bf16.
    log_run(store, "nvfp4", shifted(math.log(1.01)), calib_size=64)
    # int4_awq: a loss that straddles 1% across windows -> inconclusive.
    log_run(store, "int4_awq", shifted([0.0, 0.03, 0.0, 0.025, 0.001, 0.02, 0.0, 0.004]), calib_size=64)
    data = report_json(store, tmp_path, experiment=EXPERIMENT)
    rows = by_name(data)

    assert rows["known-bf16-calib16"]["vs_bf16"]["note"] == "reference"
    nv16 = rows["known-nvfp4-calib16"]
    assert nv16["vs_bf16"]["change"]["point"] == pytest.approx(0.005, abs=1e-12)
    assert nv16["vs_bf16"]["verdict"] == "pass"
    assert nv16["vs_fp8"]["change"]["point"] == pytest.approx(1.005 / 1.004 - 1, abs=1e-12)
    fp8_16 = rows["known-fp8-calib16"]["run_id"]
    assert nv16["vs_fp8"]["reference"] == fp8_16  # same calibration size
    nv64 = rows["known-nvfp4-calib64"]
    assert nv64["vs_bf16"]["change"]["point"] == pytest.approx(0.01, abs=1e-12)
    assert nv64["vs_bf16"]["verdict"] == "fail"
    assert nv64["vs_fp8"]["change"]["point"] == pytest.approx(1.01 / 1.003 - 1, abs=1e-12)
    assert rows["known-fp8-calib64"]["vs_fp8"]["note"] == "reference"

    int4 = rows["known-int4_awq-calib64"]["vs_bf16"]
    assert int4["change"]["lo"] < 0.01 < int4["change"]["hi"]
    assert int4["verdict"] == "inconclusive"
    # int4_awq at calib 64 has no calib-64 twin... it does: fp8 calib 64.
    assert rows["known-int4_awq-calib64"]["vs_fp8"]["reference"] == rows["known-fp8-calib64"]["run_id"]

    verdicts = {(v["qformat"], v["calib_size"]): v for v in data["verdicts"]}
    assert set(verdicts) == {("fp8", 64), ("nvfp4", 64), ("int4_awq", 64)}  # the largest calibration size
    assert verdicts[("nvfp4", 64)]["calib_spread"] == pytest.approx(0.005, abs=1e-12)

    md = (tmp_path / "report" / "report.md").read_text()
    assert "| known | nvfp4 | 64 | +1.00% [+1.00, +1.00] | **fail** |" in md
    assert "inconclusive" in md
    # Resolution per verdict: int4_awq's windows scatter, so it has a smallest detectable loss (the distance to
    # its interval's end nearer zero) and a number of windows for ±0.5 pp (n * (h / 0.5 pp)^2, one seed).
    res = verdicts[("int4_awq", 64)]["vs_bf16"]["recipe"]
    assert res["detectable"] == pytest.approx(int4["change"]["point"] - int4["change"]["lo"], abs=1e-15)
    assert not res["cannot_tell"] and (res["seeds"], res["windows"], res["seed_half_width"]) == (1, 8, 0.0)
    half = (int4["change"]["hi"] - int4["change"]["lo"]) / 2
    assert res["windows_for_half_point"] == math.ceil(8 * (half / 0.005) ** 2) > 8
    vs_fp8 = verdicts[("int4_awq", 64)]["vs_fp8"]
    assert vs_fp8["change"]["lo"] < 0 < vs_fp8["change"]["point"] and vs_fp8["recipe"]["cannot_tell"]
    detectable = f"{vs_fp8['recipe']['detectable'] * 100:.2f}%"
    assert (
        f"| known | int4_awq | 64 | fp8 | {_pct(vs_fp8['change'])} | {detectable}: cannot tell "
        f"{vs_fp8['change']['point'] * 100:+.2f}% from 0 at this size |"
    ) in md
    # The evaluation's resolution near 1% comes from the comparison nearest 1% (nvfp4 calib 64, exactly +1%,
    # whose windows all agree: nothing smaller is needed), not from the narrowest or the widest interval.
    assert (
        data["resolution_near_1pct"]["run"] == "known-nvfp4-calib64" and data["resolution_near_1pct"]["near"]
    )
    assert "the comparison nearest 1% is known-nvfp4-calib64 at +1.00% vs bf16" in md
    assert "Noise floor" not in md
    assert (tmp_path / "report" / "loss.png").stat().st_size > 10_000
    assert "<strong>fail</strong>" in (tmp_path / "report" / "report.html").read_text()


def test_fp8_reference_falls_back_to_largest_calibration(store, tmp_path):
    log_run(store, "bf16", BASE_NLL)
    log_run(store, "fp8", shifted(math.log(1.004)), calib_size=32)
    log_run(store, "fp8", shifted(math.log(1.002)), calib_size=128)
    log_run(store, "nvfp4", shifted(math.log(1.006)), calib_size=16)
    rows = by_name(report_json(store, tmp_path, experiment=EXPERIMENT))
    assert rows["known-nvfp4-calib16"]["vs_fp8"]["reference"] == rows["known-fp8-calib128"]["run_id"]


def test_failed_runs_are_listed_not_dropped(store, tmp_path):
    sweep_dir = tmp_path / "outputs" / "sweep-a"
    (sweep_dir / "3_qformat=fp8").mkdir(parents=True)
    (sweep_dir / "3_qformat=fp8" / "failed.txt").write_text("calib_size=9999 is not allowed: ...\n")
    log_run(store, "bf16", BASE_NLL, sweep_dir=str(sweep_dir))
    log_run(
        store,
        "nvfp4",
        None,
        status="FAILED",
        error="NonFiniteMetric: non-finite metrics {'perplexity': nan}",
        sweep_dir=str(sweep_dir),
    )
    log_run(store, "int4_awq", None, status="KILLED", sweep_dir=str(sweep_dir))
    data = report_json(store, tmp_path, experiment=EXPERIMENT)
    assert {(r["name"], r["status"]) for r in data["unfinished"]} == {
        ("known-nvfp4-calib16", "FAILED"),
        ("known-int4_awq-calib16", "KILLED"),
    }
    md = (tmp_path / "report" / "report.md").read_text()
    assert "NonFiniteMetric: non-finite metrics" in md and "| known-int4_awq-calib16 | KILLED |" in md

    # A sweep chosen by its folder also lists the jobs that failed before an MLflow run existed.
    log_run(store, "bf16", BASE_NLL, sweep="sweep-b", config_hash="b")  # other sweeps stay out
    data = report_json(store, tmp_path, sweep_dir=str(sweep_dir))
    assert data["prerun_failures"] == [
        {"job": "3_qformat=fp8", "error": "calib_size=9999 is not allowed: ..."}
    ]
    assert len(data["unfinished"]) == 2 and [r["name"] for r in data["rows"]] == ["known-bf16-calib16"]


def test_latest_of_identical_configs_counts_once(store, tmp_path):
    log_run(store, "bf16", BASE_NLL)
    log_run(store, "nvfp4", shifted(math.log(1.02)), config_hash="same")
    log_run(store, "nvfp4", shifted(math.log(1.005)), config_hash="same")  # force=true rerun
    data = report_json(store, tmp_path, experiment=EXPERIMENT)
    nv = [r for r in data["rows"] if r["qformat"] == "nvfp4"]
    assert len(nv) == 1 and nv[0]["vs_bf16"]["change"]["point"] == pytest.approx(0.005, abs=1e-12)


def test_runs_on_other_windows_get_no_reference(store, tmp_path):
    log_run(store, "bf16", BASE_NLL)
    log_run(store, "nvfp4", shifted(0.01)[:4], num_windows=4)
    rows = by_name(report_json(store, tmp_path, experiment=EXPERIMENT))
    assert (
        rows["known-nvfp4-calib16"]["vs_bf16"]["note"]
        == "no bf16 run on the same windows and no in-run reference"
    )
    assert rows["known-nvfp4-calib16"]["vs_bf16"]["verdict"] is None


def test_optional_columns_appear_only_when_measured(store, tmp_path):
    log_run(
        store,
        "bf16",
        BASE_NLL,
        extra_metrics={
            "decode_tokens_per_s": 40.0,
            "ttft_s": 0.2,
            "task/mini/acc": 0.5,
            "task/mini/acc_stderr": 0.1,
        },
    )
    log_run(store, "nvfp4", shifted(0.001), extra_metrics={"task/mini/acc": 0.25})
    build_report(store, Selection(experiment=EXPERIMENT), tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| top-1 agree | mini/acc | weights GiB | TTFT s | tok/s |" in md
    assert "0.500 ±0.100" in md and "tok/s" in md and "roofline" not in md


def test_cli_logs_the_report_and_ignores_report_runs(store, tmp_path, capsys):
    log_run(store, "bf16", BASE_NLL)
    log_run(store, "nvfp4", shifted(math.log(1.005)))
    out = tmp_path / "cli"
    assert report_main(["--tracking-uri", store, "--out", str(out)]) == 0  # latest experiment by default
    printed = capsys.readouterr().out
    assert "known nvfp4 (calib 16): vs bf16 pass" in printed and "logged as MLflow run" in printed
    client = MlflowClient(tracking_uri=store)
    reports = client.search_runs(["1"], filter_string="tags.kind = 'report'")
    assert len(reports) == 1 and reports[0].info.run_name == f"report-{EXPERIMENT}"
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert logged == {"report/report.md", "report/report.html", "report/report.json", "report/loss.png"}
    # A second report does not count the first report as a run.
    assert report_main(["--tracking-uri", store, "--out", str(out), "--no-log"]) == 0
    assert len(json.loads((out / "report.json").read_text())["rows"]) == 2


def test_cli_errors_are_one_line(store, tmp_path, capsys):
    log_run(store, "bf16", BASE_NLL)
    assert (
        report_main(["--tracking-uri", store, "--experiment", "nope", "--no-log", "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.splitlines()[-1]  # earlier lines: MLflow's own logging
    assert err.startswith("gb10exp.report: error: --experiment='nope' is not allowed") and EXPERIMENT in err
    assert report_main(["--tracking-uri", store, "--sweep", "nope", "--no-log", "--out", str(tmp_path)]) == 2
    assert "no runs match 'nope'" in capsys.readouterr().err


def test_empty_store_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no runs"):
        build_report(f"sqlite:///{tmp_path}/empty.db", Selection(), tmp_path / "r")


# --- the card's sweep: in-run reference, pairing by digests, seeds -------------------------------------------

CARD = {
    ("nvfp4", 64): math.log(1.004),
    ("nvfp4", 128): math.log(1.003),
    ("int4", 64): [0.0, 0.03, 0.0, 0.025, 0.001, 0.02, 0.0, 0.004],
    ("int4", 128): math.log(1.02),
}


def log_card_sweep(uri: str) -> None:
    """``python -m gb10exp qformat=nvfp4,int4 calib_size=64,128`` as the runs record it: no bf16 job, each
    quantized run carrying its in-run reference (the unquantized model on the same windows)."""
    for (qformat, calib), shift in CARD.items():
        log_run(
            uri,
            qformat,
            shifted(shift),
            calib_size=calib,
            tags=DIGESTS,
            ref_nll=BASE_NLL,
            overrides=[f"qformat={qformat}", f"calib_size={calib}", "model=known", "eval.seq_len=64"],
        )


def in_run_rows_fp8_notes(data: dict) -> set[str]:
    return {r["vs_fp8"]["note"] for r in data["rows"]}


def test_card_sweep_gets_bf16_verdicts_from_the_in_run_reference(store, tmp_path):
    log_card_sweep(store)
    data = report_json(store, tmp_path, experiment=EXPERIMENT)
    assert len(data["rows"]) == 4
    in_run = {(r["qformat"], r["calib_size"]): r["vs_bf16"] for r in data["rows"]}
    for c in in_run.values():
        assert c["source"] == "in-run reference" and c["paired_by"] == "same run" and c["reference"] is None
        assert c["change"]["has_ci"] and c["verdict"] in ("pass", "fail", "inconclusive")
    assert in_run[("nvfp4", 128)]["change"]["point"] == pytest.approx(0.003, abs=1e-12)
    assert in_run[("nvfp4", 128)]["verdict"] == "pass"
    assert in_run[("int4", 128)]["verdict"] == "fail"
    assert in_run[("int4", 64)]["verdict"] == "inconclusive"
    # No fp8 run anywhere: said, with the exact command that adds the fp8 runs to the same sweep.
    assert (
        data["fp8_command"] == "python -m gb10exp qformat=fp8 calib_size=64,128 model=known eval.seq_len=64"
    )
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"`{data['fp8_command']}`" in md and "No fp8 run exists in this experiment" in md
    assert "| known | nvfp4 | 128 | +0.30% [+0.30, +0.30] | pass |" in md and "bf16: in-run reference" in md
    assert (
        "On these 8 windows (504 tokens) the comparison nearest 1% is" in md
        and "The unquantized (in-run reference) perplexity itself" in md
    )
    assert in_run_rows_fp8_notes(data) == {"no fp8 run"}

    # A separate bf16 run on the same windows (same digests) is preferred, and gives the same verdicts.
    bf16 = log_run(store, "bf16", BASE_NLL, tags=DIGESTS)
    again = report_json(store, tmp_path, experiment=EXPERIMENT)
    for r in again["rows"]:
        if r["qformat"] == "bf16":
            continue
        c = r["vs_bf16"]
        assert c["reference"] == bf16 and c["source"] == "bf16 run known-bf16-calib16"
        assert c["paired_by"] == "eval_digest, tokenizer_digest, compute_dtype"
        assert c["change"] == in_run[(r["qformat"], r["calib_size"])]["change"]
        assert c["verdict"] == in_run[(r["qformat"], r["calib_size"])]["verdict"]
    assert again["unpaired"] == []


def test_runs_with_other_eval_digest_are_not_paired_and_say_why(store, tmp_path):
    log_run(store, "bf16", BASE_NLL, tags=DIGESTS)
    log_run(store, "fp8", shifted(math.log(1.004)), tags={**DIGESTS, "compute_dtype": "bfloat16"})
    # Same params as the bf16 run (the old pairing would have matched them) but an edited eval text.
    log_run(
        store,
        "nvfp4",
        shifted(math.log(1.02)),
        calib_size=32,
        tags={**DIGESTS, "eval_digest": "0ther0ther0ther0"},
    )
    log_run(
        store,
        "int4",
        shifted(math.log(1.02)),
        calib_size=32,
        ref_nll=shifted(math.log(1.01)),
        tags={**DIGESTS, "eval_digest": "0ther0ther0ther0"},
    )
    data = report_json(store, tmp_path, experiment=EXPERIMENT)
    rows = by_name(data)
    nv = rows["known-nvfp4-calib32"]
    assert nv["vs_bf16"]["verdict"] is None and nv["vs_bf16"]["reference"] is None
    assert nv["vs_fp8"]["verdict"] is None
    # int4 has no pairable bf16 run either, but its in-run reference gives the verdict, labelled so.
    int4 = rows["known-int4-calib32"]["vs_bf16"]
    assert int4["source"] == "in-run reference" and int4["change"]["point"] == pytest.approx(1.02 / 1.01 - 1)
    fp8 = rows["known-fp8-calib16"]["vs_bf16"]
    assert fp8["verdict"] is None
    unpaired = {(u["name"], u["role"]): u["differences"] for u in data["unpaired"]}
    assert unpaired[("known-nvfp4-calib32", "bf16")] == ["eval_digest 0ther0ther0ther0 != e1e1e1e1e1e1e1e1"]
    assert unpaired[("known-nvfp4-calib32", "fp8")] == [
        "eval_digest 0ther0ther0ther0 != e1e1e1e1e1e1e1e1",
        "compute_dtype float32 != bfloat16",
    ]
    assert unpaired[("known-fp8-calib16", "bf16")] == ["compute_dtype bfloat16 != float32"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Runs that could not be paired" in md
    assert (
        "| known-nvfp4-calib32 | bf16 | known-bf16-calib16 | eval_digest 0ther0ther0ther0 != e1e1e1e1e1e1e1e1 |"
        in md
    )


def test_old_runs_without_digest_tags_pair_by_params_and_say_so(store, tmp_path):
    log_run(store, "bf16", BASE_NLL)
    log_run(store, "nvfp4", shifted(math.log(1.005)), tags=DIGESTS)  # a new run against an old bf16 run
    c = by_name(report_json(store, tmp_path, experiment=EXPERIMENT))["known-nvfp4-calib16"]["vs_bf16"]
    assert c["paired_by"] == "params (old run without digest tags)" and c["verdict"] == "pass"
    assert c["label"] == "bf16 run known-bf16-calib16, paired by params (old run without digest tags)"
    assert "paired by params (old run without digest tags)" in (tmp_path / "report" / "report.md").read_text()


def test_seeds_and_windows_judge_the_recipe(store, tmp_path):
    # The report used to judge a recipe by the wider of its window interval and its seeds' min..max; that
    # under-covers when both matter (tests/test_stats.py). Now every seed's verdict is the recipe's: its
    # expected loss over seeds, with an interval over seeds and windows (stats.recipe_change).
    log_run(store, "bf16", BASE_NLL, tags=DIGESTS)
    # Three calibrations of one recipe: each alone is exactly known (zero-width window interval), and seed 0
    # alone would pass. The recipe's interval is then the t interval of the seeds' mean (2 degrees of
    # freedom), wider than their min..max, and straddles 1%.
    shifts = [math.log(1.002), math.log(1.006), math.log(1.012)]
    for seed, shift in enumerate(shifts):
        log_run(store, "nvfp4", shifted(shift), calib_size=64, seed=seed, tags=DIGESTS)
    # Another recipe whose windows scatter and whose two seeds barely differ: the windows decide, the seed
    # term adds little.
    noisy = [0.0, 0.03, 0.0, 0.025, 0.001, 0.02, 0.0, 0.004]
    for seed in (0, 1):
        log_run(
            store, "int4", shifted([x + 0.0001 * seed for x in noisy]), calib_size=64, seed=seed, tags=DIGESTS
        )
    data = report_json(store, tmp_path, experiment=EXPERIMENT)
    rows = by_name(data)
    mean, se = statistics.fmean(shifts), statistics.stdev(shifts) / math.sqrt(3)
    t975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # Student's t, 2 degrees of freedom, 97.5%: closed form
    for name in ("known-nvfp4-calib64", "known-nvfp4-calib64-seed1", "known-nvfp4-calib64-seed2"):
        c = rows[name]["vs_bf16"]
        assert c["seed_spread"]["lo"] == pytest.approx(0.002) and c["seed_spread"]["hi"] == pytest.approx(
            0.012
        )
        assert c["seed_spread"]["point"] == pytest.approx((0.002 + 0.006 + 0.012) / 3)
        assert c["change"]["hi"] - c["change"]["lo"] == pytest.approx(0.0, abs=1e-12)
        assert c["judged_by"] == "seeds and windows" and c["judged"] == c["recipe"]["interval"]
        assert c["judged"]["point"] == pytest.approx(math.expm1(mean), rel=1e-12)
        assert c["judged"]["lo"] == pytest.approx(math.expm1(mean - t975 * se), abs=3e-3 * t975 * se)
        assert c["judged"]["hi"] == pytest.approx(math.expm1(mean + t975 * se), abs=3e-3 * t975 * se)
        assert c["judged"]["lo"] < c["seed_spread"]["lo"] and c["judged"]["hi"] > c["seed_spread"]["hi"]
        assert c["verdict"] == "inconclusive" and c["recipe"]["seeds"] == 3
        # The seed term alone is ±1.25 pp: no number of windows resolves ±0.5 pp, more seeds would.
        assert c["recipe"]["windows_for_half_point"] is None and c["recipe"]["cannot_tell"]
    int4 = rows["known-int4-calib64"]["vs_bf16"]
    assert int4["judged_by"] == "seeds and windows" and int4["recipe"]["seeds"] == 2
    windows_only = int4["recipe"]["windows_only"]
    assert int4["judged"]["lo"] <= windows_only["lo"] and int4["judged"]["hi"] >= windows_only["hi"]
    # Two seeds 0.01 pp apart: the seed term (t with 1 degree of freedom) widens the interval by 6%.
    assert int4["judged"]["hi"] - int4["judged"]["lo"] < 1.1 * (windows_only["hi"] - windows_only["lo"])
    verdicts = {v["qformat"]: v for v in data["verdicts"]}
    assert verdicts["nvfp4"]["seeds"] == ["0", "1", "2"]
    assert verdicts["nvfp4"]["run_id"] == rows["known-nvfp4-calib64-seed1"]["run_id"]  # the median seed
    assert verdicts["nvfp4"]["vs_bf16"]["verdict"] == "inconclusive"
    md = (tmp_path / "report" / "report.md").read_text()
    judged = verdicts["nvfp4"]["vs_bf16"]["judged"]
    assert f"| {_pct(judged)} (mean of 3 seeds) | inconclusive (seeds and windows) |" in md
    assert "+0.67% [+0.20, +1.20], seeds 0, 1, 2" in md
    assert "none: the seed term alone is ±1.25 pp with 3 seeds; more seeds" in md


def test_sweep_table_has_ppl_vs_ref(store):
    from gb10exp.report.summary import format_table, sweep_rows  # moved from tracking/ (issue 21)

    log_card_sweep(store)
    table = format_table(sweep_rows(store, "/nonexistent/sweep-a")).splitlines()
    assert table[0].split()[:4] == ["run", "status", "ppl", "ppl"] and "ppl vs ref" in table[0]
    line = next(t for t in table if t.startswith("known-nvfp4-calib128 "))
    assert "+0.30% in-run" in line
    log_run(store, "bf16", shifted(math.log(1.001)), tags=DIGESTS)  # a bf16 job in the same sweep
    table = format_table(sweep_rows(store, "/nonexistent/sweep-a")).splitlines()
    line = next(t for t in table if t.startswith("known-nvfp4-calib128 "))
    assert f"{(1.003 / 1.001 - 1) * 100:+.2f}% bf16" in line
    assert next(t for t in table if t.startswith("known-bf16-calib16 ")).split()[3] == "ref"


def test_quantized_and_calibrated_follow_qformat_kind_and_uses_calibration():
    from gb10exp.report.collect import RunRow

    def row(**params: str) -> RunRow:
        return RunRow("id", "name", "FINISHED", "e", {"calib_size": "8", **params}, {}, {}, 0)

    auto = row(**{"qformat.kind": "auto", "qformat.modelopt_cfg": "None"})  # mtq.auto_quantize: no single cfg
    assert auto.quantized and auto.calib_size == 8
    assert not row(**{"qformat.kind": "none", "qformat.modelopt_cfg": "None"}).quantized
    rtn = row(
        **{"qformat.modelopt_cfg": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "qformat.uses_calibration": "False"}
    )
    assert rtn.quantized and rtn.calib_size is None  # no calibration sample touched it
    old = row(**{"qformat.modelopt_cfg": "NVFP4_DEFAULT_CFG"})  # a run recorded before kind existed
    assert old.quantized and old.calib_size == 8
    assert row(**{"qformat.gguf_type": "Q4_K_M"}).quantized and not row().quantized
