"""The report as a document (headings, paragraphs, tables, an image) rendered to Markdown and HTML, and
the plot of loss against model size (and against tokens/s where it was measured) as a PNG.
"""

from __future__ import annotations

import base64
import contextlib
import html
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gb10exp.report.collect import Collected, RunRow
from gb10exp.report.compare import (
    SEEDS_AND_WINDOWS,
    Comparison,
    EngineRow,
    FormatSummary,
    ReportRow,
    Resolution,
)
from gb10exp.report.stats import BOOTSTRAP_RESAMPLES, RESOLVE, Interval
from gb10exp.report.verdict import THRESHOLD, Verdict

# Optional metrics: a column appears only when some run has the metric. (metric, header, format)
OPTIONAL_COLUMNS = [
    ("ttft_s", "TTFT s", "{:.3f}"),
    ("decode_tokens_per_s", "tok/s", "{:.1f}"),
    ("roofline_fraction", "roofline", "{:.0%}"),  # achieved / bandwidth-bound decode rate
]
ID_HEADERS = ("model", "format", "calib")  # the cells of ``_id_cells``
ENGINE_COLUMNS = [("kl_mean", "KL nats/tok", "{:.4f}"), ("top1_agreement", "top-1 agree", "{:.3f}")]
ENGINE_COLUMNS += [("engine_weight_gib", "engine GiB", "{:.3f}"), *OPTIONAL_COLUMNS]


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | img
    text: str = ""
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    alt: str = "loss against model size"  # an image's alternative text


def attrs(obj: Any, *names: str) -> dict[str, Any]:
    """``obj``'s attributes ``names`` as a dict, for the JSON files."""
    return {n: getattr(obj, n) for n in names}


def interval_json(i: Interval | None) -> dict[str, Any] | None:
    return None if i is None else attrs(i, "point", "lo", "hi", "has_ci")


def pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x * 100:+.{digits}f}%"


def ci(i: Interval) -> str:
    """``+1.23% [+0.50, +1.96]``: the point and the interval's ends, in percent."""
    return f"{pct(i.point)} [{i.lo * 100:+.2f}, {i.hi * 100:+.2f}]"


def change_cell(c: Comparison) -> str:
    if c.change is None:
        return c.note or "–"
    return ci(c.change) if c.change.has_ci else f"{pct(c.change.point)} (no CI)"


def judged_cell(c: Comparison) -> str:
    """The interval the verdict used: the run's own, or its recipe's over several seeds."""
    if c.judged_by != SEEDS_AND_WINDOWS or c.recipe is None:
        return change_cell(c)
    return f"{ci(c.judged)} (mean of {c.recipe.seeds} seeds)"


def verdict_cell(c: Comparison) -> str:
    if c.verdict is None:
        return "–"
    label = {Verdict.PASS: "pass", Verdict.FAIL: "**fail**", Verdict.INCONCLUSIVE: "inconclusive"}[c.verdict]
    if c.judged_by == SEEDS_AND_WINDOWS:
        return f"{label} (seeds and windows)"
    return label if c.change is None or c.change.has_ci else f"{label} (point estimate)"


def detectable_cell(c: Comparison) -> str:
    """The smallest loss the comparison tells apart from zero, and whether its own loss is below it."""
    if c.recipe is None:
        return "–"
    text = f"{c.recipe.detectable * 100:.2f}%"
    return f"{text}: cannot tell {pct(c.judged.point)} from 0 at this size" if c.recipe.cannot_tell else text


def windows_needed_cell(c: Comparison, half_width: float = RESOLVE) -> str:
    """Windows that would resolve ±``half_width`` at this loss, or why no number of windows would."""
    if c.recipe is None:
        return "–"
    needed, have = c.recipe.windows_needed(half_width), c.recipe.windows
    if needed is None:
        return (
            f"none: the seed term alone is ±{c.recipe.seed_half_width * 100:.2f} pp with "
            f"{c.recipe.seeds} seeds; more seeds"
        )
    if (
        needed <= have
    ):  # fewer windows would do, but a bootstrap over a handful of windows is not one to trust
        return f"enough (±{c.recipe.interval.half_width * 100:.2f} pp with {have:,})"
    return f"{needed:,} (have {have:,})"


def seed_cell(c: Comparison, seeds: list[str] | None = None) -> str:
    if c.seed_spread is None:
        return "–"
    return ci(c.seed_spread) + (f", seeds {', '.join(seeds)}" if seeds else "")


