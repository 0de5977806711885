"""What the MLflow UI shows: a one-line description per run, its data as dataset inputs, and a saved runs
table with the headline metrics as columns; ``make ui`` opens it.

MLflow 3.17's UI (read from its source, checked in headless Chromium by tests/test_ui.py):
- an experiment tag ``mlflow.sharedViewState.<key>`` holds a JSON view (``selectedColumns`` as canonical keys
  such as ``metrics.`perplexity```, ``columnWidths``, ``orderByKey``, ``searchFilter``...), applied when the
  URL carries ``?viewStateShareKey=<key>`` and no filter parameter of its own (the UI's "share view");
- ``compareRunsMode=TABLE`` in the URL shows the table, not the charts it picks when runs have metrics;
- ``workflowType=machine_learning`` in the URL shows the "Model training" layout; otherwise the layout comes
  from the browser's localStorage (GenAI when unset), never from the experiment (``mlflow.experimentKind``
  is not read): the server app ``gb10exp.tracking.mlflow_app`` sets it there;
- the table shows a metric as JavaScript prints the float (up to 17 digits), with no formatter: each
  headline metric is also logged rounded (``rounded/<name>``), and those are the columns;
- a run tag ``mlflow.note.content`` is its description (the run page's "Description", a table column).
``python -m gb10exp.tracking.ui [--store URI]`` (``make ui``) prints the link to the latest experiment's
table and starts ``mlflow ui --app-name gb10exp-ui`` on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from gb10exp.config import Config
from gb10exp.tracking.mlflow_app import APP_NAME
from gb10exp.tracking.secrets import redact
from gb10exp.tracking.store import LOCAL_URI

if TYPE_CHECKING:  # annotations only: `make ui` starts faster without torch
    import torch

    from gb10exp.data import EvalWindows

VIEW_KEY = "gb10exp"  # ?viewStateShareKey=gb10exp
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# The headline metrics, in table order: accuracy against the reference, size, speed.
COLUMNS = ("perplexity", "kl_mean", "top1_agreement", "weight_gib", "decode_tokens_per_s")
# The table cannot round (MLflow 3.17 registers no value formatter for metric columns): a copy of each
# headline metric rounded to this many significant digits is logged beside the exact value, and the saved
# view shows the copies. Four digits tell the formats of one model apart (ppl 14.88 vs 15.22, KL 0.03069,
# top-1 0.9019) without the 17 of 15.218362394096562; the exact values stay under the plain names.
ROUNDED = "rounded/"  # a prefix, as lm-eval task metrics have "task/"
DIGITS = 4
# Widths in pixels: the rounded headers in full at MLflow's 13 px font, all five beside the run names
# inside a 1600-pixel window (tests/test_ui.py measures it).
METRIC_WIDTHS = {"perplexity": 150, "kl_mean": 135, "top1_agreement": 180, "weight_gib": 150,
                 "decode_tokens_per_s": 210}
TAG_COLUMNS = ("hardware", "quantization")
RUN_NAME_COLUMN = "attributes.`Run Name`"
DESCRIPTION_COLUMN = "attributes.`Description`"
REPORT_TAG = "kind"  # report runs (python -m gb10exp.report) are tagged kind=report: never a job's run
# Job runs only. `tags.kind != 'report'` would match no run at all (a run without the tag never matches).
JOB_RUNS = f"tags.{REPORT_TAG} IS NULL"


def rounded(metrics: dict[str, float | None]) -> dict[str, float]:
    """The table's copies of the headline metrics present: ``rounded/<name>`` to DIGITS significant digits."""
    return {f"{ROUNDED}{k}": float(f"{metrics[k]:.{DIGITS}g}") for k in COLUMNS if metrics.get(k) is not None}


def view_state() -> dict[str, Any]:
    """The saved view: the rounded headline metrics in reading order (MLflow sorts them by name otherwise),
    the hardware and quantization tags, the description last; run names wide enough to read; newest first;
    job runs only (a report's run has no metrics and would sit on top of the table).
    The UI applies ``columnWidths`` only to the columns listed in ``columnOrder``."""
    metrics = [f"metrics.`{ROUNDED}{m}`" for m in COLUMNS]
    tags = [f"tags.`{t}`" for t in TAG_COLUMNS]
    widths = {RUN_NAME_COLUMN: 260, "runDateAndNestInfo": 140,  # "22 seconds ago" in full
              **{f"metrics.`{ROUNDED}{m}`": METRIC_WIDTHS[m] for m in COLUMNS}, tags[0]: 210, tags[1]: 230,
              DESCRIPTION_COLUMN: 560}
    return {"selectedColumns": [*metrics, *tags, DESCRIPTION_COLUMN], "columnOrder": list(widths),
            "columnWidths": widths, "orderByKey": "attributes.start_time", "orderByAsc": False,
            "searchFilter": JOB_RUNS}


def ensure_view(client, experiment_id: str) -> None:
    """Set the experiment's saved view once (new experiments, and ones made before this existed)."""
    view = json.dumps(view_state())
    if client.get_experiment(experiment_id).tags.get(VIEW_TAG) != view:
        client.set_experiment_tag(experiment_id, VIEW_TAG, view)


