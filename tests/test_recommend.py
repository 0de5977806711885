"""The recommendation (``python -m gb10exp.report --recommend``) on a constructed set of runs whose losses,
sizes and speeds are known: the choice under each budget, "none meets the constraints" with the binding
constraint, measured against projected speed, the Pareto fronts and their plot.

Runs go into a real SQLite MLflow store (tests/test_report.py ``log_run``); native engine support comes
from ``gb10exp.backends.support.native_engines`` (fp8 and nvfp4 native on GB10, w4a8_awq not).
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient
from test_report import BASE_NLL, DIGESTS, EXPERIMENT, log_run, shifted

from gb10exp.config import ConfigError
from gb10exp.report import Selection, build_report
from gb10exp.report.__main__ import main as report_main
from gb10exp.report.recommend import Constraints, pareto, recommend

GB10_BOUND = 273e9 / 2**30  # tokens/s of one GiB read per decode step at GB10's 273 GB/s


def sizes(gib: float) -> dict[str, float]:
    """A run's deployed weights and the bytes a decode step reads (the same here: tied embeddings)."""
    return {"weight_gib": gib, "decode_gib": gib}
# fp8's loss straddles 0 across windows (mean +0.1%): not distinguishable from bf16 on this evaluation.
FP8_NOISY = [-0.006, 0.008, -0.004, 0.006, -0.002, 0.004, -0.001, 0.003]


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def log_set(uri: str, nvfp4_measured: float | None = None) -> None:
    log_run(uri, "bf16", BASE_NLL, tags=DIGESTS, extra_metrics=sizes(1.0))
    log_run(uri, "fp8", shifted(FP8_NOISY), tags=DIGESTS, extra_metrics=sizes(0.5))
    measured = {} if nvfp4_measured is None else {"decode_tokens_per_s": nvfp4_measured}
    tags = DIGESTS if nvfp4_measured is None else {**DIGESTS, "gpu": "NVIDIA GB10", "speed_valid": "true"}
    task = {"task/mini/acc": 0.75}
    log_run(
        uri,
        "nvfp4",
        shifted(math.log(1.03)),
        tags=tags,
        extra_metrics={**sizes(0.28), **measured, **task},
    )
    # Larger and worse than nvfp4: dominated on both fronts.
    log_run(uri, "nvfp4_awq", shifted(math.log(1.05)), tags=DIGESTS, extra_metrics=sizes(0.30))
    # The smallest, but no engine serves W4A8 AWQ natively on GB10 (TensorRT-LLM has no sm_120/121 kernels).
    log_run(uri, "w4a8_awq", shifted(math.log(1.06)), tags=DIGESTS, extra_metrics=sizes(0.26))


def test_pareto_front():
    assert pareto([(1, 0), (0.5, 0.1), (0.3, 0.5), (0.6, 0.2), (0.5, 0.1)]) == [True, True, True, False, True]


def test_recommendation_on_a_constructed_set(store, tmp_path):
    log_set(store)
    report = build_report(
        store, Selection(experiment=EXPERIMENT), tmp_path / "r", Constraints(max_weight_gib=0.6)
    )
    rec = report.recommendation
    # bf16 weighs 1 GiB: the best that fits 0.6 GiB is fp8, served natively on GB10.
    assert rec.choice.name == "known-fp8-calib16"
    assert any("served natively on gb10 (gb10) by trtllm, vllm" in r for r in rec.reasons)
    assert any(f"decode {GB10_BOUND / 0.5:.1f} tokens/s" in r and "projected" in r for r in rec.reasons)
    runs = {r["name"]: r for r in json.loads((tmp_path / "r" / "recommend.json").read_text())["runs"]}
    assert runs["known-nvfp4-calib16"]["decode_tokens_per_s"] == pytest.approx(GB10_BOUND / 0.28)
    assert runs["known-nvfp4-calib16"]["speed_kind"] == "projected"
    assert runs["known-nvfp4-calib16"]["loss"]["point"] == pytest.approx(0.03)
    assert runs["known-bf16-calib16"]["fails"] == ["--max-weight-gib"]
    assert runs["known-w4a8_awq-calib16"]["native_engines"] == [] and runs["known-w4a8_awq-calib16"]["fails"] == [
        "native engine"
    ]
    on_bytes = {n for n, r in runs.items() if r["pareto_bytes"]}
    on_speed = {n for n, r in runs.items() if r["pareto_speed"]}
    everyone = set(runs)
    assert on_bytes == on_speed == everyone - {"known-nvfp4_awq-calib16"}
    md = (tmp_path / "r" / "recommend.md").read_text()
    assert "**Run known-fp8-calib16** (fp8, calib 16)" in md and "![Pareto front" in md
    assert (
        "| known-nvfp4-calib16 | +3.00% [+3.00, +3.00] (95% interval over evaluation windows) | 0.0100 | mini/acc 0.750 |"
        in md
    )
    assert (tmp_path / "r" / "pareto.png").stat().st_size > 10_000

    rows = report.rows
    # No budget: bf16 itself (no loss); fp8's interval straddles 0, so the uncertainty names it.
    free = recommend(rows, Constraints())
    assert free.choice.name == "known-bf16-calib16"
    assert "Not distinguishable on this evaluation from: known-fp8-calib16" in free.uncertainty
    # 0.3 GiB: w4a8_awq (0.26) is smaller but not native, nvfp4_awq fits but is larger and worse: nvfp4.
    small = recommend(rows, Constraints(max_weight_gib=0.3))
    assert small.choice.name == "known-nvfp4-calib16" and "mini/acc 0.750" in small.reasons
    # Too fast for any run that fits: nothing, and the speed constraint binds (nvfp4 projects 975 tok/s).
    none = recommend(rows, Constraints(max_weight_gib=0.3, min_decode_tokens_per_s=1000))
    assert none.choice is None and len(none.binding) == 1
    assert none.binding[0].startswith("--min-decode-tokens-per-s binds")
    assert f"{GB10_BOUND / 0.28:.1f} tokens/s (known-nvfp4-calib16, projected)" in none.binding[0]
    # Too small for any run: the weight budget binds; the smallest that meets the rest is nvfp4.
    tiny = recommend(rows, Constraints(max_weight_gib=0.2))
    assert tiny.choice is None and tiny.binding[0].startswith("--max-weight-gib binds")
    assert "the smallest, known-nvfp4-calib16, 0.280 GiB" in tiny.binding[0]
    # On an H100 (Hopper) nvfp4 has no native engine; w4a8_awq has one (TensorRT-LLM).
    hopper = recommend(rows, Constraints(max_weight_gib=0.3, device="H100"))
    assert hopper.choice.name == "known-w4a8_awq-calib16" and hopper.arch == "hopper"