def reference_cell(r: ReportRow) -> str:
    """Which reference each verdict used, and how it was matched."""
    parts = [
        f"{name}: {c.label}"
        for name, c in (("bf16", r.vs_bf16), ("fp8", r.vs_fp8))
        if c.label and c.note != "reference"
    ]
    return "; ".join(parts) or "–"


def number_cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def speed_valid(run: RunRow) -> bool:
    """Throughput of a fake-quantized model on the hf backend is not the format's speed."""
    return run.tags.get("speed_valid", "true") != "false"


def task_metric_names(rows: list[ReportRow]) -> list[str]:
    """The lm-eval accuracy metrics present (``task/<name>/acc``, ``acc_norm``, ...), sorted."""
    names = {k for r in rows for k in r.run.metrics if k.startswith("task/")}
    return sorted(n for n in names if not n.endswith(("_stderr", "/sample_len")))


def _task_cell(run: RunRow, name: str) -> str:
    value = run.metrics.get(name)
    if value is None:
        return "–"
    metric, _, suffix = name.rpartition("/")
    stderr = run.metrics.get(f"{metric}/{suffix}_stderr")
    return f"{value:.3f}" + (f" ±{stderr:.3f}" if stderr is not None else "")


def _id_cells(run: RunRow) -> tuple[str, str, str]:
    return run.model, run.qformat, str(run.calib_size or "–")


def runs_table(rows: list[ReportRow]) -> Block:
    tasks = task_metric_names(rows)
    optional = [c for c in OPTIONAL_COLUMNS if any(c[0] in r.run.metrics for r in rows)]
    seeds = ["seed"] if len({r.run.seed for r in rows}) > 1 else []
    headers = [*ID_HEADERS, *seeds, "perplexity", "vs bf16 [95% CI]", "vs fp8 [95% CI]", "KL nats/tok"]
    headers += ["top-1 agree", *(t.removeprefix("task/") for t in tasks), "weights GiB"]
    headers += [h for _, h, _ in optional] + ["reference used"]
    body = []
    for r in rows:
        m, seed = r.run.metrics, [r.run.seed] if seeds else []
        cells = [*_id_cells(r.run), *seed, number_cell(m.get("perplexity"), "{:.3f}"), change_cell(r.vs_bf16)]
        cells += [change_cell(r.vs_fp8), number_cell(m.get("kl_mean"), "{:.4f}")]
        cells += [number_cell(m.get("top1_agreement"), "{:.3f}"), *(_task_cell(r.run, t) for t in tasks)]
        cells.append(number_cell(m.get("weight_gib"), "{:.3f}"))
        for key, _, fmt in optional:
            cell = number_cell(m.get(key), fmt)
            cells.append(cell if speed_valid(r.run) or cell == "–" else f"{cell} (fake quant)")
        body.append((*cells, reference_cell(r)))
    return Block("table", headers=tuple(headers), rows=tuple(body))


def _interval_cell(i: Interval | None) -> str:
    return "–" if i is None else f"{pct(i.point)} [{pct(i.lo)}, {pct(i.hi)}]"


