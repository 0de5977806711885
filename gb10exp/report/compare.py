"""Pair every run with its references (bf16 and fp8 scored on the same tokens the same way: see
``collect.pair_differences``) and judge it, every comparison naming the reference it used.
"""

from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass, field

from gb10exp.report import stats
from gb10exp.report.collect import Collected, RunRow, pair_basis, pair_differences, ref_windows
from gb10exp.report.stats import Interval, RecipeChange, Windows
from gb10exp.report.verdict import THRESHOLD, Verdict, verdict

IN_RUN = "in-run reference"  # the unquantized model, scored inside the quantized run on its windows
SAME_RUN = "same run"
WINDOWS = "windows"  # judged_by: one run, its evaluation windows
SEEDS_AND_WINDOWS = "seeds and windows"  # judged_by: a recipe over its seeds, and the windows
# The verdict "nearest 1%" tells what the evaluation resolves there only when its loss is within this of 1%:
# intervals widen with the loss, so one taken at +50% says little about +1%.
NEAR = 0.02


@dataclass
class Comparison:
    """A run against one reference: the relative perplexity change and its verdict, or why there is none."""

    reference: RunRow | None = None
    change: Interval | None = None  # this run's evaluation-window interval (paired bootstrap)
    verdict: Verdict | None = None  # from ``judged``
    note: str = ""  # "reference" (the run is the reference), or why nothing was compared
    source: str = ""  # which reference: "bf16 run <name>", "fp8 run <name>" or IN_RUN
    paired_by: str = ""  # PAIRED_BY_TAGS, PAIRED_BY_PARAMS or SAME_RUN
    seed_spread: Interval | None = None  # mean [min, max] of the own losses of the seeds of this run's recipe
    # What the verdict stands on: this run alone (one seed), or its recipe over its seeds and the windows;
    # None for runs without per-window sums (point estimates).
    recipe: RecipeChange | None = None
    judged: Interval | None = None  # the interval the verdict used: recipe.interval, or the point estimate
    judged_by: str = ""  # WINDOWS | SEEDS_AND_WINDOWS

    @property
    def label(self) -> str:
        """Which reference, and how it was matched: printed beside every verdict."""
        if not self.source or self.paired_by in ("", SAME_RUN):
            return self.source
        return f"{self.source}, paired by {self.paired_by}"


@dataclass
class Unpaired:
    """A reference candidate of the same model that could not be paired with a run, and why."""

    run: RunRow
    candidate: RunRow
    role: str  # "bf16" | "fp8"
    differences: list[str]


@dataclass
class ReportRow:
    run: RunRow
    vs_bf16: Comparison
    vs_fp8: Comparison
    unpaired: list[Unpaired] = field(default_factory=list)


@dataclass
class FormatSummary:
    """One format of one model: the verdict at its largest calibration size, and the calibration spread."""

    model: str
    qformat: str
    row: ReportRow  # the row the verdict is taken from
    calib_sizes: list[int] = field(default_factory=list)
    calib_spread: float | None = None  # max - min loss vs bf16 across calibration sizes
    seeds: list[str] = field(default_factory=list)  # seeds of the chosen recipe that finished


@dataclass
class Resolution:
    """How small a loss this evaluation can resolve, measured by the verdict (vs bf16) nearest 1%."""

    windows: int
    tokens: int
    # Intervals widen with the loss itself (windows disagree more about a large loss), so what the evaluation
    # resolves near 1% is read off the comparison whose loss is nearest 1%; ``near`` says whether it is
    # within NEAR of it (else the sweep has not measured its resolution near 1%).
    nearest_run: str | None
    nearest: Comparison | None
    near: bool
    bf16_ppl: Interval | None  # the baseline's own perplexity interval (unpaired): the text's variability
    baseline: str = "bf16"  # whose perplexity bf16_ppl is: "bf16" (a bf16 run) or IN_RUN


def _judged(change: Interval, recipe: RecipeChange | None, **kwargs) -> Comparison:
    return Comparison(
        change=change, verdict=verdict(change), recipe=recipe, judged=change, judged_by=WINDOWS, **kwargs
    )


def _paired_change(
    windows: Windows | None, ref: Windows | None, ppl: float | None, ppl_ref: float | None
) -> tuple[Interval, RecipeChange | None]:
    """The change and its statistics from per-window sums, else the point estimate from the perplexities."""
    if windows and ref:
        recipe = stats.recipe_change([(windows, ref)])
        return recipe.interval, recipe
    return stats.point_only(ppl, ppl_ref), None


