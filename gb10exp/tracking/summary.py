"""End of a sweep: print its runs side by side, and exit non-zero if any job failed.

Jobs that failed before an MLflow run existed (bad input caught in ``prepare``) leave ``failed.txt`` in
their Hydra output folder, so the summary lists them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

COLUMNS = [  # (metric, header, format)
    ("perplexity", "ppl", "{:.3f}"),
    ("kl_mean", "KL", "{:.4f}"),
    ("top1_agreement", "top1", "{:.3f}"),
    ("weight_gib", "GiB", "{:.3f}"),
    ("ttft_s", "TTFT s", "{:.3f}"),
    ("decode_tokens_per_s", "tok/s", "{:.1f}"),
    ("total_s", "wall s", "{:.0f}"),
]


def mark_failed(output_dir: str, message: str) -> None:
    from gb10exp.tracking.secrets import redact

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "failed.txt").write_text(redact(message) + "\n")


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["run", "status"] + [h for _, h, _ in COLUMNS]
    body = []
    for r in rows:
        cells = [r["name"], r["status"]]
        for key, _, fmt in COLUMNS:
            value = r["metrics"].get(key)
            cells.append(fmt.format(value) if value is not None else "-")
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def sweep_rows(tracking_uri: str, sweep_dir: str) -> list[dict[str, Any]]:
    """The MLflow runs of one sweep, in every experiment (a sweep over models spans several)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []  # no job got as far as recording; don't create an empty store
    client = MlflowClient(tracking_uri=tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.sweep_dir = '{sweep_dir}'",
                              order_by=["attributes.start_time ASC"]) if ids else []
    return [{"name": r.info.run_name, "status": r.info.status, "metrics": r.data.metrics} for r in runs]


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        from gb10exp.tracking.secrets import redact, tracking_uri

        uri = OmegaConf.select(config, "tracking.uri")
        try:
            rows = sweep_rows(tracking_uri(uri), str(sweep_dir))
        except Exception as exc:  # the jobs' outcome still decides the exit status below
            print(f"could not read the sweep's runs from {redact(uri)}: {redact(str(exc).splitlines()[0][:200])}")
            rows = []
        print(f"\n== sweep {sweep_dir.name}: {len(rows)} MLflow run(s) in {redact(uri)} ==")
        if rows:
            print(format_table(rows))
        failures = sorted(sweep_dir.glob("*/failed.txt"))
        for f in failures:
            print(f"FAILED job {f.parent.name}: {f.read_text().strip()}")
        if failures:
            print(f"{len(failures)} of the sweep's jobs failed; a recorded run keeps its traceback.txt")
            raise SystemExit(1)
