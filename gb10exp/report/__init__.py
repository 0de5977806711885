"""Compare and conclude: turn the runs of a sweep or experiment into a report with a verdict.

``build_report``: runs from MLflow (``collect``), paired with their bf16 and fp8 references, the relative
perplexity change bootstrapped over windows (``compare``, ``stats``), judged against 1% (``verdict``),
written as report.md/.html/.json and loss.png (``render``). ``log_report`` stores those files in a run
tagged ``kind=report`` in the same experiment. Command line: ``python -m gb10exp.report --help``.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gb10exp.report import recommend, render
from gb10exp.report.collect import REPORT_TAG, Collected, Selection, collect
from gb10exp.report.compare import (
    EngineRow,
    FormatSummary,
    ReportRow,
    Resolution,
    compare,
    engine_rows,
    missing_fp8,
    resolution,
    summarize,
)
from gb10exp.report.render import attrs, interval_json
from gb10exp.report.stats import RecipeChange
from gb10exp.tracking.secrets import redact

PLOT_NAME = "loss.png"


@dataclass
class Report:
    folder: Path
    files: list[Path]
    collected: Collected
    rows: list[ReportRow]
    summaries: list[FormatSummary]
    fp8_command: str | None = None  # the command that adds the missing fp8 runs, when none exists
    recommendation: Any = None  # recommend.Recommendation with --recommend


def _recipe(r: RecipeChange | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "interval": interval_json(r.interval),
        "windows_only": interval_json(r.windows_only),  # the seeds held fixed: the windows' share
        **attrs(r, "seed_half_width", "seeds", "windows"),
        "detectable": r.detectable,  # the smallest loss told apart from zero at 95%, at this loss
        "cannot_tell": r.cannot_tell,  # the loss is below it: its interval contains zero
        "windows_for_half_point": r.windows_needed(),  # windows for ±0.5 pp (None: more seeds needed)
    }


def _comparison(c) -> dict[str, Any]:
    return {
        "reference": c.reference.run_id if c.reference else None,
        **attrs(c, "source", "paired_by", "label"),
        "change": interval_json(c.change),
        "seed_spread": interval_json(c.seed_spread),
        "recipe": _recipe(c.recipe),
        "judged": interval_json(c.judged),
        "judged_by": c.judged_by,
        "verdict": c.verdict.value if c.verdict else None,
        "note": c.note,
    }


def as_json(
    report_rows: list[ReportRow],
    summaries: list[FormatSummary],
    collected: Collected,
    fp8_command: str | None = None,
    res: Resolution | None = None,
    engine: list[EngineRow] | None = None,
) -> dict[str, Any]:
    """The report's numbers, machine-readable (tests and notebooks read this rather than the Markdown)."""
    near_1 = None
    if res is not None and res.nearest is not None:
        near_1 = {
            "run": res.nearest_run,
            "near": res.near,  # its loss is within compare.NEAR of 1%: its resolution is the one near 1%
            "recipe": _recipe(res.nearest.recipe),
        }
    return {
        "engine": [
            {
                **attrs(e.run, "run_id", "model", "backend", "qformat", "calib_size"),
                "engine_perplexity": e.engine_ppl,
                "vs_unquantized": e.vs_unquantized and asdict(e.vs_unquantized),
                "simulated_perplexity": e.simulated_ppl,
                "deployed_vs_simulated": e.vs_simulated and asdict(e.vs_simulated),
                "disagrees": e.disagrees,
            }
            for e in engine or []
        ],
        "rows": [
            {
                **attrs(r.run, "run_id", "name", "model", "qformat", "calib_size", "seed", "metrics"),
                "vs_bf16": _comparison(r.vs_bf16),
                "vs_fp8": _comparison(r.vs_fp8),
            }
            for r in report_rows
        ],
        "verdicts": [
            {
                **attrs(s, "model", "qformat"),
                **attrs(s.row.run, "calib_size", "run_id"),
                "seeds": s.seeds,
                "vs_bf16": _comparison(s.row.vs_bf16),
                "vs_fp8": _comparison(s.row.vs_fp8),
                "calib_spread": s.calib_spread,
            }
            for s in summaries
        ],
        "unpaired": [
            {
                **attrs(u.run, "run_id", "name"),
                "role": u.role,
                "candidate": u.candidate.run_id,
                "candidate_name": u.candidate.name,
                "differences": u.differences,
            }
            for r in report_rows
            for u in r.unpaired
        ],
        "fp8_command": fp8_command,
        "resolution_near_1pct": near_1,
        "unfinished": [attrs(r, "run_id", "name", "status", "error") for r in collected.unfinished],
        "prerun_failures": [{"job": j, "error": e} for j, e in collected.prerun_failures],
    }