def _compare(row: RunRow, ref: RunRow | None, role: str, missing: str) -> Comparison:
    if ref is not None and ref.run_id == row.run_id:
        return Comparison(reference=ref, note="reference", source="itself", paired_by=SAME_RUN)
    if ref is not None:
        source, basis = f"{role} run {ref.name}", pair_basis(row, ref)
        try:
            change, recipe = _paired_change(
                row.windows, ref.windows, row.metrics["perplexity"], ref.metrics["perplexity"]
            )
        except stats.WindowMismatch as exc:
            return Comparison(reference=ref, note=f"windows differ ({exc})", source=source, paired_by=basis)
        return _judged(change, recipe, reference=ref, source=source, paired_by=basis)
    if role == "bf16" and (in_run := in_run_change(row)) is not None:
        return _judged(*in_run, source=IN_RUN, paired_by=SAME_RUN)
    return Comparison(note=missing)


def in_run_change(row: RunRow) -> tuple[Interval, RecipeChange | None] | None:
    """The change against the unquantized model evaluated inside the run (same windows by construction);
    without per-window sums, from its ``reference_perplexity``."""
    m = row.metrics
    if (row.ref_windows and row.windows) or ("reference_perplexity" in m and "perplexity" in m):
        return _paired_change(
            row.windows, row.ref_windows, m.get("perplexity"), m.get("reference_perplexity")
        )
    return None


def _candidates(row: RunRow, references: list[RunRow], role: str) -> tuple[list[RunRow], list[Unpaired]]:
    """References of ``role`` for ``row``: those that pair, and those of the same model that do not."""
    pool = [
        r
        for r in references
        if r.model == row.model
        and r.run_id != row.run_id
        and ((role == "bf16" and not r.quantized) or (role == "fp8" and r.quantized and r.qformat == "fp8"))
    ]
    found = [(ref, pair_differences(row, ref)) for ref in pool]
    return [ref for ref, d in found if not d], [Unpaired(row, ref, role, d) for ref, d in found if d]


def bf16_reference(row: RunRow, references: list[RunRow]) -> tuple[RunRow | None, list[Unpaired]]:
    """The latest unquantized run that pairs; else ``compare`` uses the run's in-run reference (the
    unquantized model scored on exactly its windows), so a sweep without a bf16 job still gets a verdict."""
    if not row.quantized:
        return row, []
    paired, unpaired = _candidates(row, references, "bf16")
    return max(paired, key=lambda r: r.start_time, default=None), ([] if paired else unpaired)


def fp8_reference(row: RunRow, references: list[RunRow]) -> tuple[RunRow | None, list[Unpaired]]:
    """The fp8 run with the same calibration size and seed, else the one with the most calibration samples."""
    if row.qformat == "fp8" and row.run_id in {r.run_id for r in references}:
        return row, []
    paired, unpaired = _candidates(row, references, "fp8")
    twin = [r for r in paired if r.calib_size == row.calib_size and r.seed == row.seed]
    best = max(twin or paired, key=lambda r: (r.calib_size or 0, r.start_time), default=None)
    return best, ([] if paired else unpaired)


def _order(row: RunRow) -> tuple:
    # bf16 first, then by deployed size (fp8, nvfp4 at 4.5 bits, int4 at 4.125), then calibration size.
    return (row.model, row.quantized, -row.metrics.get("weight_gib", 0.0), row.qformat, row.calib_size or 0)


def compare(collected: Collected) -> list[ReportRow]:
    """Every finished run of the selection with its two comparisons, in table order."""
    out = []
    for row in sorted(collected.rows, key=_order):
        ref, unpaired = bf16_reference(row, collected.references)
        vs_bf16 = _compare(row, ref, "bf16", "no bf16 run on the same windows and no in-run reference")
        if not row.quantized:
            vs_fp8 = Comparison(note="")  # the baseline against fp8 says nothing about the claim
        else:
            ref, fp8_unpaired = fp8_reference(row, collected.references)
            any_fp8 = any(r.qformat == "fp8" for r in collected.references)
            vs_fp8 = _compare(row, ref, "fp8", "no fp8 run on the same windows" if any_fp8 else "no fp8 run")
            unpaired += fp8_unpaired
        out.append(ReportRow(row, vs_bf16, vs_fp8, unpaired))
    combine_seeds(out)
    return out


