"""Compare and conclude: turn the runs of a sweep or experiment into a report with a verdict.

``build_report`` reads the runs from MLflow (``collect``), pairs each with its bf16 and fp8 references
and bootstraps the relative perplexity change over evaluation windows (``compare``, ``stats``), judges
it against the 1% threshold (``verdict``) and writes ``report.md``, ``report.html``, ``report.json`` and
``loss.png`` (``render``). ``log_report`` stores those files as artifacts of a run tagged
``kind=report`` in the same experiment. Command line: ``python -m gb10exp.report --help``.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gb10exp.report import render
from gb10exp.report.collect import REPORT_TAG, Collected, Selection, collect
from gb10exp.report.compare import FormatSummary, ReportRow, compare, noise_floor, summarize
from gb10exp.report.stats import Interval
from gb10exp.tracking.secrets import redact

PLOT_NAME = "loss.png"


@dataclass
class Report:
    folder: Path
    files: list[Path]
    collected: Collected
    rows: list[ReportRow]
    summaries: list[FormatSummary]


def _interval(i: Interval | None) -> dict[str, Any] | None:
    return None if i is None else {"point": i.point, "lo": i.lo, "hi": i.hi, "has_ci": i.has_ci}


def _comparison(c) -> dict[str, Any]:
    return {"reference": c.reference.run_id if c.reference else None, "change": _interval(c.change),
            "verdict": c.verdict.value if c.verdict else None, "note": c.note}


def as_json(report_rows: list[ReportRow], summaries: list[FormatSummary], collected: Collected) -> dict[str, Any]:
    """The report's numbers, machine-readable (tests and notebooks read this rather than the Markdown)."""
    return {
        "rows": [{"run_id": r.run.run_id, "name": r.run.name, "model": r.run.model, "qformat": r.run.qformat,
                  "calib_size": r.run.calib_size, "metrics": r.run.metrics,
                  "vs_bf16": _comparison(r.vs_bf16), "vs_fp8": _comparison(r.vs_fp8)} for r in report_rows],
        "verdicts": [{"model": s.model, "qformat": s.qformat, "calib_size": s.row.run.calib_size,
                      "vs_bf16": _comparison(s.row.vs_bf16), "vs_fp8": _comparison(s.row.vs_fp8),
                      "calib_spread": s.calib_spread} for s in summaries],
        "unfinished": [{"run_id": r.run_id, "name": r.name, "status": r.status, "error": r.error}
                       for r in collected.unfinished],
        "prerun_failures": [{"job": j, "error": e} for j, e in collected.prerun_failures],
    }


def _meta(tracking_uri: str, collected: Collected) -> str:
    commits = sorted({r.tags.get("git_commit", "?")[:10] for r in collected.rows})
    devices = sorted({g if (g := r.tags.get("gpu")) not in (None, "", "none") else r.tags.get("cpu", "?")
                      for r in collected.rows})
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Tracking store `{redact(tracking_uri)}`, experiment(s) {', '.join(collected.experiments) or '–'}: "
            f"{len(collected.rows)} finished run(s), {len(collected.unfinished) + len(collected.prerun_failures)} "
            f"that did not finish. Runs from git {', '.join(commits) or '–'} on {'; '.join(devices) or '–'}. "
            f"Generated {when}.")


def build_report(tracking_uri: str, selection: Selection, out_dir: Path) -> Report:
    """Collect, compare, judge and write the report files into ``out_dir``."""
    from mlflow.tracking import MlflowClient

    collected = collect(MlflowClient(tracking_uri=tracking_uri), selection)
    rows = compare(collected)
    summaries = summarize(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Does NVFP4 lose less than 1%? — {selection.label()}"
    png = render.plot(rows, title, out_dir / PLOT_NAME)
    blocks = render.document(title, _meta(tracking_uri, collected), collected, rows, summaries, noise_floor(rows),
                             png.name if png else None)
    files = [out_dir / "report.md", out_dir / "report.html", out_dir / "report.json"]
    files[0].write_text(render.to_markdown(blocks))
    files[1].write_text(render.to_html(blocks, out_dir))
    files[2].write_text(json.dumps(as_json(rows, summaries, collected), indent=2, default=str))
    return Report(out_dir, files + ([png] if png else []), collected, rows, summaries)


def log_report(tracking_uri: str, report: Report, label: str) -> str | None:
    """Store the report files as artifacts of a new run ``report-<label>`` (tag kind=report) in the
    experiment of the reported runs; return its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = report.collected.rows or report.collected.unfinished
    if not runs:
        return None
    experiment = client.get_experiment_by_name(runs[0].experiment)
    run = client.create_run(experiment.experiment_id, run_name=f"report-{label}",
                            tags={REPORT_TAG: "report", "report.of": label})
    for path in report.files:
        client.log_artifact(run.info.run_id, str(path), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


__all__ = ["Report", "Selection", "build_report", "log_report"]
