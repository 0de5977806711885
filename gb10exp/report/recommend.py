"""Which quantization should I run on my device? A recommendation under a memory and speed budget: per
run, its loss vs bf16 (the interval its verdict used), KL, task scores, deployed weights, decode speed on
the device and the engines that serve its format natively there (``backends.support.native_engines``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

from gb10exp import hardware
from gb10exp.backends.support import native_engines
from gb10exp.config import ConfigError
from gb10exp.report import render
from gb10exp.report.compare import SEEDS_AND_WINDOWS, WINDOWS, ReportRow
from gb10exp.report.render import Block, attrs, ci, interval_json, number_cell, pct, speed_valid
from gb10exp.report.stats import Interval

PLOT_NAME = "pareto.png"
GIB = 2**30
WEIGHT, SPEED, NATIVE = "--max-weight-gib", "--min-decode-tokens-per-s", "native engine"
INTERVAL_OVER = {  # by Comparison.judged_by
    SEEDS_AND_WINDOWS: "95% interval over calibration seeds and evaluation windows",
    WINDOWS: "95% interval over evaluation windows",
}


@dataclass
class Constraints:
    max_weight_gib: float | None = None
    min_decode_tokens_per_s: float | None = None
    device: str = "gb10"

    def check(self) -> None:
        """One-line errors before any MLflow query."""
        for flag, value in ((WEIGHT, self.max_weight_gib), (SPEED, self.min_decode_tokens_per_s)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag}={value!r} is not allowed: give a positive number or leave it out")
        device_spec(self.device)


def device_spec(device: str) -> hardware.DeviceSpec:
    """The device table's row for ``--device`` (gb10exp/hardware.py)."""
    row = hardware.spec(device)
    if row is None:
        names = ", ".join(d.pattern for d in hardware.DEVICES)
        raise ConfigError(
            f"--device={device!r} is not allowed: its bandwidth and architecture are unknown; one of "
            f"{names} (add a row to DEVICES in gb10exp/hardware.py)"
        )
    return row


@dataclass
class Candidate:
    """One finished run as the recommendation sees it."""

    row: ReportRow
    loss: Interval | None  # perplexity change vs bf16: the interval its verdict used
    loss_basis: str  # "windows" | "seeds" | "exact" (the bf16 run itself) | ""
    speed: float | None
    speed_kind: str  # "measured" | "projected" | ""
    speed_note: str
    native: list[str] | None  # None: the run records no quant_algo (older runs)
    fails: list[str] = field(default_factory=list)  # the constraints it does not meet
    front_bytes: bool = False
    front_speed: bool = False

    @property
    def name(self) -> str:
        return self.row.run.name

    @property
    def reference(self) -> str:
        """Which bf16 reference."""
        return "itself" if self.loss_basis == "exact" else self.row.vs_bf16.label

    @property
    def kl(self) -> float | None:
        return self.row.run.metrics.get("kl_mean")

    @property
    def weight_gib(self) -> float | None:
        return self.row.run.metrics.get("weight_gib")

    @property
    def tasks(self) -> dict[str, float]:
        names = render.task_metric_names([self.row])
        return {k.removeprefix("task/"): v for k, v in self.row.run.metrics.items() if k in names}

    @property
    def label(self) -> str:
        run = self.row.run
        calib = f"/c{run.calib_size}" if run.calib_size else ""
        return run.qformat + calib + (f"/s{run.seed}" if run.seed not in ("0", "None") else "")


@dataclass
class Recommendation:
    constraints: Constraints
    device_name: str
    bandwidth_gbps: float
    arch: str
    candidates: list[Candidate]
    choice: Candidate | None
    reasons: list[str]
    uncertainty: str
    binding: list[str]  # when nothing meets the constraints: which bind, and by how much
    unscored: list[str]  # runs without a perplexity change vs bf16 (not placed on the front)