def test_measured_speed_beats_the_projection(store, tmp_path):
    log_set(store, nvfp4_measured=600.0)  # measured on a GB10: far below its bandwidth bound of 975 tok/s
    report = build_report(
        store,
        Selection(experiment=EXPERIMENT),
        tmp_path / "r",
        Constraints(max_weight_gib=0.29, min_decode_tokens_per_s=700),  # nvfp4 (0.28) fits, nvfp4_awq (0.30) not
    )
    rec = report.recommendation
    nv = next(x for x in rec.candidates if x.name == "known-nvfp4-calib16")
    assert nv.speed == 600.0 and nv.speed_kind == "measured" and nv.speed_note == "measured on NVIDIA GB10"
    assert rec.choice is None
    # Both bind: nvfp4 fits but is too slow as measured; nvfp4_awq would be fast enough (projected) but is too large.
    assert any("600.0 tokens/s (known-nvfp4-calib16, measured)" in b for b in rec.binding), rec.binding
    assert any(b.startswith("--max-weight-gib binds") and "known-nvfp4_awq-calib16" in b for b in rec.binding)
    # The same run seen from an H200: not measured there, so projected from its bytes.
    h200 = recommend(report.rows, Constraints(device="H200"))
    nv = next(x for x in h200.candidates if x.name == "known-nvfp4-calib16")
    assert nv.speed_kind == "projected" and nv.speed == pytest.approx(4800e9 / (0.28 * 2**30))


def test_recommendation_uses_the_seed_spread(store, tmp_path):
    log_run(store, "bf16", BASE_NLL, tags=DIGESTS)
    for seed, loss in ((0, 1.002), (1, 1.006), (2, 1.012)):
        log_run(store, "fp8", shifted(math.log(loss)), seed=seed, tags=DIGESTS)
    report = build_report(
        store, Selection(experiment=EXPERIMENT), tmp_path / "r", Constraints(max_weight_gib=0.6)
    )
    rec = report.recommendation
    assert rec.choice.name == "known-fp8-calib16"  # the three seeds share the recipe's loss: the first
    assert rec.choice.loss_basis == "seeds and windows"
    # The recipe's interval (t with 2 degrees of freedom over 3 seeds) is wider than the seeds' min..max.
    assert rec.choice.loss.lo < 0.002 and rec.choice.loss.hi > 0.012
    assert "95% interval over calibration seeds and evaluation windows" in rec.uncertainty


def test_cli_recommend_and_its_errors(store, tmp_path, capsys):
    log_set(store)
    out = tmp_path / "cli"
    assert (
        report_main(
            [
                "--tracking-uri",
                store,
                "--out",
                str(out),
                "--recommend",
                "--max-weight-gib",
                "0.3",
                "--min-decode-tokens-per-s",
                "1000",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "recommendation: no run meets the constraints. --min-decode-tokens-per-s binds" in printed
    client = MlflowClient(tracking_uri=store)
    report_run = client.search_runs(["1"], filter_string="tags.kind = 'report'")[0]
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert {"report/recommend.md", "report/recommend.json", "report/pareto.png"} <= logged

    for args, message in (
        (["--recommend", "--max-weight-gib", "-1"], "--max-weight-gib=-1.0 is not allowed"),
        (["--recommend", "--device", "tpu"], "--device='tpu' is not allowed"),
        (["--max-weight-gib", "1"], "not allowed without --recommend"),
    ):
        assert report_main(["--tracking-uri", store, "--no-log", "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="positive number"):
        Constraints(min_decode_tokens_per_s=0).check()


def test_plots_more_formats_than_a_palette_has_colours(store, tmp_path):
    # The recipes preset has 14 formats; the plots once ran out of tab10's 10 colours (KeyError).
    log_run(store, "bf16", BASE_NLL, tags=DIGESTS, extra_metrics=sizes(1.0))
    names = [
        "fp8",
        "nvfp4",
        "nvfp4_wo",
        "nvfp4_awq",
        "int4",
        "int4_awq",
        "w4a8_awq",
        "nvfp4_mlp_only",
        "nvfp4_omlp_only",
        "nvfp4_mse",
        "nvfp4_svdquant",
    ]
    for i, name in enumerate(names):
        log_run(
            store,
            name,
            shifted(math.log(1.01 + i / 100)),
            tags=DIGESTS,
            extra_metrics=sizes(0.2 + i / 100),
        )
    report = build_report(store, Selection(experiment=EXPERIMENT), tmp_path / "r", Constraints())
    assert report.recommendation.choice is not None
    assert (tmp_path / "r" / "pareto.png").stat().st_size > 10_000 and (tmp_path / "r" / "loss.png").is_file()
