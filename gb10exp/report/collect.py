"""MLflow runs -> rows: the runs a report covers (one experiment, or one sweep, which may span one
experiment per model), their per-window results, and the runs that failed (listed, never dropped, with
the jobs of a local sweep folder that failed before an MLflow run existed: their ``failed.txt``).
Reference runs (bf16, fp8) are looked up in the whole experiment of every covered run, because resume
skips a job whose twin finished in an earlier sweep.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gb10exp.config import ConfigError
from gb10exp.quant import formats
from gb10exp.tracking.ui import REPORT_TAG
from gb10exp.tracking.ui import latest_experiment as latest_experiment_id

NONE = formats.NONE  # how MLflow params spell a null
# The params that fix the perplexity windows: runs agreeing on them were evaluated on the same tokens.
# Only the fallback for runs recorded before the digest tags existed (old stores): params cannot see an
# edited eval.path file, a different tokenizer or another compute dtype.
WINDOW_PARAMS = ("eval.dataset", "eval.path", "eval.seq_len", "eval.num_windows")
# The tags that make two runs comparable (CONTRACT: identity helper): the digest of the scored tokens and
# scoring protocol, of the tokenizer, and the dtype the numbers were computed in.
PAIR_TAGS = ("eval_digest", "tokenizer_digest", "compute_dtype")
PAIRED_BY_TAGS = ", ".join(PAIR_TAGS)
PAIRED_BY_PARAMS = "params (old run without digest tags)"
# The config hash's exclusions: they never change what a run measures, so they do not split a recipe.
UNMEASURED = ("tracking", "force", "cache")
FAILED_FILE = "failed.txt"  # in a job's Hydra output folder: why it failed (no MLflow run may exist)


@dataclass
class Selection:
    """What to report on: an experiment name, or a sweep (by id or by its output folder)."""

    experiment: str | None = None
    sweep_id: str | None = None
    sweep_dir: str | None = None

    def label(self) -> str:
        if self.sweep_id or self.sweep_dir:
            return self.sweep_id or Path(self.sweep_dir).name
        return self.experiment or "latest"

    def filter_string(self) -> str:
        if self.sweep_dir:
            return f"tags.sweep_dir = '{Path(self.sweep_dir).resolve()}'"
        if self.sweep_id:
            return f"tags.sweep_id = '{self.sweep_id}'"
        return ""


@dataclass
class RunRow:
    """One MLflow run as the report sees it."""

    run_id: str
    name: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | SCHEDULED
    experiment: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int
    windows: dict[str, list[float]] | None = None  # results.json's per-window sums, when present
    # The engine's own per-window sums beside a simulated headline (results.json's windows_deployed)
    deployed_windows: dict[str, list[float]] | None = None
    overrides: list[str] | None = None  # overrides.yaml (the job's command-line overrides), loaded on demand

    @property
    def qformat(self) -> str:
        return self.tags.get("qformat") or self.params.get("qformat.name", "?")

    @property
    def model(self) -> str:
        return self.tags.get("model") or self.params.get("model.name", "?")

    @property
    def backend(self) -> str:
        return self.params.get("backend.name", "?")

    @property
    def fmt(self) -> formats.Format:
        return formats.from_params(self.params)

    @property
    def quantized(self) -> bool:
        """By modelopt, ``mtq.auto_quantize`` or llama.cpp's quantizer: not a bf16 reference."""
        return self.fmt.quantized

    @property
    def calib_size(self) -> int | None:
        """None for runs that no calibration touched (weight-only round-to-nearest formats among them)."""
        value = self.params.get("calib_size")
        return int(value) if self.fmt.calibrates and value not in NONE else None

    @property
    def seed(self) -> str:
        return self.params.get("seed", "0")

    @property
    def recipe_key(self) -> tuple:
        """Runs with equal keys differ at most in their seed: the calibrations of one recipe."""
        keep = [(k, v) for k, v in self.params.items() if k != "seed" and k.split(".")[0] not in UNMEASURED]
        return tuple(sorted(keep))

    @property
    def ref_windows(self) -> dict[str, list[float]] | None:
        return ref_windows(self.windows)

    @property
    def error(self) -> str:
        return self.tags.get("error", "")