def _native(run, arch: str) -> list[str] | None:
    """Engines serving the run's format natively on ``arch`` (the support matrix row of its format, rebuilt
    from its params); None when the format's export is unknown."""
    row = run.fmt.row
    return None if row == "unknown" else list(native_engines(row, arch))


def _speed(row: ReportRow, device_name: str, bandwidth: float) -> tuple[float | None, str, str]:
    """Decode speed, "measured" or "projected", and how. Measured when the run's ``hardware``/``gpu`` tag
    names the device and its speed is valid (not fake-quantized). Else projected: on GB10, a run measured on
    another GPU gives ``gb10_projected_decode_tokens_per_s`` (the same fraction of the bandwidth bound);
    otherwise the bound itself, bandwidth / bytes per decode step (``decode_gib``:
    ``quant.bytes.decode_step_bytes``, batch 1, short context), an upper bound."""
    run, m = row.run, row.run.metrics
    where = run.tags.get("hardware") or run.tags.get("gpu") or ""
    valid = speed_valid(run)
    if valid and "decode_tokens_per_s" in m and device_name.lower() in where.lower():
        return m["decode_tokens_per_s"], "measured", f"measured on {where}"
    if valid and device_name == "GB10" and "gb10_projected_decode_tokens_per_s" in m:
        how = f"from {where or 'another device'}: its fraction of the bandwidth bound at GB10's bandwidth"
        return m["gb10_projected_decode_tokens_per_s"], "projected", f"projected {how}"
    if step := m.get("decode_gib"):
        how = f"{step:.3f} GiB read per decode step (an upper bound, batch 1, short context)"
        speed = bandwidth * 1e9 / (step * GIB)
        return speed, "projected", f"projected: bandwidth bound {bandwidth:.0f} GB/s / {how}"
    return None, "", "no speed: no measurement, and the run predates the decode_gib metric"


def candidates(rows: list[ReportRow], c: Constraints) -> tuple[list[Candidate], hardware.DeviceSpec]:
    spec = device_spec(c.device)
    out = []
    for row in rows:
        comp, speed = row.vs_bf16, _speed(row, spec.pattern, spec.peak_gbps)
        exact = comp.note == "reference"
        loss, basis = (Interval(0.0, 0.0, 0.0), "exact") if exact else (comp.judged, comp.judged_by)
        cand = Candidate(row, loss, basis, *speed, _native(row.run, spec.arch))
        cand.fails = _fails(cand, c)
        out.append(cand)
    return out, spec