def engine_blocks(engine: list[EngineRow]) -> list[Block]:
    """Accuracy from the engine's own kernels beside its speed, one row per run it scored; for a modelopt
    format, its deployment against modelopt's simulation on the same windows, and a line for each pair that
    disagrees beyond noise."""
    if not engine:
        return []
    headers = ("model", "engine", "format", "calib", "perplexity (engine)", "vs 16-bit in PyTorch [95% CI]")
    headers += ("simulated (modelopt)", "deployed vs simulated [95% CI]", *(h for _, h, _ in ENGINE_COLUMNS))
    body = []
    for e in engine:
        run, m = e.run, e.run.metrics
        # A deployed modelopt format's KL and top-1 are the engine's own.
        own = "_deployed" if "perplexity_deployed" in m else ""
        keys = [f"kl_mean{own}", f"top1_agreement{own}"] + [k for k, _, _ in ENGINE_COLUMNS[2:]]
        ppl = [number_cell(e.engine_ppl, "{:.3f}"), _interval_cell(e.vs_unquantized)]
        ppl += [number_cell(e.simulated_ppl, "{:.3f}"), _interval_cell(e.vs_simulated)]
        metrics = [number_cell(m.get(k), fmt) for k, (_, _, fmt) in zip(keys, ENGINE_COLUMNS, strict=True)]
        body.append((run.model, run.backend, run.qformat, str(run.calib_size or "–"), *ppl, *metrics))
    text = (
        "Each engine scored the evaluation windows with its own kernels (llama.cpp's logits), against the "
        "unquantized model in PyTorch on the same tokens. A modelopt format is measured twice: modelopt's "
        "simulation in PyTorch (the runs table's headline) and the checkpoint deployed in the engine; the "
        "interval is a paired bootstrap over windows. Speeds and the roofline (bytes of the engine's own "
        "file) are this machine's, not a GB10's."
    )
    lines = [
        f"{e.run.qformat} ({e.run.backend}): the deployed model and modelopt's simulation of it disagree "
        f"beyond noise: deployed perplexity {pct(e.vs_simulated.point)} vs simulated "
        f"[{pct(e.vs_simulated.lo)}, {pct(e.vs_simulated.hi)}]."
        for e in engine
        if e.disagrees
    ]
    if agree := [e.run.qformat for e in engine if e.vs_simulated is not None and not e.disagrees]:
        lines.append(f"Within noise of the simulation: {', '.join(agree)}.")
    return [
        Block("h2", "Simulated vs deployed: accuracy from the engine's own kernels"),
        Block("p", text),
        Block("table", headers=headers, rows=tuple(body)),
    ] + [Block("p", line) for line in lines]


def resolution_table(summaries: list[FormatSummary]) -> Block:
    """Per verdict: the smallest loss it could tell apart from zero, and the windows ±0.5 pp would need."""
    body = []
    for s in summaries:
        for against, c in (("bf16", s.row.vs_bf16), ("fp8", s.row.vs_fp8)):
            if c.recipe is not None:
                sizes = f"{c.recipe.windows}, {c.recipe.seeds}"
                cells = (judged_cell(c), detectable_cell(c), windows_needed_cell(c), sizes)
                body.append((*_id_cells(s.row.run), against, *cells))
    headers = (*ID_HEADERS, "vs", "loss [95% CI]", "smallest detectable loss")
    headers += (f"windows for ±{RESOLVE * 100:.1f} pp", "windows, seeds")
    return Block("table", headers=headers, rows=tuple(body))


def verdict_table(summaries: list[FormatSummary]) -> Block:
    seeds = any(len(s.seeds) > 1 for s in summaries)
    headers = (*ID_HEADERS, "loss vs bf16 [95% CI]", "< 1% vs bf16", "loss vs fp8 [95% CI]", "< 1% vs fp8")
    optional = ("loss vs bf16 over seeds [min, max]",) if seeds else ()
    headers += ("spread over calib sizes", *optional, "reference used")
    body = []
    for s in summaries:
        r, sizes = s.row, ", ".join(map(str, s.calib_sizes))
        spread = "–" if s.calib_spread is None else f"{s.calib_spread * 100:.2f} pp ({sizes})"
        verdicts = [cell(c) for c in (r.vs_bf16, r.vs_fp8) for cell in (judged_cell, verdict_cell)]
        seed = (seed_cell(r.vs_bf16, s.seeds),) if seeds else ()
        body.append((*_id_cells(r.run), *verdicts, spread, *seed, reference_cell(r)))
    return Block("table", headers=headers, rows=tuple(body))


def unpaired_blocks(rows: list[ReportRow]) -> list[Block]:
    """Reference runs of the same model that could not be paired with a run, and what differs."""
    found = [
        (u.run.name, u.role, u.candidate.name, "; ".join(u.differences)) for r in rows for u in r.unpaired
    ]
    if not found:
        return []
    text = (
        "These runs were not compared with these references: they were not scored on the same tokens in the "
        "same way (pairing needs equal eval_digest, tokenizer_digest and compute_dtype tags and model params; "
        "runs recorded without those tags are matched by their window params). A bf16 verdict above then "
        "comes from the run's in-run reference where it has one."
    )
    return [
        Block("h2", "Runs that could not be paired"),
        Block("p", text),
        Block("table", headers=("run", "reference", "candidate run", "what differs"), rows=tuple(found)),
    ]


def fp8_blocks(fp8_command: str | None) -> list[Block]:
    if fp8_command is None:
        return []
    text = (
        "No fp8 run exists in this experiment, so no verdict against fp8 is possible. This command "
        f"adds the missing fp8 runs to the same sweep (same overrides, same experiment): `{fp8_command}`; "
        "then run this report again."
    )
    return [Block("p", text)]


