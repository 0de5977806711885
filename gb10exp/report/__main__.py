"""``python -m gb10exp.report``: the report of an MLflow experiment or sweep, with a verdict per format.

    python -m gb10exp.report                                   # the experiment of the latest run
    python -m gb10exp.report --experiment gb10exp-smollm2_135m
    python -m gb10exp.report --sweep 2026-11-25_18-08-25       # one sweep (its id is its output folder)
    python -m gb10exp.report --tracking-uri http://mlflow:5000 --experiment gb10exp-llama3_1_8b_instruct
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gb10exp.config import ConfigError
from gb10exp.report import Selection, build_report, log_report
from gb10exp.tracking import secrets

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"  # the default of conf/tracking/local.yaml


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gb10exp.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="MLflow experiment name (default: the experiment of the latest run)")
    which.add_argument("--sweep", help="sweep id: the name of the sweep's output folder (tag sweep_id)")
    which.add_argument("--sweep-dir", help="the sweep's output folder; also lists jobs that failed before MLflow")
    parser.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow store or server (default {DEFAULT_URI})")
    parser.add_argument("--out", type=Path, help="output folder (default reports/<experiment or sweep>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    return parser.parse_args(argv)


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

        from gb10exp.report.collect import latest_experiment

        try:
            selection.experiment = latest_experiment(MlflowClient(tracking_uri=args.tracking_uri))
        except ConfigError as exc:
            print(f"gb10exp.report: error: {exc}", file=sys.stderr)
            return 2
    label = selection.label()
    try:
        report = build_report(args.tracking_uri, selection, args.out or Path("reports") / label)
    except ConfigError as exc:
        print(f"gb10exp.report: error: {exc}", file=sys.stderr)
        return 2
    for s in report.summaries:
        bf16, fp8 = s.row.vs_bf16, s.row.vs_fp8
        print(f"{s.model} {s.qformat} (calib {s.row.run.calib_size}): "
              f"vs bf16 {bf16.verdict.value if bf16.verdict else bf16.note or '–'}, "
              f"vs fp8 {fp8.verdict.value if fp8.verdict else fp8.note or '–'}")
    failed = len(report.collected.unfinished) + len(report.collected.prerun_failures)
    if failed:
        print(f"{failed} run(s) of the selection did not finish: listed in the report")
    print(f"report: {report.folder / 'report.md'}")
    if not args.no_log and (run_id := log_report(args.tracking_uri, report, label)):
        print(f"logged as MLflow run {run_id} (artifacts under report/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
