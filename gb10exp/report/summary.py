"""End of a sweep: print its runs side by side (with ``ppl_vs_ref``), list the jobs that failed, even
before an MLflow run existed (bad input caught in ``prepare``: their ``failed.txt``), and exit non-zero
if any did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gb10exp.report.collect import FAILED_FILE, RunRow, pair_differences
from gb10exp.tracking.secrets import redact, tracking_uri
from gb10exp.tracking.store import sqlite_path

COLUMNS = [  # (metric, header, format)
    ("perplexity", "ppl", "{:.3f}"),
    ("kl_mean", "KL", "{:.4f}"),
    ("top1_agreement", "top1", "{:.3f}"),
    ("weight_gib", "GiB", "{:.3f}"),
    ("ttft_s", "TTFT s", "{:.3f}"),
    ("decode_tokens_per_s", "tok/s", "{:.1f}"),
    ("total_s", "wall s", "{:.0f}"),
]
REF_HEADER = "ppl vs ref"
REF_AFTER = "ppl"  # the column it follows


def ppl_vs_ref(rows: list[dict[str, Any]]) -> list[str]:
    """Per row: the relative perplexity change against a bf16 run of the sweep scored on the same tokens
    (paired as the report pairs), else against its in-run reference (metric ``reference_perplexity``); the
    cell says which ("bf16" or "in-run")."""
    runs = []
    for r in rows:
        name, params, tags = r["name"], r.get("params", {}), r.get("tags", {})
        runs.append(RunRow(r.get("run_id", name), name, r["status"], "", params, r["metrics"], tags, 0))
    bf16 = [b for b in runs if b.status == "FINISHED" and not b.quantized and "perplexity" in b.metrics]
    return [_vs_ref(run, bf16) for run in runs]


def _vs_ref(run: RunRow, bf16: list[RunRow]) -> str:
    if (ppl := run.metrics.get("perplexity")) is None:
        return "-"
    if not run.quantized and run.params:
        return "ref"
    if (ref := next((b for b in bf16 if b is not run and not pair_differences(run, b)), None)) is not None:
        return f"{(ppl / ref.metrics['perplexity'] - 1) * 100:+.2f}% bf16"
    if run.metrics.get("reference_perplexity"):
        return f"{(ppl / run.metrics['reference_perplexity'] - 1) * 100:+.2f}% in-run"
    return "-"


def mark_failed(output_dir: str, message: str) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / FAILED_FILE).write_text(redact(message) + "\n")


def format_table(rows: list[dict[str, Any]]) -> str:
    at = [h for _, h, _ in COLUMNS].index(REF_AFTER) + 3  # after run, status and that column
    headers = ["run", "status"] + [h for _, h, _ in COLUMNS]
    headers.insert(at, REF_HEADER)
    body = []
    for r, vs_ref in zip(rows, ppl_vs_ref(rows), strict=True):
        cells = [fmt.format(v) if (v := r["metrics"].get(k)) is not None else "-" for k, _, fmt in COLUMNS]
        body.append([r["name"], r["status"], *cells])
        body[-1].insert(at, vs_ref)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def sweep_rows(uri: str, sweep_dir: str) -> list[dict[str, Any]]:
    """The MLflow runs of one sweep, in every experiment (a sweep over models spans several)."""
    from mlflow.tracking import MlflowClient

    if (path := sqlite_path(uri)) is not None and not path.exists():
        return []  # no job got as far as recording; don't create an empty store
    client = MlflowClient(tracking_uri=uri)
    if not (ids := [e.experiment_id for e in client.search_experiments()]):
        return []
    order = ["attributes.start_time ASC"]
    runs = client.search_runs(ids, filter_string=f"tags.sweep_dir = '{sweep_dir}'", order_by=order)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "metrics": r.data.metrics,
            "params": r.data.params,
            "tags": r.data.tags,
        }
        for r in runs
    ]


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        uri = OmegaConf.select(config, "tracking.uri")
        try:
            rows = sweep_rows(tracking_uri(uri), str(sweep_dir))
        except Exception as exc:  # the jobs' outcome still decides the exit status below
            why = redact(str(exc).splitlines()[0][:200])
            print(f"could not read the sweep's runs from {redact(uri)}: {why}")
            rows = []
        print(f"\n== sweep {sweep_dir.name}: {len(rows)} MLflow run(s) in {redact(uri)} ==")
        if rows:
            print(format_table(rows))
        failures = sorted(sweep_dir.glob(f"*/{FAILED_FILE}"))
        for f in failures:
            print(f"FAILED job {f.parent.name}: {f.read_text().strip()}")
        if failures:
            print(f"{len(failures)} of the sweep's jobs failed; a recorded run keeps its traceback.txt")
            raise SystemExit(1)