def resolution_text(res: Resolution | None) -> str:
    """What the evaluation resolves, in words: how the table above is read, and the figures near 1%."""
    text = (
        "Resolution. A verdict's smallest detectable loss is the distance from its loss to the end of its 95% "
        "interval nearer zero: a smaller loss cannot be told apart from no loss on these windows (and seeds), "
        'and where the verdict\'s own loss is below it the table says "cannot tell at this size". It is '
        "measured at the verdict's own loss, and intervals widen with the loss (windows disagree more about a "
        "large loss): a verdict far above 1% says little about what this evaluation resolves near 1%. "
        f"Windows for ±{RESOLVE * 100:.1f} pp: n × h_w² / ({RESOLVE * 100:.1f}² − h_s²), with n the windows "
        "scored, h_w the half-width of the interval from the windows alone and h_s that of the seed term "
        "(more windows do not shrink it; with one seed it is 0 and this is n × (h_w / "
        f"{RESOLVE * 100:.1f})²), assuming the per-window spread stays as measured."
    )
    if res is None or res.nearest is None or res.nearest.recipe is None:
        return text + " No comparison here has per-window results, so no resolution is known."
    c, r = res.nearest, res.nearest.recipe
    which = res.nearest_run if r.seeds == 1 else f"the recipe of {res.nearest_run} ({r.seeds} seeds)"
    where = (
        f"On these {res.windows} windows ({res.tokens:,} tokens) the comparison nearest 1% is {which} at "
        f"{pct(c.judged.point)} vs bf16: smallest detectable loss {r.detectable * 100:.2f}%; "
        f"±{RESOLVE * 100:.1f} pp "
    )
    needed = r.windows_needed()
    if needed is None:
        where += (
            f"cannot be reached with more windows (the seed term alone is ±{r.seed_half_width * 100:.2f} pp): "
            "it needs more seeds."
        )
    elif needed <= r.windows:
        where += f"is reached already (±{r.interval.half_width * 100:.2f} pp)."
    else:
        where += f"would need about {needed:,} windows."
    if not res.near:
        where += (
            " That loss is not near 1%, so the resolution near 1% is not measured by this sweep: a format that "
            "loses about 1% measures it."
        )
    text += " " + where
    if res.bf16_ppl is not None:
        b = res.bf16_ppl
        whose = "bf16" if res.baseline == "bf16" else "unquantized (in-run reference)"
        text += (
            f" The {whose} perplexity itself, {b.point:.3f} [{b.lo:.3f}, {b.hi:.3f}], moves by "
            f"±{b.half_width / b.point * 100:.1f}% with the choice of text: compare absolute perplexities only "
            "on identical windows."
        )
    return text


def definitions_text() -> str:
    return (
        f"Loss = relative perplexity increase, ppl(format) / ppl(reference) − 1, on the same evaluation windows. "
        f"95% CI: paired percentile bootstrap over windows ({BOOTSTRAP_RESAMPLES} resamples, seeded). "
        f"pass: the interval's upper bound is below {THRESHOLD:.0%}; fail: its lower bound is {THRESHOLD:.0%} or more "
        f"(exactly {THRESHOLD:.0%} is not below {THRESHOLD:.0%}); inconclusive: the interval straddles {THRESHOLD:.0%}. "
        "Reference: a separate bf16 run scored on the same tokens the same way when one exists, otherwise the "
        "in-run reference (the unquantized model evaluated inside the quantized run on exactly its windows); "
        "every verdict names the one it used. Each format's verdict is taken at its largest calibration size; "
        "the fp8 reference has the same calibration size where one ran. Where several seeds calibrated one "
        "recipe, the verdict is on the recipe's expected loss (the mean over its seeds) with an interval for "
        "both sources of noise: the windows resampled jointly for every seed and its reference, plus the seed "
        "mean's own error (Student's t with seeds − 1 degrees of freedom, scaled by the between-seed standard "
        "error net of what the windows already account for); the seeds' own losses, min to max, are shown "
        "beside it."
    )


