"""Which quantization should I run on my device? A recommendation under a memory and speed budget.

For every finished run of the report (one point per run): quality (perplexity change against bf16 with the
interval its verdict used, over evaluation windows and calibration seeds; KL; task scores when present),
deployed weight bytes (``weight_gib``), decode speed on the chosen device, and whether an engine serves the
format natively there (``gb10exp.backends.support.native_engines``).

Decode speed is *measured* when a run's ``hardware``/``gpu`` tag names the device and its speed is valid
(not a fake-quantized model). Otherwise it is *projected*: for GB10, a run measured on another GPU gives
``gb10_projected_decode_tokens_per_s`` (the same fraction of the bandwidth bound, with GB10's bandwidth);
without a measurement, the bandwidth bound itself (device bandwidth / the deployed format's bytes per
decode step, metric ``decode_gib``: ``gb10exp.quant.bytes.decode_step_bytes``, batch 1, short context), an
upper bound. Both are labelled "projected".

The choice is the run with the smallest perplexity loss among those that meet every constraint (ties: the
smaller one); runs whose loss intervals overlap the choice's are named as statistically indistinguishable.
When no run meets the constraints, the constraint that binds is the one whose relaxation alone would admit
a run, with the value it would need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gb10exp import hardware
from gb10exp.backends.support import native_engines
from gb10exp.config import ConfigError
from gb10exp.report import render
from gb10exp.report.compare import ReportRow
from gb10exp.report.render import Block, pct
from gb10exp.report.stats import Interval

PLOT_NAME = "pareto.png"
GIB = 2**30
WEIGHT, SPEED, NATIVE = "--max-weight-gib", "--min-decode-tokens-per-s", "native engine"

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
        raise ConfigError(f"--device={device!r} is not allowed: its bandwidth and architecture are unknown; one of "
                          f"{names} (add a row to DEVICES in gb10exp/hardware.py)")
    return row


@dataclass
class Candidate:
    """One finished run as the recommendation sees it."""

    row: ReportRow
    loss: Interval | None  # perplexity change vs bf16: the interval its verdict used
    loss_basis: str  # "windows" | "seeds" | "exact" (the bf16 run itself) | ""
    reference: str  # which bf16 reference
    kl: float | None
    tasks: dict[str, float]
    weight_gib: float | None
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
    def label(self) -> str:
        run = self.row.run
        return (
            run.qformat
            + (f"/c{run.calib_size}" if run.calib_size else "")
            + (f"/s{run.seed}" if run.seed not in ("0", "None") else "")
        )


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
    run, m = row.run, row.run.metrics
    where = run.tags.get("hardware") or run.tags.get("gpu") or ""
    valid = run.tags.get("speed_valid", "true") != "false"
    if valid and "decode_tokens_per_s" in m and device_name.lower() in where.lower():
        return m["decode_tokens_per_s"], "measured", f"measured on {where}"
    if valid and device_name == "GB10" and "gb10_projected_decode_tokens_per_s" in m:
        return (
            m["gb10_projected_decode_tokens_per_s"],
            "projected",
            f"projected from {where or 'another device'}: its fraction of the bandwidth bound at GB10's bandwidth",
        )
    if step := m.get("decode_gib"):
        return (
            bandwidth * 1e9 / (step * GIB),
            "projected",
            f"projected: bandwidth bound {bandwidth:.0f} GB/s / {step:.3f} GiB read per decode step (an upper "
            "bound, batch 1, short context)",
        )
    return None, "", "no speed: no measurement, and the run predates the decode_gib metric"


def candidates(rows: list[ReportRow], c: Constraints) -> tuple[list[Candidate], str, float, str]:
    spec = device_spec(c.device)
    device_name, bandwidth, arch = spec.pattern, spec.peak_gbps, spec.arch
    out = []
    for row in rows:
        run, comp = row.run, row.vs_bf16
        if comp.note == "reference":
            loss, basis = Interval(0.0, 0.0, 0.0), "exact"
        else:
            loss, basis = comp.judged, comp.judged_by
        weight = run.metrics.get("weight_gib")
        speed, kind, note = _speed(row, device_name, bandwidth)
        tasks = {
            k.removeprefix("task/"): v for k, v in run.metrics.items() if k in render.task_metric_names([row])
        }
        cand = Candidate(
            row,
            loss,
            basis,
            "itself" if basis == "exact" else comp.label,
            run.metrics.get("kl_mean"),
            tasks,
            weight,
            speed,
            kind,
            note,
            _native(run, arch),
        )
        cand.fails = _fails(cand, c)
        out.append(cand)
    return out, device_name, bandwidth, arch


def _fails(cand: Candidate, c: Constraints) -> list[str]:
    fails = []
    if c.max_weight_gib is not None and (cand.weight_gib is None or cand.weight_gib > c.max_weight_gib):
        fails.append(WEIGHT)
    if c.min_decode_tokens_per_s is not None and (
        cand.speed is None or cand.speed < c.min_decode_tokens_per_s
    ):
        fails.append(SPEED)
    if cand.native is not None and not cand.native:
        fails.append(NATIVE)
    return fails


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
    how = {
        "seeds and windows": "95% interval over calibration seeds and evaluation windows",
        "windows": "95% interval over evaluation windows",
    }.get(x.loss_basis, "")
    if not x.loss.has_ci:
        return f"{pct(x.loss.point)} (point estimate, no interval)"
    return f"{pct(x.loss.point)} [{x.loss.lo * 100:+.2f}, {x.loss.hi * 100:+.2f}] ({how})"


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
    """The candidates, their Pareto fronts, and one choice (or why there is none)."""
    c.check()
    cands, device_name, bandwidth, arch = candidates(rows, c)
    _mark_fronts(cands)
    scored = [x for x in cands if x.loss is not None]
    unscored = [
        f"{x.name}: {x.row.vs_bf16.note or 'no perplexity change vs bf16'}" for x in cands if x.loss is None
    ]
    ok = [x for x in scored if not x.fails]
    if not ok:
        return Recommendation(
            c, device_name, bandwidth, arch, cands, None, [], "", _binding(scored, c), unscored
        )
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
        reasons.append(f"served natively on {c.device} ({arch}) by {', '.join(choice.native)}")
    if choice.kl is not None:
        reasons.append(f"KL {choice.kl:.4f} nats/token")
    reasons += [f"{k} {v:.3f}" for k, v in choice.tasks.items()]
    uncertainty = _uncertainty(choice, ok)
    return Recommendation(c, device_name, bandwidth, arch, cands, choice, reasons, uncertainty, [], unscored)


def _uncertainty(choice: Candidate, ok: list[Candidate]) -> str:
    text = f"Loss {_interval_text(choice)}."
    if choice.loss is not None and choice.loss_basis != "exact" and not choice.loss.has_ci:
        text += " Without per-window results there is no interval: treat the ranking as provisional."
    close = [
        x
        for x in ok
        if x is not choice
        and x.loss is not None
        and x.loss.lo <= choice.loss.hi
        and choice.loss.lo <= x.loss.hi
    ]
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
    def interval(i: Interval | None) -> dict | None:
        return None if i is None else {"point": i.point, "lo": i.lo, "hi": i.hi, "has_ci": i.has_ci}

    return {
        "constraints": {
            "max_weight_gib": rec.constraints.max_weight_gib,
            "min_decode_tokens_per_s": rec.constraints.min_decode_tokens_per_s,
            "device": rec.constraints.device,
            "device_name": rec.device_name,
            "bandwidth_gbps": rec.bandwidth_gbps,
            "arch": rec.arch,
        },
        "choice": None
        if rec.choice is None
        else {"run_id": rec.choice.row.run.run_id, "name": rec.choice.name},
        "reasons": rec.reasons,
        "uncertainty": rec.uncertainty,
        "binding": rec.binding,
        "unscored": rec.unscored,
        "runs": [
            {
                "run_id": x.row.run.run_id,
                "name": x.name,
                "qformat": x.row.run.qformat,
                "calib_size": x.row.run.calib_size,
                "seed": x.row.run.seed,
                "loss": interval(x.loss),
                "loss_basis": x.loss_basis,
                "reference": x.reference,
                "kl_mean": x.kl,
                "tasks": x.tasks,
                "weight_gib": x.weight_gib,
                "decode_tokens_per_s": x.speed,
                "speed_kind": x.speed_kind,
                "speed_note": x.speed_note,
                "native_engines": x.native,
                "fails": x.fails,
                "pareto_bytes": x.front_bytes,
                "pareto_speed": x.front_speed,
            }
            for x in rec.candidates
        ],
    }


def blocks(rec: Recommendation, plot_name: str | None) -> list[Block]:
    c = rec.constraints
    limits = [
        f"{WEIGHT} {c.max_weight_gib:g}" if c.max_weight_gib is not None else None,
        f"{SPEED} {c.min_decode_tokens_per_s:g}" if c.min_decode_tokens_per_s is not None else None,
        f"--device {c.device} ({rec.device_name}, {rec.bandwidth_gbps:.0f} GB/s, {rec.arch})",
    ]
    out = [
        Block("h2", "Recommendation"),
        Block("p", "Constraints: " + ", ".join(x for x in limits if x) + "."),
    ]
    if rec.choice is not None:
        out.append(
            Block(
                "p",
                f"**Run {rec.choice.name}** ({rec.choice.row.run.qformat}"
                f"{f', calib {rec.choice.row.run.calib_size}' if rec.choice.row.run.calib_size else ''}). "
                "Why: " + "; ".join(rec.reasons) + ".",
            )
        )
        out.append(Block("p", "Uncertainty: " + rec.uncertainty))
    else:
        out.append(Block("p", "**No run meets the constraints.** " + " ".join(b + "." for b in rec.binding)))
    headers = (
        "run",
        "loss vs bf16 (interval used)",
        "KL",
        "weights GiB",
        "decode tok/s",
        "native engines",
        "Pareto (bytes / speed)",
        "fails",
    )
    if any(x.tasks for x in rec.candidates):  # task scores only when some run has them
        headers = headers[:3] + ("tasks",) + headers[3:]
    body = []
    for x in rec.candidates:
        speed = "–" if x.speed is None else f"{x.speed:.1f} ({x.speed_kind})"
        native = "unknown" if x.native is None else (", ".join(x.native) or "none")
        front = "/".join(("yes" if f else "no") for f in (x.front_bytes, x.front_speed)) if x.loss else "–"
        body.append(
            (
                x.name,
                _interval_text(x),
                "–" if x.kl is None else f"{x.kl:.4f}",
                *(
                    (", ".join(f"{k} {v:.3f}" for k, v in x.tasks.items()) or "–",)
                    if "tasks" in headers
                    else ()
                ),
                "–" if x.weight_gib is None else f"{x.weight_gib:.3f}",
                speed,
                native,
                front,
                ", ".join(x.fails) or "–",
            )
        )
    out.append(Block("table", headers=headers, rows=tuple(body)))
    if any(x.speed_kind == "projected" for x in rec.candidates):
        out.append(
            Block(
                "p",
                f"Speeds labelled projected were not measured on {rec.device_name}: a run measured on "
                "another GPU keeps the fraction of the bandwidth bound it achieved there (GB10 only); "
                f"otherwise the bound itself, {rec.bandwidth_gbps:.0f} GB/s / weight bytes at batch 1, "
                "which no engine reaches (expect 60-85% of it).",
            )
        )
    if rec.unscored:
        out.append(Block("p", "Not placed (no perplexity change vs bf16): " + "; ".join(rec.unscored) + "."))
    if plot_name:
        out.append(
            Block("img", plot_name, alt="Pareto front: quality loss against weight bytes and decode speed")
        )
    return out


def _front_panel(
    ax,
    cands: list[Candidate],
    x_of,
    on_front,
    xlabel: str,
    limit: float | None,
    choice,
    symlog: bool,
    speed_axis: bool,
) -> None:
    shown = [x for x in cands if x.loss is not None and x_of(x) is not None]
    for x in shown:
        lo, hi = (x.loss.point - x.loss.lo) * 100, (x.loss.hi - x.loss.point) * 100
        front = on_front(x)
        hollow = speed_axis and x.speed_kind == "projected"
        ax.errorbar(
            [x_of(x)],
            [x.loss.point * 100],
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
        ax.annotate(
            x.label + tag,
            (x_of(x), x.loss.point * 100),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    front = sorted((x for x in shown if on_front(x)), key=x_of)
    if len(front) > 1:
        ax.plot(
            [x_of(x) for x in front],
            [x.loss.point * 100 for x in front],
            color="tab:blue",
            linewidth=1.5,
            label="Pareto front",
        )
    if choice is not None and x_of(choice) is not None and choice.loss is not None:
        ax.plot(
            [x_of(choice)],
            [choice.loss.point * 100],
            marker="*",
            markersize=18,
            color="gold",
            markeredgecolor="black",
            linestyle="",
            zorder=4,
            label=f"choice: {choice.label}",
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [x for x in rec.candidates if x.loss is not None]
    if not placed:
        return None
    symlog = max((abs(v) for x in placed for v in (x.loss.lo, x.loss.hi)), default=0) > 0.2
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    _front_panel(
        axes[0],
        placed,
        lambda x: x.weight_gib,
        lambda x: x.front_bytes,
        "weights (GiB, deployed bytes)",
        rec.constraints.max_weight_gib,
        rec.choice,
        symlog,
        False,
    )
    _front_panel(
        axes[1],
        placed,
        lambda x: x.speed,
        lambda x: x.front_speed,
        f"decode tokens/s on {rec.device_name} (hollow: projected)",
        rec.constraints.min_decode_tokens_per_s,
        rec.choice,
        symlog,
        True,
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