def _fails(cand: Candidate, c: Constraints) -> list[str]:
    weight, speed = c.max_weight_gib, c.min_decode_tokens_per_s
    failed = {
        WEIGHT: weight is not None and (cand.weight_gib is None or cand.weight_gib > weight),
        SPEED: speed is not None and (cand.speed is None or cand.speed < speed),
        NATIVE: cand.native is not None and not cand.native,
    }
    return [flag for flag, fails in failed.items() if fails]


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point dominates (both coordinates minimized)."""
    return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


def _mark_fronts(cands: list[Candidate]) -> None:
    by_bytes = [x for x in cands if x.loss is not None and x.weight_gib is not None]
    for x, on in zip(by_bytes, pareto([(x.weight_gib, x.loss.point) for x in by_bytes]), strict=True):
        x.front_bytes = on
    by_speed = [x for x in cands if x.loss is not None and x.speed is not None]
    for x, on in zip(by_speed, pareto([(-x.speed, x.loss.point) for x in by_speed]), strict=True):
        x.front_speed = on


def _interval_text(x: Candidate) -> str:
    if x.loss is None:
        return "–"
    if x.loss_basis == "exact":
        return "0 (the bf16 reference itself)"
    if not x.loss.has_ci:
        return f"{pct(x.loss.point)} (point estimate, no interval)"
    return f"{ci(x.loss)} ({INTERVAL_OVER.get(x.loss_basis, '')})"


def _binding(scored: list[Candidate], c: Constraints) -> list[str]:
    active = sorted({f for x in scored for f in x.fails})
    out = []
    for flag in active:
        admitted = [x for x in scored if x.fails == [flag]]
        if not admitted:
            continue
        best = min(admitted, key=lambda x: (x.loss.point, x.weight_gib or math.inf))
        if flag == WEIGHT:
            smallest = min(admitted, key=lambda x: x.weight_gib if x.weight_gib is not None else math.inf)
            need = (
                f"{WEIGHT} binds: {len(admitted)} run(s) meet every other constraint but weigh more than "
                f"{c.max_weight_gib:g} GiB; the best of them, {best.name}, needs {best.weight_gib or math.nan:.3f} "
                f"GiB, the smallest, {smallest.name}, {smallest.weight_gib or math.nan:.3f} GiB"
            )
        elif flag == SPEED:
            fastest = max(admitted, key=lambda x: x.speed or 0)
            need = (
                f"{SPEED} binds: the runs meeting every other constraint decode at most "
                f"{fastest.speed or 0:.1f} tokens/s ({fastest.name}, {fastest.speed_kind}) against the required "
                f"{c.min_decode_tokens_per_s:g}; the best of them, {best.name}, gives {best.speed or 0:.1f}"
            )
        else:
            need = (
                f"{NATIVE} on {c.device} binds: {', '.join(x.name for x in admitted)} meet(s) the budget but no "
                "engine serves the format natively there"
            )
        out.append(need)
    if not out and scored:
        counts = ", ".join(
            f"{flag}: {sum(flag in x.fails for x in scored)} of {len(scored)} runs fail it" for flag in active
        )
        out.append(f"no single constraint binds: every run fails at least two ({counts})")
    return out


def recommend(rows: list[ReportRow], c: Constraints) -> Recommendation:
    """The candidates, their Pareto fronts, and the choice: the smallest loss among the runs meeting every
    constraint (ties: the smaller), naming those whose intervals overlap it as indistinguishable. When none
    meets them, the binding constraint is the one whose relaxation alone would admit a run, with the value
    it would need."""
    c.check()
    cands, spec = candidates(rows, c)
    setting = (c, spec.pattern, spec.peak_gbps, spec.arch)  # the fields every Recommendation starts with
    _mark_fronts(cands)
    scored = [x for x in cands if x.loss is not None]
    unscored = [
        f"{x.name}: {x.row.vs_bf16.note or 'no perplexity change vs bf16'}" for x in cands if x.loss is None
    ]
    ok = [x for x in scored if not x.fails]
    if not ok:
        return Recommendation(*setting, cands, None, [], "", _binding(scored, c), unscored)
    choice = min(ok, key=lambda x: (x.loss.point, x.weight_gib or math.inf))
    reasons = [
        f"smallest perplexity loss vs bf16 among the {len(ok)} of {len(scored)} runs that meet every "
        f"constraint: {_interval_text(choice)}, reference: {choice.reference}"
    ]
    if choice.weight_gib is not None:
        limit = f" (limit {c.max_weight_gib:g})" if c.max_weight_gib is not None else ""
        reasons.append(f"weights {choice.weight_gib:.3f} GiB{limit}")
    if choice.speed is not None:
        limit = f" (required {c.min_decode_tokens_per_s:g})" if c.min_decode_tokens_per_s is not None else ""
        reasons.append(f"decode {choice.speed:.1f} tokens/s{limit}, {choice.speed_note}")
    if choice.native is None:
        reasons.append("native engine support unknown (the format's export is unknown)")
    else:
        reasons.append(f"served natively on {c.device} ({spec.arch}) by {', '.join(choice.native)}")
    if choice.kl is not None:
        reasons.append(f"KL {choice.kl:.4f} nats/token")
    reasons += [f"{k} {v:.3f}" for k, v in choice.tasks.items()]
    return Recommendation(*setting, cands, choice, reasons, _uncertainty(choice, ok), [], unscored)


def _overlap(a: Interval, b: Interval) -> bool:
    return a.lo <= b.hi and b.lo <= a.hi


def _uncertainty(choice: Candidate, ok: list[Candidate]) -> str:
    text = f"Loss {_interval_text(choice)}."
    if choice.loss is not None and choice.loss_basis != "exact" and not choice.loss.has_ci:
        text += " Without per-window results there is no interval: treat the ranking as provisional."
    close = [x for x in ok if x is not choice and x.loss is not None and _overlap(x.loss, choice.loss)]
    if close:
        names = "; ".join(f"{x.name} ({_interval_text(x)}, {x.weight_gib or 0:.3f} GiB)" for x in close)
        text += (
            f" Not distinguishable on this evaluation from: {names}; a smaller or faster one among them "
            "costs nothing measurable here."
        )
    else:
        text += " Its interval does not overlap any other run that meets the constraints."
    if choice.speed_kind == "projected":
        text += " Its speed is projected, not measured on this device."
    return text


def as_json(rec: Recommendation) -> dict[str, Any]:
    return {
        "constraints": {
            **attrs(rec.constraints, "max_weight_gib", "min_decode_tokens_per_s", "device"),
            **attrs(rec, "device_name", "bandwidth_gbps", "arch"),
        },
        "choice": rec.choice and {"run_id": rec.choice.row.run.run_id, "name": rec.choice.name},
        **attrs(rec, "reasons", "uncertainty", "binding", "unscored"),
        "runs": [
            {
                **attrs(x.row.run, "run_id", "name", "qformat", "calib_size", "seed"),
                "loss": interval_json(x.loss),
                **attrs(x, "loss_basis", "reference"),
                "kl_mean": x.kl,
                **attrs(x, "tasks", "weight_gib"),
                "decode_tokens_per_s": x.speed,
                **attrs(x, "speed_kind", "speed_note"),
                "native_engines": x.native,
                "fails": x.fails,
                "pareto_bytes": x.front_bytes,
                "pareto_speed": x.front_speed,
            }
            for x in rec.candidates
        ],
    }


def _cells(x: Candidate, tasks: bool) -> tuple[str, ...]:
    """One run's row of the recommendation table."""
    cells = [x.name, _interval_text(x), number_cell(x.kl, "{:.4f}")]
    cells += [", ".join(f"{k} {v:.3f}" for k, v in x.tasks.items()) or "–"] if tasks else []
    cells += [
        number_cell(x.weight_gib, "{:.3f}"),
        "–" if x.speed is None else f"{x.speed:.1f} ({x.speed_kind})",
    ]
    cells.append("unknown" if x.native is None else (", ".join(x.native) or "none"))
    cells.append("/".join(("yes" if f else "no") for f in (x.front_bytes, x.front_speed)) if x.loss else "–")
    return (*cells, ", ".join(x.fails) or "–")


