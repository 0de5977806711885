"""What the MLflow UI shows: a one-line description per run, its data as dataset inputs, and a saved
runs-table view with the headline metrics as columns.

MLflow 3.17's UI (read from its source, checked in headless Chromium by benchmarks/ui_check.py):
- an experiment tag ``mlflow.experimentKind`` = ``custom_model_development`` keeps the experiment out of the
  GenAI views (traces, judges);
- an experiment tag ``mlflow.sharedViewState.<key>`` holds a JSON view (``selectedColumns`` as canonical keys
  such as ``metrics.`perplexity```, ``columnWidths``, ``orderByKey``...), applied when the URL carries
  ``?viewStateShareKey=<key>`` (the UI's "share view" feature);
- ``compareRunsMode=TABLE`` in the URL shows the table rather than the charts it picks when runs have metrics;
- a run tag ``mlflow.note.content`` is its description (the run page's "Description", a table column).

``python -m gb10exp.tracking.ui [--store URI]`` (``make ui``) prints the link to the latest experiment's
table and starts ``mlflow ui`` on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from gb10exp.config import Config
from gb10exp.data import EvalWindows
from gb10exp.tracking.secrets import redact
from gb10exp.tracking.store import LOCAL_URI

VIEW_KEY = "gb10exp"  # ?viewStateShareKey=gb10exp
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# The headline metrics, in table order: accuracy against the reference, size, speed.
COLUMNS = ("perplexity", "kl_mean", "top1_agreement", "weight_gib", "decode_tokens_per_s")
TAG_COLUMNS = ("hardware", "quantization")
RUN_NAME_COLUMN = "attributes.`Run Name`"
DESCRIPTION_COLUMN = "attributes.`Description`"


def view_state() -> dict[str, Any]:
    """The saved view: the metric columns in reading order (MLflow sorts them by name otherwise), the
    hardware and quantization tags, the description last; run names wide enough to read; newest first.
    The UI applies ``columnWidths`` only to the columns listed in ``columnOrder``."""
    metrics = [f"metrics.`{m}`" for m in COLUMNS]
    tags = [f"tags.`{t}`" for t in TAG_COLUMNS]
    widths = {
        RUN_NAME_COLUMN: 270,
        "runDateAndNestInfo": 130,
        **dict.fromkeys(metrics, 150),
        tags[0]: 210,
        tags[1]: 230,
        DESCRIPTION_COLUMN: 560,
    }
    return {
        "selectedColumns": [*metrics, *tags, DESCRIPTION_COLUMN],
        "columnOrder": list(widths),
        "columnWidths": widths,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


def experiment_tags() -> dict[str, str]:
    return {"mlflow.experimentKind": "custom_model_development", VIEW_TAG: json.dumps(view_state())}


def ensure_view(client, experiment_id: str) -> None:
    """Set the experiment's kind and saved view once (new experiments, and ones made before this existed)."""
    tags = client.get_experiment(experiment_id).tags
    for key, value in experiment_tags().items():
        if tags.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def table_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&compareRunsMode=TABLE"


# (metric, label, format) of the description line; a metric the run lacks is left out.
NOTE_METRICS = (
    ("perplexity", "ppl", "{:.3f}"),
    ("kl_mean", "KL", "{:.4f}"),
    ("top1_agreement", "top-1", "{:.1%}"),
    ("weight_gib", "weights", "{:.3f} GiB"),
    ("decode_tokens_per_s", "decode", "{:.1f} tok/s"),
)


def run_note(cfg: Config, metrics: dict[str, float], tags: dict[str, str]) -> str:
    """One line: model, format and how its numbers were computed, then the key metrics."""
    how = tags.get("quantization", "none").split(" (")[0]
    head = f"{cfg.model.name} {cfg.qformat.name} ({how}) on {cfg.backend.name}"
    parts = [
        f"{label} {spec.format(metrics[key])}"
        for key, label, spec in NOTE_METRICS
        if metrics.get(key) is not None
    ]
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
        profile = {
            "sequences": int(tokens.shape[0]),
            "tokens_per_sequence": int(tokens.shape[1]),
            "tokens": int(tokens.numel()),
        }
        schema = {
            "mlflow_tensorspec": {
                "features": json.dumps(
                    [
                        {
                            "type": "tensor",
                            "tensor-spec": {
                                "dtype": str(tokens.dtype).removeprefix("torch."),
                                "shape": list(tokens.shape),
                            },
                        }
                    ]
                )
            }
        }
        dataset = Dataset(
            name=f"{data_cfg.dataset}-{kind}",
            digest=digest,
            source_type=source_type,
            source=source,
            schema=json.dumps(schema),
            profile=json.dumps(profile),
        )
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", kind)])

    inputs = [one("eval", cfg.eval, windows.tokens, tags["eval_digest"])]
    if tags.get("calib_digest", "none") != "none":
        inputs.append(one("calibration", cfg.calib, calib, tags["calib_digest"]))
    return inputs


REPORT_TAG = "kind"  # report runs (python -m gb10exp.report) are tagged kind=report: never a job's run


def latest_experiment(client) -> str | None:
    """The id of the experiment whose newest job run (report runs aside) is the newest in the store: the
    one a user just ran; None for a store without job runs."""
    experiments, token = [e.experiment_id for e in client.search_experiments()], None
    while experiments:  # newest first; MLflow's filter cannot say "without the tag", so it is skipped here
        page = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=100,
                                  page_token=token)
        job = next((r for r in page if r.data.tags.get(REPORT_TAG) != "report"), None)
        if job is not None or not page.token:
            return job.info.experiment_id if job is not None else None
        token = page.token
    return None


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
        print(
            f"runs table of the latest experiment, with its metrics as columns:\n  {table_url(base, experiment_id)}"
        )
    sys.stdout.flush()
    if not args.print_only:
        os.execvp(
            sys.executable,
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                args.store,
                "--host",
                args.host,
                "--port",
                str(args.port),
            ],
        )


if __name__ == "__main__":
    main()