def _pair(row: RunRow, c: Comparison) -> tuple[Windows, Windows] | None:
    """The per-window sums of a run and of the reference its comparison used, when both were kept."""
    ref = row.ref_windows if c.source == IN_RUN else (c.reference.windows if c.reference else None)
    return (row.windows, ref) if row.windows and ref else None


def combine_seeds(rows: list[ReportRow]) -> None:
    """Calibrations of one recipe with different seeds: judge each by the recipe's expected loss, with an
    interval over the seeds and the windows together (``stats.recipe_change``); record their spread.

    A verdict on one calibration would be luck of its seed; a new calibration of the recipe is what a user
    deploys, so the question is the recipe's. Seeds compared against different kinds of reference (a bf16
    run for some, the in-run reference for others), or without per-window sums, are not combined.
    """
    groups: dict[tuple, list[ReportRow]] = {}
    for r in rows:
        if r.run.quantized:
            groups.setdefault(r.run.recipe_key, []).append(r)
    for members in groups.values():
        if len({m.run.seed for m in members}) < 2:
            continue
        for attr in ("vs_bf16", "vs_fp8"):
            pairs = [(m.run, getattr(m, attr)) for m in members if getattr(m, attr).change is not None]
            comparisons = [c for _, c in pairs]
            if len(comparisons) < 2 or len({c.source == IN_RUN for c in comparisons}) > 1:
                continue
            points = [c.change.point for c in comparisons]
            spread = Interval(statistics.fmean(points), min(points), max(points))
            for c in comparisons:
                c.seed_spread = spread
            windows = [_pair(run, c) for run, c in pairs]
            if any(w is None for w in windows):
                continue  # point estimates only: each keeps its own verdict, marked "(point estimate)"
            try:
                recipe = stats.recipe_change(windows)
            except stats.WindowMismatch:
                continue  # cannot happen for runs that paired with their references; kept apart if it does
            for c in comparisons:
                c.recipe, c.judged, c.judged_by = recipe, recipe.interval, SEEDS_AND_WINDOWS
                c.verdict = verdict(recipe.interval)