def blocks(rec: Recommendation, plot_name: str | None) -> list[Block]:
    c = rec.constraints
    budget = ((WEIGHT, c.max_weight_gib), (SPEED, c.min_decode_tokens_per_s))
    limits = [f"{flag} {v:g}" for flag, v in budget if v is not None]
    limits.append(f"--device {c.device} ({rec.device_name}, {rec.bandwidth_gbps:.0f} GB/s, {rec.arch})")
    out = [Block("h2", "Recommendation"), Block("p", "Constraints: " + ", ".join(limits) + ".")]
    if rec.choice is not None:
        run = rec.choice.row.run
        calib = f", calib {run.calib_size}" if run.calib_size else ""
        why = f"**Run {rec.choice.name}** ({run.qformat}{calib}). Why: " + "; ".join(rec.reasons) + "."
        out += [Block("p", why), Block("p", "Uncertainty: " + rec.uncertainty)]
    else:
        out.append(Block("p", "**No run meets the constraints.** " + " ".join(b + "." for b in rec.binding)))
    tasks = any(x.tasks for x in rec.candidates)  # task scores only when some run has them
    headers = ("run", "loss vs bf16 (interval used)", "KL", *(("tasks",) if tasks else ()), "weights GiB")
    headers += ("decode tok/s", "native engines", "Pareto (bytes / speed)", "fails")
    out.append(Block("table", headers=headers, rows=tuple(_cells(x, tasks) for x in rec.candidates)))
    if any(x.speed_kind == "projected" for x in rec.candidates):
        text = (
            f"Speeds labelled projected were not measured on {rec.device_name}: a run measured on "
            "another GPU keeps the fraction of the bandwidth bound it achieved there (GB10 only); "
            f"otherwise the bound itself, {rec.bandwidth_gbps:.0f} GB/s / weight bytes at batch 1, "
            "which no engine reaches (expect 60-85% of it)."
        )
        out.append(Block("p", text))
    if rec.unscored:
        out.append(Block("p", "Not placed (no perplexity change vs bf16): " + "; ".join(rec.unscored) + "."))
    if plot_name:
        alt = "Pareto front: quality loss against weight bytes and decode speed"
        out.append(Block("img", plot_name, alt=alt))
    return out