def failures_blocks(collected: Collected) -> list[Block]:
    finished, rows = {r.tags.get("config_hash") for r in collected.rows}, []
    for r in collected.unfinished:
        later = "yes" if r.tags.get("config_hash") in finished else "no"
        rows.append((r.name, r.status, r.experiment, r.error[:200] or "(no error recorded)", later))
    rows += [(job, "FAILED before MLflow", "–", message, "–") for job, message in collected.prerun_failures]
    head = Block("h2", "Runs that did not finish")
    if not rows:
        return [head, Block("p", "None: every run of the selection finished.")]
    headers = ("run", "status", "experiment", "error", "finished later")
    return [head, Block("table", headers=headers, rows=tuple(rows))]


def document(
    title: str,
    meta: str,
    collected: Collected,
    rows: list[ReportRow],
    summaries: list[FormatSummary],
    res: Resolution | None,
    plot_name: str | None,
    fp8_command: str | None = None,
    engine: list[EngineRow] | None = None,
) -> list[Block]:
    """The whole report, in order."""
    blocks = [Block("h1", title), Block("p", meta), Block("h2", "Verdict: less than 1% loss?")]
    blocks += [verdict_table(summaries)] if summaries else [Block("p", "No quantized run finished.")]
    blocks += fp8_blocks(fp8_command)
    blocks += [Block("p", definitions_text())]
    if summaries and any(s.row.vs_bf16.recipe or s.row.vs_fp8.recipe for s in summaries):
        blocks += [Block("h2", "Resolution of each verdict"), resolution_table(summaries)]
    blocks += [Block("p", resolution_text(res)), Block("h2", "All runs"), runs_table(rows)]
    if plot_name:
        blocks.append(Block("img", plot_name))
    blocks += engine_blocks(engine or [])
    return blocks + unpaired_blocks(rows) + failures_blocks(collected)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(b: Block) -> str | None:
    if b.kind == "table":
        lines = ["| " + " | ".join(b.headers) + " |", "|" + "|".join("---" for _ in b.headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows])
    simple = {"h1": f"# {b.text}", "h2": f"## {b.text}", "p": b.text, "img": f"![{b.alt}]({b.text})"}
    return simple.get(b.kind)


def to_markdown(blocks: list[Block]) -> str:
    return "\n\n".join(md for b in blocks if (md := _markdown(b)) is not None) + "\n"


def _html_text(text: str) -> str:
    escaped = html.escape(text)
    while "**" in escaped:  # the one bit of Markdown the cells use: **fail**
        escaped = escaped.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
    return escaped


def _image_src(name: str, folder: Path | None) -> str:
    # Embedded, so the page is one self-contained file (MLflow's artifact viewer shows it without the PNG).
    if folder is not None and (folder / name).is_file():
        return "data:image/png;base64," + base64.b64encode((folder / name).read_bytes()).decode()
    return html.escape(name)


def _html(b: Block, folder: Path | None) -> str | None:
    if b.kind in ("h1", "h2", "p"):
        return f"<{b.kind}>{_html_text(b.text)}</{b.kind}>"
    if b.kind == "img":
        return f'<img src="{_image_src(b.text, folder)}" alt="{html.escape(b.alt)}" style="max-width:100%">'
    if b.kind != "table":
        return None
    head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
    body = "".join("<tr>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>" for row in b.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(blocks: list[Block], folder: Path | None = None) -> str:
    """The document as one HTML page; images found in ``folder`` are embedded."""
    parts = [part for b in blocks if (part := _html(b, folder)) is not None]
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f3f3}"
    )
    title = next((b.text for b in blocks if b.kind == "h1"), "report")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _plotted(r: ReportRow) -> bool:
    return r.vs_bf16.change is not None or r.vs_bf16.note == "reference"