def _meta(tracking_uri: str, collected: Collected) -> str:
    commits = sorted({r.tags.get("git_commit", "?")[:10] for r in collected.rows})
    devices = sorted(
        {
            g if (g := r.tags.get("gpu")) not in (None, "", "none") else r.tags.get("cpu", "?")
            for r in collected.rows
        }
    )
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Tracking store `{redact(tracking_uri)}`, experiment(s) {', '.join(collected.experiments) or '–'}: "
        f"{len(collected.rows)} finished run(s), {len(collected.unfinished) + len(collected.prerun_failures)} "
        f"that did not finish. Runs from git {', '.join(commits) or '–'} on {'; '.join(devices) or '–'}. "
        f"Generated {when}."
    )


def build_report(tracking_uri: str, selection: Selection, out_dir: Path, constraints: Any = None) -> Report:
    """Collect, compare, judge and write the report files into ``out_dir``; with ``constraints``
    (recommend.Constraints) also the recommendation (recommend.md/json, pareto.png)."""
    from mlflow.tracking import MlflowClient

    if constraints is not None:
        constraints.check()  # bad flags fail before any query
    collected = collect(MlflowClient(tracking_uri=tracking_uri), selection)
    rows = compare(collected)
    summaries, fp8_command = summarize(rows), missing_fp8(collected, rows)
    res, engine = resolution(rows), engine_rows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    title, meta = f"Does NVFP4 lose less than 1%? — {selection.label()}", _meta(tracking_uri, collected)
    png = render.plot(rows, title, out_dir / PLOT_NAME)
    blocks = render.document(
        title, meta, collected, rows, summaries, res, png.name if png else None, fp8_command, engine
    )
    files = [out_dir / "report.md", out_dir / "report.html", out_dir / "report.json"]
    files[0].write_text(render.to_markdown(blocks))
    files[1].write_text(render.to_html(blocks, out_dir))
    data = as_json(rows, summaries, collected, fp8_command, res, engine)
    files[2].write_text(json.dumps(data, indent=2, default=str))
    files += [png] if png else []
    rec = None
    if constraints is not None:
        rec, rec_files = write_recommendation(rows, constraints, out_dir, selection.label(), meta)
        files += rec_files
    return Report(out_dir, files, collected, rows, summaries, fp8_command, rec)


def write_recommendation(
    rows: list[ReportRow], constraints: Any, out_dir: Path, label: str, meta: str
) -> tuple[Any, list[Path]]:
    """recommend.md, recommend.json and pareto.png in ``out_dir``."""
    rec = recommend.recommend(rows, constraints)
    title = f"Which quantization on {rec.device_name}? — {label}"
    png = recommend.plot(rec, title, out_dir / recommend.PLOT_NAME)
    plot_name = png.name if png else None
    blocks = [render.Block("h1", title), render.Block("p", meta)] + recommend.blocks(rec, plot_name)
    files = [out_dir / "recommend.md", out_dir / "recommend.json"]
    files[0].write_text(render.to_markdown(blocks))
    files[1].write_text(json.dumps(recommend.as_json(rec), indent=2, default=str))
    return rec, files + ([png] if png else [])


def log_report(tracking_uri: str, report: Report, label: str) -> str | None:
    """Store the report files as artifacts of a new run ``report-<label>`` (tag kind=report) in the
    experiment of the reported runs; return its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = report.collected.rows or report.collected.unfinished
    if not runs:
        return None
    experiment = client.get_experiment_by_name(runs[0].experiment)
    run = client.create_run(
        experiment.experiment_id, run_name=f"report-{label}", tags={REPORT_TAG: "report", "report.of": label}
    )
    for path in report.files:
        client.log_artifact(run.info.run_id, str(path), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


__all__ = ["Report", "Selection", "build_report", "log_report"]