def _front_panel(ax, cands, attr: str, front_attr: str, xlabel: str, limit, choice, symlog: bool) -> None:
    """Loss against the candidates' ``attr`` (``weight_gib`` or ``speed``); ``front_attr`` marks the front."""
    x_of, on_front = attrgetter(attr), attrgetter(front_attr)
    shown = [x for x in cands if x.loss is not None and x_of(x) is not None]
    for x in shown:
        lo, hi = (x.loss.point - x.loss.lo) * 100, (x.loss.hi - x.loss.point) * 100
        at, front = (x_of(x), x.loss.point * 100), on_front(x)
        hollow = attr == "speed" and x.speed_kind == "projected"
        ax.errorbar(
            [at[0]],
            [at[1]],
            yerr=[[lo], [hi]],
            fmt="o",
            capsize=3,
            alpha=0.9,
            markersize=9 if front else 6,
            color="tab:blue" if front else "grey",
            markerfacecolor="white" if hollow else None,
            zorder=3 if front else 2,
        )
        tag = f" (fails: {', '.join(x.fails)})" if x.fails else ""
        ax.annotate(x.label + tag, at, textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = sorted((x for x in shown if on_front(x)), key=x_of)
    if len(front) > 1:
        xs, ys = [x_of(x) for x in front], [x.loss.point * 100 for x in front]
        ax.plot(xs, ys, color="tab:blue", linewidth=1.5, label="Pareto front")
    if choice is not None and x_of(choice) is not None and choice.loss is not None:
        star = {"marker": "*", "markersize": 18, "color": "gold", "markeredgecolor": "black", "zorder": 4}
        ax.plot(
            [x_of(choice)], [choice.loss.point * 100], linestyle="", label=f"choice: {choice.label}", **star
        )
    if limit is not None:
        ax.axvline(limit, color="crimson", linestyle="--", linewidth=1, label="constraint")
    if symlog:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity increase vs bf16 (%)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def plot(rec: Recommendation, title: str, path: Path) -> Path | None:
    """Quality loss against weight bytes and against decode speed; the fronts highlighted, the choice starred."""
    placed = [x for x in rec.candidates if x.loss is not None]
    if not placed:
        return None
    symlog = max((abs(v) for x in placed for v in (x.loss.lo, x.loss.hi)), default=0) > 0.2
    speed_label = f"decode tokens/s on {rec.device_name} (hollow: projected)"
    panels = [
        ("weight_gib", "front_bytes", "weights (GiB, deployed bytes)", rec.constraints.max_weight_gib),
        ("speed", "front_speed", speed_label, rec.constraints.min_decode_tokens_per_s),
    ]
    with render.figure(title, path, 2, (14, 5)) as axes:
        for ax, panel in zip(axes, panels, strict=True):
            _front_panel(ax, placed, *panel, rec.choice, symlog)
    return path
