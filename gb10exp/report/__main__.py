"""``python -m gb10exp.report``: the report of an MLflow experiment or sweep, with a verdict per format.

python -m gb10exp.report                                   # the experiment of the latest run
python -m gb10exp.report --experiment gb10exp-smollm2_135m
python -m gb10exp.report --sweep 2026-11-25_18-08-25       # one sweep (its id is its output folder)
python -m gb10exp.report --tracking-uri http://mlflow:5000 --experiment gb10exp-llama3_1_8b_instruct
python -m gb10exp.report --recommend --max-weight-gib 6 --min-decode-tokens-per-s 20   # on GB10 (default)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gb10exp.config import ConfigError
from gb10exp.report import Selection, build_report, log_report
from gb10exp.report.collect import latest_experiment
from gb10exp.report.compare import SEEDS_AND_WINDOWS
from gb10exp.report.recommend import Constraints
from gb10exp.report.render import detectable_cell, windows_needed_cell
from gb10exp.report.stats import RESOLVE
from gb10exp.tracking import secrets

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"  # the default of conf/tracking/local.yaml


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "python -m gb10exp.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--experiment", help="MLflow experiment name (default: the experiment of the latest run)"
    )
    which.add_argument("--sweep", help="sweep id: the name of the sweep's output folder (tag sweep_id)")
    which.add_argument(
        "--sweep-dir", help="the sweep's output folder; also lists jobs that failed before MLflow"
    )
    parser.add_argument(
        "--tracking-uri", default=DEFAULT_URI, help=f"MLflow store or server (default {DEFAULT_URI})"
    )
    parser.add_argument("--out", type=Path, help="output folder (default reports/<experiment or sweep>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    rec = parser.add_argument_group("recommendation (--recommend)")
    rec.add_argument(
        "--recommend",
        action="store_true",
        help="name the run to deploy under the constraints below, with the Pareto front (pareto.png)",
    )
    rec.add_argument("--max-weight-gib", type=float, help="largest deployed weight size, GiB (weight_gib)")
    rec.add_argument(
        "--min-decode-tokens-per-s", type=float, help="slowest acceptable decode, tokens/s at batch 1"
    )
    rec.add_argument(
        "--device",
        help="the device to deploy on (default gb10): speed measured there if "
        "a run was, else projected from its bandwidth",
    )
    return parser.parse_args(argv)


def _error(message: object) -> int:
    print(f"gb10exp.report: error: {message}", file=sys.stderr)
    return 2


def _said(c) -> str:
    if c.verdict is None:
        return c.note or "–"
    how = c.label + ("; judged over seeds and windows" if c.judged_by == SEEDS_AND_WINDOWS else "")
    return f"{c.verdict.value} ({how})"


def _calib(size: int | None) -> str:
    """How a run's calibration reads in a line: a calibration-free format has none, not "calib None"."""
    return f"calib {size}" if size else "no calibration"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    args.tracking_uri = secrets.tracking_uri(args.tracking_uri)  # http user:password -> MLflow's basic auth
    secrets.install()  # stdout, stderr and logs redacted
    # results.json downloads are tiny: MLflow's per-file progress bars would drown the summary.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    selection = Selection(args.experiment, args.sweep, args.sweep_dir)
    if selection.experiment is None and not (args.sweep or args.sweep_dir):
        from mlflow.tracking import MlflowClient

        try:
            selection.experiment = latest_experiment(MlflowClient(tracking_uri=args.tracking_uri))
        except ConfigError as exc:
            return _error(exc)
    label, constraints = selection.label(), None
    if args.recommend:
        constraints = Constraints(args.max_weight_gib, args.min_decode_tokens_per_s, args.device or "gb10")
    elif any(v is not None for v in (args.max_weight_gib, args.min_decode_tokens_per_s, args.device)):
        return _error(
            "--max-weight-gib/--min-decode-tokens-per-s/--device are not allowed without --recommend: "
            "add --recommend"
        )
    try:
        report = build_report(args.tracking_uri, selection, args.out or Path("reports") / label, constraints)
    except ConfigError as exc:
        return _error(exc)
    for s in report.summaries:
        bf16 = s.row.vs_bf16
        print(
            f"{s.model} {s.qformat} ({_calib(s.row.run.calib_size)}): "
            f"vs bf16 {_said(bf16)}, vs fp8 {_said(s.row.vs_fp8)}"
        )
        if bf16.recipe is not None:
            print(
                f"  smallest detectable loss vs bf16: {detectable_cell(bf16)} ({bf16.recipe.windows} windows, "
                f"{bf16.recipe.seeds} seed{'s' if bf16.recipe.seeds > 1 else ''}); "
                f"windows for ±{RESOLVE * 100:.1f} pp: {windows_needed_cell(bf16)}"
            )
    if report.fp8_command:
        print(
            f"no fp8 run exists, so there is no verdict against fp8; add the fp8 runs with:\n  {report.fp8_command}"
        )
    if failed := len(report.collected.unfinished) + len(report.collected.prerun_failures):
        print(f"{failed} run(s) of the selection did not finish: listed in the report")
    folder = report.folder
    print(f"report: {folder / 'report.md'}")
    if (rec := report.recommendation) is not None:
        if rec.choice is not None:
            print(f"recommendation on {rec.device_name}: {rec.choice.name} — " + "; ".join(rec.reasons))
            print(f"uncertainty: {rec.uncertainty}")
        else:
            print("recommendation: no run meets the constraints. " + " ".join(rec.binding))
        print(f"recommendation: {folder / 'recommend.md'} (Pareto front: {folder / 'pareto.png'})")
    if not args.no_log and (run_id := log_report(args.tracking_uri, report, label)):
        print(f"logged as MLflow run {run_id} (artifacts under report/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