def _panel(ax, rows: list[ReportRow], metric: str, scale: float, xlabel: str, symlog: bool) -> None:
    """Loss vs bf16 against ``metric`` (times ``scale``), one marker per run."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    from matplotlib.transforms import offset_copy

    formats = list(dict.fromkeys(r.run.qformat for r in rows))  # in order of appearance
    # More formats than a palette has colours (the recipes preset has 14): colours repeat, labels tell them apart.
    colors = dict(zip(formats, itertools.cycle(plt.get_cmap("tab20").colors)))
    calibs = sorted({r.run.calib_size for r in rows if r.run.calib_size})
    markers = dict(zip(calibs, itertools.cycle("osD^v<>p")))
    several_models = len({r.run.model for r in rows}) > 1
    labelled: set[str] = set()
    extent: list[tuple[float, float]] = []  # offset artists do not autoscale: limits come from here
    shown = [r for r in rows if metric in r.run.metrics and _plotted(r)]
    # Runs at one x (nvfp4 and nvfp4_awq, or two calibration sizes) are spread a few points apart.
    same_x: dict[float, list[str]] = {}
    for r in shown:
        same_x.setdefault(round(r.run.metrics[metric] * scale, 6), []).append(r.run.run_id)
    for r in shown:
        x, c = r.run.metrics[metric] * scale, r.vs_bf16
        group = same_x[round(x, 6)]
        dodge = (group.index(r.run.run_id) - (len(group) - 1) / 2) * 6
        point, lo, hi = (0.0, 0.0, 0.0) if c.change is None else (c.change.point, c.change.lo, c.change.hi)
        label = r.run.qformat if r.run.qformat not in labelled else None
        labelled.add(r.run.qformat)
        ax.errorbar(
            [x],
            [point * 100],
            yerr=[[(point - lo) * 100], [(hi - point) * 100]],
            fmt=markers.get(r.run.calib_size, "o"),
            color=colors[r.run.qformat],
            capsize=3,
            markersize=7,
            label=label,
            alpha=0.9,
            transform=offset_copy(ax.transData, fig=ax.figure, x=dodge, units="points"),
        )
        extent += [(x, lo * 100), (x, hi * 100)]
        if several_models:
            ax.annotate(r.run.model, (x, point * 100), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if extent:
        ax.update_datalim(extent)
        ax.autoscale_view()
        ax.margins(x=0.15)
    claim, text, axis = THRESHOLD * 100, f"  {THRESHOLD:.0%} claim", ax.get_yaxis_transform()
    ax.axhline(claim, color="crimson", linestyle="--", linewidth=1)
    ax.text(1.0, claim, text, color="crimson", va="bottom", ha="right", transform=axis, fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    # Limits by hand: offset artists do not autoscale, and the 1% line must always be in view.
    top = max([y for _, y in extent[1::2]] + [claim])
    bottom = min([y for _, y in extent[::2]] + [0.0])
    if symlog:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom * 1.5 - 0.3, top * 1.6)
        ax.set_yticks([t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= top * 1.6])
    else:
        pad = (top - bottom) * 0.12
        ax.set_ylim(bottom - pad, top + pad)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity increase vs bf16" + (" (symlog scale)" if symlog else ""))
    ax.grid(True, which="both", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if len(calibs) > 1:
        from matplotlib.lines import Line2D

        handles += [
            Line2D([], [], marker=markers[c], color="grey", linestyle="", label=f"calib {c}") for c in calibs
        ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


@contextlib.contextmanager
def figure(title: str, path: Path, panels: int, size: tuple[float, float]) -> Iterator[Any]:
    """A row of ``panels`` axes, saved to ``path`` (PNG) with ``title`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display: reports render on servers and in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    yield axes[0]
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[ReportRow], title: str, path: Path) -> Path | None:
    """Loss vs bf16 (with 95% CI bars) against weight size, and against tokens/s where measured."""
    plotted = [r for r in rows if _plotted(r)]
    if not plotted:
        return None
    speed = [r for r in plotted if "decode_tokens_per_s" in r.run.metrics and speed_valid(r.run)]
    losses = [abs(v) for r in plotted if r.vs_bf16.change for v in (r.vs_bf16.change.lo, r.vs_bf16.change.hi)]
    symlog = max(losses, default=0) > 0.2  # beyond 20 % a linear axis squashes the formats near 1%
    panels = 2 if speed else 1
    sizes = [r.run.metrics["weight_gib"] for r in plotted if "weight_gib" in r.run.metrics]
    mib = bool(sizes) and max(sizes) < 1  # a 135M model's 0.1-0.25 GiB reads better in MiB
    scale, unit = (1024, "MiB") if mib else (1, "GiB")
    with figure(title, path, panels, (7.5 * panels, 4.6)) as axes:
        _panel(axes[0], plotted, "weight_gib", scale, f"weights ({unit}, scales included)", symlog)
        if sizes and max(sizes) / max(min(sizes), 1e-9) > 20:  # several models: 0.1 to 16 GiB
            axes[0].set_xscale("log")
        if speed:
            _panel(axes[1], speed, "decode_tokens_per_s", 1, "decode tokens/s", symlog)
    return path
