"""Pair every run with its references (bf16 and fp8 on the same windows) and judge it.

The bf16 reference of a run is the latest finished unquantized run of the same model evaluated on the
same windows (equal ``model.*`` and window params; calibration does not touch it). The fp8 reference is
the fp8 run with the same calibration size and seed when there is one, else the fp8 run with the most
calibration samples. Each format's summary verdict is taken at its largest calibration size (the one a
user would deploy); the spread across calibration sizes is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gb10exp.report.collect import Collected, RunRow
from gb10exp.report.stats import Interval, WindowMismatch, point_only, ppl_interval, relative_change
from gb10exp.report.verdict import Verdict, verdict


@dataclass
class Comparison:
    """A run against one reference: the relative perplexity change and its verdict, or why there is none."""

    reference: RunRow | None = None
    change: Interval | None = None
    verdict: Verdict | None = None
    note: str = ""  # "reference" (the run is the reference), or why nothing was compared


@dataclass
class ReportRow:
    run: RunRow
    vs_bf16: Comparison
    vs_fp8: Comparison


@dataclass
class FormatSummary:
    """One format of one model: the verdict at its largest calibration size, and the calibration spread."""

    model: str
    qformat: str
    row: ReportRow  # the row the verdict is taken from
    calib_sizes: list[int] = field(default_factory=list)
    calib_spread: float | None = None  # max - min loss vs bf16 across calibration sizes


@dataclass
class NoiseFloor:
    """How small a loss this evaluation can resolve."""

    windows: int
    tokens: int
    # Paired CI half-widths vs bf16. Intervals widen with the loss itself (windows disagree more about a
    # large loss), so the narrowest one is the resolution near zero, where the 1% question lives.
    min_half_width: float | None
    min_run: str | None  # the run with the narrowest interval
    max_half_width: float | None
    bf16_ppl: Interval | None  # the baseline's own perplexity interval (unpaired): the text's variability


def _compare(row: RunRow, ref: RunRow | None, missing: str) -> Comparison:
    if ref is None:
        return Comparison(note=missing)
    if ref.run_id == row.run_id:
        return Comparison(reference=ref, note="reference")
    try:
        if row.windows and ref.windows:
            change = relative_change(row.windows, ref.windows)
        else:
            change = point_only(row.metrics["perplexity"], ref.metrics["perplexity"])
    except WindowMismatch as exc:
        return Comparison(reference=ref, note=f"windows differ ({exc})")
    return Comparison(ref, change, verdict(change))


def bf16_reference(row: RunRow, references: list[RunRow]) -> RunRow | None:
    if not row.quantized:
        return row
    same = [r for r in references if not r.quantized and r.window_key == row.window_key]
    return max(same, key=lambda r: r.start_time, default=None)


def fp8_reference(row: RunRow, references: list[RunRow]) -> RunRow | None:
    same = [r for r in references if r.quantized and r.qformat == "fp8" and r.window_key == row.window_key]
    if row.qformat == "fp8" and row.run_id in {r.run_id for r in same}:
        return row
    twin = [r for r in same if r.calib_size == row.calib_size and r.params.get("seed") == row.params.get("seed")]
    return max(twin or same, key=lambda r: (r.calib_size or 0, r.start_time), default=None)


def _order(row: RunRow) -> tuple:
    # bf16 first, then by deployed size (fp8, nvfp4 at 4.5 bits, int4 at 4.125), then calibration size.
    return (row.model, row.quantized, -row.metrics.get("weight_gib", 0.0), row.qformat, row.calib_size or 0)


def compare(collected: Collected) -> list[ReportRow]:
    """Every finished run of the selection with its two comparisons, in table order."""
    out = []
    for row in sorted(collected.rows, key=_order):
        vs_bf16 = _compare(row, bf16_reference(row, collected.references), "no bf16 run on the same windows")
        if not row.quantized:
            vs_fp8 = Comparison(note="")  # the baseline against fp8 says nothing about the claim
        else:
            vs_fp8 = _compare(row, fp8_reference(row, collected.references), "no fp8 run on the same windows")
        out.append(ReportRow(row, vs_bf16, vs_fp8))
    return out


def summarize(rows: list[ReportRow]) -> list[FormatSummary]:
    """Per model and quantized format: the verdict at the largest calibration size."""
    groups: dict[tuple[str, str], list[ReportRow]] = {}
    for r in rows:
        if r.run.quantized:
            groups.setdefault((r.run.model, r.run.qformat), []).append(r)
    out = []
    for (model, qformat), members in groups.items():
        chosen = max(members, key=lambda r: r.run.calib_size or 0)
        points = [r.vs_bf16.change.point for r in members if r.vs_bf16.change is not None]
        spread = max(points) - min(points) if len(points) > 1 else None
        out.append(FormatSummary(model, qformat, chosen, sorted(r.run.calib_size or 0 for r in members), spread))
    return out


def noise_floor(rows: list[ReportRow]) -> NoiseFloor | None:
    """The evaluation's resolution, from the paired intervals and the baseline's own interval."""
    widths = sorted((r.vs_bf16.change.half_width, r.run.name) for r in rows
                    if r.vs_bf16.change is not None and r.vs_bf16.change.has_ci)
    base = next((r.run for r in rows if not r.run.quantized), None)
    any_run = base or (rows[0].run if rows else None)
    if any_run is None:
        return None
    windows = any_run.windows or {}
    return NoiseFloor(
        windows=len(windows.get("tokens", [])),
        tokens=int(sum(windows.get("tokens", [])) or any_run.metrics.get("eval_tokens", 0)),
        min_half_width=widths[0][0] if widths else None,
        min_run=widths[0][1] if widths else None,
        max_half_width=widths[-1][0] if widths else None,
        bf16_ppl=ppl_interval(base.windows) if base is not None and base.windows else None,
    )