def ref_windows(windows: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
    """The in-run reference's sums in ``windows``: the unquantized model scored on exactly its positions."""
    if not windows or not windows.get("ref_nll"):
        return None
    return {"nll": windows["ref_nll"], "tokens": windows["tokens"]}


def _differ(a: dict[str, str], b: dict[str, str], keys) -> list[str]:
    return [f"{k} {a.get(k)} != {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


def pair_basis(a: RunRow, b: RunRow) -> str:
    """How two runs are matched: by the digest tags when both carry them, else by params."""
    return PAIRED_BY_TAGS if all(a.tags.get(t) and b.tags.get(t) for t in PAIR_TAGS) else PAIRED_BY_PARAMS


def pair_differences(a: RunRow, b: RunRow) -> list[str]:
    """What makes ``a`` and ``b`` incomparable (empty: they were scored on the same tokens the same way)."""
    if a.model != b.model:
        return [f"model {a.model} != {b.model}"]
    # The digests say nothing about the weights: the model's own params must agree either way.
    keys = [k for k in sorted(set(a.params) | set(b.params)) if k.startswith("model.")]
    if pair_basis(a, b) == PAIRED_BY_TAGS:
        return _differ(a.params, b.params, keys) + _differ(a.tags, b.tags, PAIR_TAGS)
    return _differ(a.params, b.params, keys + list(WINDOW_PARAMS))


@dataclass
class Collected:
    rows: list[RunRow]  # finished runs of the selection, one per config (the latest)
    references: list[RunRow]  # finished unquantized and fp8 runs of the same experiments
    unfinished: list[RunRow]  # runs of the selection that did not finish
    prerun_failures: list[tuple[str, str]] = field(default_factory=list)  # (job folder, message)
    experiments: list[str] = field(default_factory=list)


def _search(client, experiments: dict[str, str], filter_string: str = "") -> list[RunRow]:
    """Every run of ``experiments`` (id -> name; all pages), oldest first, without report runs."""
    runs, token, order = [], None, ["attributes.start_time ASC"]
    while True:
        page = client.search_runs(
            list(experiments), filter_string=filter_string, max_results=1000, order_by=order, page_token=token
        )
        runs.extend(page)
        if not (token := page.token):
            break
    return [
        _row(r, experiments[r.info.experiment_id]) for r in runs if r.data.tags.get(REPORT_TAG) != "report"
    ]


def _row(run, experiment: str) -> RunRow:
    return RunRow(
        run.info.run_id,
        run.info.run_name or run.info.run_id,
        run.info.status,
        experiment,
        dict(run.data.params),
        dict(run.data.metrics),
        dict(run.data.tags),
        run.info.start_time or 0,
    )


def _artifact(client, row: RunRow, name: str) -> str | None:
    """The text of the run's artifact ``name`` (local stores and tracking servers alike), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(row.run_id, name, tmp)
        except Exception:  # no artifact (an old or foreign run): the report falls back to the metrics
            return None
        return Path(path).read_text()


def load_windows(client, row: RunRow) -> None:
    """The per-window sums of ``results.json`` into ``row``: the run's, and the engine's own where it
    deployed a simulated format."""
    if (text := _artifact(client, row, "results.json")) is not None:
        results = json.loads(text)
        row.windows, row.deployed_windows = results.get("windows"), results.get("windows_deployed")


def load_overrides(client, row: RunRow) -> list[str] | None:
    """The job's command-line overrides (``overrides.yaml``: one per line), or None for a run without it."""
    text = _artifact(client, row, "overrides.yaml")
    return None if text is None else [line.strip() for line in text.splitlines() if line.strip()]


def latest_experiment(client) -> str:
    """The name of the experiment holding the most recently started job run (report runs aside)."""
    if (experiment_id := latest_experiment_id(client)) is None:
        raise ConfigError(
            "the tracking store holds no runs: run a sweep first (python -m gb10exp +experiment=nvfp4_claim)"
        )
    return client.get_experiment(experiment_id).name


def _experiment_ids(client, selection: Selection) -> dict[str, str]:
    """experiment id -> name for the selection."""
    if selection.sweep_id or selection.sweep_dir:
        return {e.experiment_id: e.name for e in client.search_experiments()}
    name = selection.experiment or latest_experiment(client)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"--experiment={name!r} is not allowed: no such experiment; one of {names}")
    return {experiment.experiment_id: experiment.name}


def _latest_per_config(runs: list[RunRow]) -> list[RunRow]:
    """One finished run per config hash (the latest): ``force=true`` reruns do not count twice."""
    latest: dict[str, RunRow] = {}
    for row in sorted(runs, key=lambda r: r.start_time):
        latest[row.tags.get("config_hash", row.run_id)] = row
    return sorted(latest.values(), key=lambda r: r.start_time)


def prerun_failures(sweep_dir: str | None) -> list[tuple[str, str]]:
    """Jobs of a local sweep folder that failed before an MLflow run existed."""
    if not sweep_dir or not Path(sweep_dir).is_dir():
        return []
    return [(f.parent.name, f.read_text().strip()) for f in sorted(Path(sweep_dir).glob(f"*/{FAILED_FILE}"))]


def collect(client, selection: Selection) -> Collected:
    """The runs of ``selection``, their references, and their failures, with per-window results."""
    experiments = _experiment_ids(client, selection)
    selected = _search(client, experiments, selection.filter_string())
    if not selected and not prerun_failures(selection.sweep_dir):
        raise ConfigError(
            f"no runs match {selection.label()!r} in this tracking store; check --experiment/--sweep "
            "and --tracking-uri"
        )
    involved = {r.experiment for r in selected}
    ids = {i: n for i, n in experiments.items() if n in involved}
    pool = _search(client, ids) if ids else []
    finished = _latest_per_config([r for r in selected if r.status == "FINISHED"])
    references = _latest_per_config(
        [r for r in pool if r.status == "FINISHED" and (not r.quantized or r.qformat == "fp8")]
    )
    # A sweep chosen by id still finds its local folder (and the jobs that failed before MLflow) via tags.
    sweep_dir = selection.sweep_dir or next(
        (r.tags["sweep_dir"] for r in selected if "sweep_dir" in r.tags and selection.sweep_id), None
    )
    by_id = {r.run_id: r for r in finished + references}
    for row in by_id.values():
        load_windows(client, row)
    references = [by_id[r.run_id] for r in references]  # the same objects, windows loaded once
    if not any(r.qformat == "fp8" for r in references):  # the report prints the command that adds fp8 runs
        for row in finished:
            if row.quantized:
                by_id[row.run_id].overrides = load_overrides(client, row)
    return Collected(
        rows=[by_id[r.run_id] for r in finished],
        references=references,
        unfinished=[r for r in selected if r.status != "FINISHED"],
        prerun_failures=prerun_failures(sweep_dir),
        experiments=sorted(involved),
    )