def summarize(rows: list[ReportRow]) -> list[FormatSummary]:
    """Per model and quantized format: the verdict at the largest calibration size (the one a user would
    deploy; with several seeds there, the median seed's, whose verdict is already the recipe's), with the
    spread across calibration sizes."""
    groups: dict[tuple[str, str], list[ReportRow]] = {}
    for r in rows:
        if r.run.quantized:
            groups.setdefault((r.run.model, r.run.qformat), []).append(r)
    out = []
    for (model, qformat), members in groups.items():
        largest = max(r.run.calib_size or 0 for r in members)
        at_largest = [r for r in members if (r.run.calib_size or 0) == largest]
        scored = sorted((r for r in at_largest if r.vs_bf16.change), key=lambda r: r.vs_bf16.change.point)
        chosen = scored[(len(scored) - 1) // 2] if scored else at_largest[-1]
        # Calibration sizes are compared at one seed (the chosen one's), so seeds do not count twice.
        same_seed = [r.vs_bf16.change for r in members if r.run.seed == chosen.run.seed]
        points = [c.point for c in same_seed if c is not None]
        spread = max(points) - min(points) if len(points) > 1 else None
        seeds = sorted({r.run.seed for r in at_largest if r.run.recipe_key == chosen.run.recipe_key})
        calib_sizes = sorted({r.run.calib_size or 0 for r in members})
        out.append(FormatSummary(model, qformat, chosen, calib_sizes, spread, seeds))
    return out


def missing_fp8(collected: Collected, rows: list[ReportRow]) -> str | None:
    """When no quantized run has an fp8 reference because no fp8 run exists at all: the exact command that
    adds fp8 runs to the same sweep (the sweep's own overrides, with ``qformat=fp8``), else None."""
    quantized = [r.run for r in rows if r.run.quantized]
    if not quantized or any(r.qformat == "fp8" for r in collected.references):
        return None
    values: dict[str, list[str]] = {}
    known = [r for r in quantized if r.overrides is not None]
    for run in known:
        for override in run.overrides:
            key, sep, value = override.partition("=")
            if sep and value not in values.setdefault(key, []):
                values[key].append(value)
    if not known:  # runs without overrides.yaml: what the params say
        values = {
            "model": sorted({r.params.get("model.name", r.model) for r in quantized}),
            "calib_size": sorted({str(r.calib_size) for r in quantized if r.calib_size is not None}),
        }
    values["qformat"] = ["fp8"]
    # A key swept over several values becomes a comma list again; calibration does not touch bf16, so
    # formats are the only key replaced.
    args = [f"{k}={','.join(v)}" for k, v in values.items() if v]
    return "python -m gb10exp " + " ".join(shlex.quote(a) for a in args)


def resolution(rows: list[ReportRow]) -> Resolution | None:
    """The evaluation's resolution near 1%, from the comparison vs bf16 whose loss is nearest 1%, and the
    baseline's own perplexity interval."""
    measured = [(r.run.name, r.vs_bf16) for r in rows if r.vs_bf16.recipe is not None]
    nearest = min(measured, key=lambda m: abs(m[1].judged.point - THRESHOLD), default=None)
    base = next((r.run for r in rows if not r.run.quantized), None)
    any_run = base or (rows[0].run if rows else None)
    if any_run is None:
        return None
    windows = any_run.windows or {}
    return Resolution(
        windows=len(windows.get("tokens", [])),
        tokens=int(sum(windows.get("tokens", [])) or any_run.metrics.get("eval_tokens", 0)),
        nearest_run=nearest[0] if nearest else None,
        nearest=nearest[1] if nearest else None,
        near=nearest is not None and abs(nearest[1].judged.point - THRESHOLD) <= NEAR,
        bf16_ppl=_baseline_ppl(base, rows),
        baseline="bf16" if base is not None and base.windows else IN_RUN,
    )


def _baseline_ppl(base: RunRow | None, rows: list[ReportRow]) -> Interval | None:
    """The bf16 run's perplexity interval, or the in-run reference's when no bf16 run is in the report."""
    if base is not None and base.windows:
        return stats.ppl_interval(base.windows)
    in_run = next((r.run.ref_windows for r in rows if r.run.ref_windows is not None), None)
    return stats.ppl_interval(in_run) if in_run is not None else None


@dataclass
class EngineRow:
    """A run scored by its engine's own kernels (an engine that returns logits: llama.cpp), on the same windows
    as PyTorch: the deployment's accuracy, beside modelopt's simulation of it where PyTorch has the format."""

    run: RunRow
    engine_ppl: float
    vs_unquantized: Interval | None  # against the unquantized model in PyTorch on the same windows (in-run)
    simulated_ppl: float | None = None  # modelopt's simulation (a modelopt format), else None
    vs_simulated: Interval | None = None  # deployed / simulated - 1, paired over windows

    @property
    def disagrees(self) -> bool:
        """The deployment and the simulation differ beyond the windows' noise (the interval excludes 0)."""
        return self.vs_simulated is not None and (self.vs_simulated.lo > 0 or self.vs_simulated.hi < 0)


def _paired(windows: Windows | None, ref: Windows | None) -> Interval | None:
    if not windows or not ref:
        return None
    try:
        return stats.relative_change(windows, ref)
    except stats.WindowMismatch:
        return None


def engine_rows(rows: list[ReportRow]) -> list[EngineRow]:
    """Every run whose engine scored the windows itself: a modelopt format deployed (``perplexity_deployed``),
    a format only the engine has (its accuracy is the run's), or the unquantized model through the engine."""
    out = []
    for r in rows:
        run, m = r.run, r.run.metrics
        if "perplexity_deployed" in m:
            engine, sums, simulated = m["perplexity_deployed"], run.deployed_windows, m.get("perplexity")
        elif run.tags.get("accuracy_source", "").startswith("engine"):
            engine, sums, simulated = m["perplexity"], run.windows, None
        elif "engine_perplexity" in m and run.deployed_windows:
            engine, sums, simulated = m["engine_perplexity"], run.deployed_windows, None
        else:
            continue
        vs_simulated = _paired(sums, run.windows) if simulated is not None else None
        out.append(EngineRow(run, engine, _paired(sums, ref_windows(sums)), simulated, vs_simulated))
    return sorted(out, key=lambda e: (e.run.model, e.run.backend, e.run.qformat, e.run.calib_size or 0))