def table_url(base: str, experiment_id: str) -> str:
    """The runs table in the Model training layout, whatever layout this browser last used. No filter
    parameter here: any of them makes the UI skip the saved view (its columns and its filter)."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?viewStateShareKey={VIEW_KEY}&compareRunsMode=TABLE&workflowType=machine_learning")


# (metric, label, format) of the description line; a metric the run lacks is left out.
NOTE_METRICS = (("perplexity", "ppl", "{:.3f}"), ("kl_mean", "KL", "{:.4f}"),
                ("top1_agreement", "top-1", "{:.1%}"), ("weight_gib", "weights", "{:.3f} GiB"),
                ("decode_tokens_per_s", "decode", "{:.1f} tok/s"))


def run_note(cfg: Config, metrics: dict[str, float], tags: dict[str, str]) -> str:
    """One line: model, format and how its numbers were computed, then the key metrics."""
    how = tags.get("quantization", "none").split(" (")[0]
    head = f"{cfg.model.name} {cfg.qformat.name} ({how}) on {cfg.backend.name}"
    parts = [f"{label} {f.format(metrics[k])}" for k, label, f in NOTE_METRICS if metrics.get(k) is not None]
    return " · ".join([head, *parts])


def _source(data_cfg) -> tuple[str, str]:
    """(source_type, source JSON) of a gb10exp data config, as MLflow's dataset sources spell them."""
    if data_cfg.dataset == "text_file":
        return "local", json.dumps({"uri": os.path.abspath(os.path.expanduser(data_cfg.path))})
    if data_cfg.dataset == "pydoc_topics":
        return "code", json.dumps({"tags": {"module": "pydoc_data.topics", "python": sys.version.split()[0]}})
    hub = {"wikitext2": "wikitext/wikitext-2-raw-v1", "cnn_dailymail": "abisee/cnn_dailymail/3.0.0"}
    return "hugging_face", json.dumps({"path": hub.get(data_cfg.dataset, data_cfg.dataset)})


def dataset_inputs(cfg: Config, tags: dict[str, str], calib: torch.Tensor, windows: EvalWindows) -> list:
    """The evaluation windows (and calibration samples, when the job calibrates) as MLflow dataset inputs,
    named after the dataset and digested like the run's eval_digest / calib_digest tags."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    def one(kind: str, data_cfg, tokens: torch.Tensor, digest: str) -> DatasetInput:
        source_type, source = _source(data_cfg)
        profile = {"sequences": int(tokens.shape[0]), "tokens_per_sequence": int(tokens.shape[1]),
                   "tokens": int(tokens.numel())}
        spec = {"dtype": str(tokens.dtype).removeprefix("torch."), "shape": list(tokens.shape)}
        schema = {"mlflow_tensorspec": {"features": json.dumps([{"type": "tensor", "tensor-spec": spec}])}}
        dataset = Dataset(name=f"{data_cfg.dataset}-{kind}", digest=digest, source_type=source_type,
                          source=source, schema=json.dumps(schema), profile=json.dumps(profile))
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", kind)])

    inputs = [one("eval", cfg.eval, windows.tokens, tags["eval_digest"])]
    if tags.get("calib_digest", "none") != "none":
        inputs.append(one("calibration", cfg.calib, calib, tags["calib_digest"]))
    return inputs


def latest_experiment(client) -> str | None:
    """The id of the experiment whose newest job run (report runs aside) is the newest in the store: the
    one a user just ran; None for a store without job runs."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    newest = client.search_runs(experiments, filter_string=JOB_RUNS, order_by=["attributes.start_time DESC"], max_results=1)
    return newest[0].info.experiment_id if newest else None


def backfill_rounded(client, experiment_id: str) -> int:
    """Log the rounded copies on the experiment's job runs that predate them (else the table shows "-" in
    every column for them); returns how many runs got them."""
    from mlflow.entities import Metric

    done, token = 0, None
    while True:
        page = client.search_runs([experiment_id], filter_string=JOB_RUNS, max_results=1000, page_token=token)
        for run in page:
            missing = {k: v for k, v in rounded(run.data.metrics).items() if k not in run.data.metrics}
            if missing:
                stamp = run.info.end_time or run.info.start_time or 0
                client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in missing.items()])
                done += 1
        token = page.token
        if not token:
            return done


def mlflow_ui_args(store: str, host: str, port: int) -> list[str]:
    """``mlflow ui``'s arguments: gb10exp's server app when it is installed (``pip install -e .`` registers its
    entry point), else none, with a line saying the one click that the app saves."""
    args = ["ui", "--backend-store-uri", store, "--host", host, "--port", str(port), "--workers", "1"]
    # --workers 1: one user on loopback; MLflow's default 4 take a minute to start on 2 cores
    if any(e.name == APP_NAME for e in entry_points(group="mlflow.app")):
        return [*args, "--app-name", APP_NAME]
    print(f"note: MLflow app {APP_NAME!r} is not installed in this environment (pip install -e . installs it); "
          "in a new browser MLflow's Assistant panel opens over the last metric columns: close it with its ×",
          file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MLflow UI on the runs table of the latest experiment")
    parser.add_argument("--store", default=LOCAL_URI, help=f"tracking URI (default: {LOCAL_URI})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--print-only", action="store_true", help="print the link, do not start the server")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.store)
    experiment_id = latest_experiment(client)
    base = f"http://{args.host}:{args.port}"
    if experiment_id is None:
        print(f"no runs in {redact(args.store)} yet: run `python -m gb10exp` first; the UI opens on {base}")
    else:
        ensure_view(client, experiment_id)
        backfill_rounded(client, experiment_id)
        print("runs table of the latest experiment, with its metrics as columns:\n  "
              + table_url(base, experiment_id))
    sys.stdout.flush()
    if not args.print_only:
        # MLflow's background job runner serves only GenAI features (judges, scorers) and starts its own
        # processes, which doubled the time to a usable page on 2 cores; a user who wants it sets it to true.
        os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        from mlflow.cli import cli  # the `mlflow` command itself, in this process: mlflow is imported already

        cli.main(args=mlflow_ui_args(args.store, args.host, args.port), prog_name="mlflow")


if __name__ == "__main__":
    main()
