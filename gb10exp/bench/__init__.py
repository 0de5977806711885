"""Measurement rules, in one place for every backend.

A backend supplies one function, ``generate_once(prompt) -> Timing``, that sends one request of exactly
``depth + input_len`` prompt tokens (``batch_size`` sequences) and receives exactly ``output_len`` new
tokens per sequence, EOS ignored, stamping the time each token became available to the caller.
``measure`` then:

- gives every request its own prompt (``requests``): a different cut of the evaluation text behind a
  unique leading token sequence (``LEAD`` tokens drawn at random for each request), so no engine can
  answer it from a prefix cache filled by an earlier request or by the scored evaluation windows and
  report a TTFT it never paid for; concurrent sequences of one request get their own leads (``variants``);
- ``bench.depth``: the first ``depth`` tokens of a request stand for a conversation already in the
  context (llama-bench's ``-d``). A backend that owns its KV cache fills them before the clock starts
  (``Target.depth_untimed``), so TTFT and ``prefill_tokens_per_s`` cover the ``input_len`` measured tokens,
  as in llama-bench; a server gets them in the measured request and its TTFT includes them (tagged);
- runs ``warmup`` requests unrecorded, then ``repeats`` recorded ones, while ``Monitor`` samples GPU clocks,
  power, throttle reasons and memory (``monitor.py``);
- reduces the timings to medians and p90s (``summarize``), places decode speed under the memory-bandwidth
  roofline (``roofline.py``) and labels the figures as llama-bench does (tag ``bench.label``,
  "pp512+tg128 @ d4096"), so they line up with llama.cpp's tables.

GPU backends make the device's work visible before they stamp a time (synchronize, or CUDA events read
after the request): a stamp never marks work that was only queued.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gb10exp.bench.monitor import Monitor
from gb10exp.bench.roofline import roofline_metrics
from gb10exp.config import ConfigError

if TYPE_CHECKING:
    from gb10exp.config import BenchConfig, Config
    from gb10exp.quant.bytes import Tensors


@dataclass
class Timing:
    """One request: stamps in seconds from ``time.perf_counter()``."""

    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each generated token (per step)
    batch_size: int = 1

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class Target:
    """What the measured engine reads while it decodes, for the roofline and the memory figures."""

    device: str  # where the weights live during decoding: "cuda", "cuda:1", "cpu"
    # what the engine reads (gb10exp.quant.bytes: weights and KV cache geometry); None when unknown (a
    # server's model with no GGUF and no bench.model_bytes): no roofline then
    tensors: Tensors | None
    # The engine's own peak-memory figure (torch.cuda.max_memory_allocated, llama.cpp's buffer sizes...):
    reset_peak: Callable[[], None] = lambda: None
    peak_bytes: Callable[[], float | None] = lambda: None
    depth_untimed: bool = False  # the backend fills the first bench.depth tokens before the clock starts


def merge_concurrent(timings: list[Timing]) -> Timing:
    """One batch-level Timing from concurrent requests: token k is done when every request has its k-th."""
    merged = Timing(start=min(t.start for t in timings), batch_size=len(timings))
    merged.token_times = [max(step) for step in zip(*(t.token_times for t in timings), strict=False)]
    return merged


def stamps_from_stream(updates: list[tuple[int, float]]) -> list[float]:
    """Per-token arrival times from a stream's updates (cumulative token count, arrival time): an engine
    that delivers k tokens in one update delivered each of them at that time."""
    times: list[float] = []
    for count, at in updates:
        times += [at] * (count - len(times))
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(timings: list[Timing], input_len: int, output_len: int) -> dict[str, float]:
    """Medians and p90s over repetitions. Decode rate comes from the inter-token gaps themselves, never
    from subtracting TTFT from end-to-end time (which can go negative under noise). ``input_len``: the
    prompt tokens the TTFT paid for."""
    for t in timings:
        if len(t.token_times) != output_len:
            raise RuntimeError(f"a backend returned {len(t.token_times)} tokens, expected output_len={output_len}")
    ttft = [t.ttft for t in timings]
    tpot = [statistics.fmean(t.inter_token) for t in timings if t.inter_token]
    gaps = [g for t in timings for g in t.inter_token]
    batch = timings[0].batch_size
    e2e = [t.e2e for t in timings]
    out = {"ttft_s": statistics.median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
           "e2e_s": statistics.median(e2e), "e2e_p90_s": percentile(e2e, 0.9),
           "prefill_tokens_per_s": batch * input_len / statistics.median(ttft)}
    if tpot:
        out |= {"tpot_s": statistics.median(tpot), "tpot_p90_s": percentile(tpot, 0.9),
                "itl_p90_s": percentile(gaps, 0.9), "decode_tokens_per_s": batch / statistics.median(tpot)}
    return out


def prompts(tokens: Sequence[int], input_len: int, count: int) -> list[list[int]]:
    """``count`` different prompts of ``input_len`` tokens cut from ``tokens`` (real text), spread evenly.
    Consecutive prompts start at different tokens, so they share no prefix an engine could cache."""
    tokens = [int(t) for t in tokens]
    spare = len(tokens) - input_len
    if spare < count - 1:
        raise ConfigError(f"bench.input_len={input_len} is not allowed: {count} distinct prompts need "
                          f"{input_len + count - 1} tokens of evaluation text and there are {len(tokens)}; "
                          "lower bench.input_len (or bench.depth) or raise eval.num_windows")
    stride = min(input_len, spare // max(count - 1, 1)) if count > 1 else 0
    return [tokens[i * stride : i * stride + input_len] for i in range(count)]


LEAD = 4  # leading tokens drawn at random per request: 4 ids from a text's vocabulary never repeat in practice
_random = random.SystemRandom()  # fresh leads in every process: a rerun against a warm server misses its cache too


def lead(pool: Sequence[int], taken: set[tuple[int, ...]]) -> list[int]:
    """``LEAD`` random token ids from ``pool`` that no earlier request of this process used."""
    while True:
        chosen = tuple(_random.choice(pool) for _ in range(LEAD))
        if chosen not in taken:
            taken.add(chosen)
            return list(chosen)


_TAKEN: set[tuple[int, ...]] = set()


def requests(tokens: Sequence[int], length: int, count: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: each a unique random lead, then a cut of real text."""
    if length <= LEAD:
        raise ConfigError(f"bench.input_len + bench.depth = {length} is not allowed: more than {LEAD} tokens "
                          f"(the first {LEAD} of every request are its unique lead)")
    pool = sorted({int(t) for t in tokens})
    return [lead(pool, _TAKEN) + cut for cut in prompts(tokens, length - LEAD, count)]


def variants(prompt: list[int], count: int) -> list[list[int]]:
    """``count`` concurrent sequences of one request: ``prompt`` and copies of it with other leads, so
    no sequence of a batch is served from another's prefix."""
    pool = sorted(set(prompt))
    return [prompt] + [lead(pool, _TAKEN) + prompt[LEAD:] for _ in range(count - 1)]


def label(cfg: BenchConfig) -> str:
    """llama-bench's naming: "pp512+tg128 @ d4096" (", 4 concurrent" when bench.batch_size > 1)."""
    text = f"pp{cfg.input_len}+tg{cfg.output_len} @ d{cfg.depth}"
    return text + (f", {cfg.batch_size} concurrent" if cfg.batch_size > 1 else "")


def check(cfg: Config) -> None:
    """Before any job runs: the evaluation text holds enough tokens for every request's depth + prompt."""
    b = cfg.bench
    need, have = b.depth + b.input_len - LEAD + b.warmup + b.repeats - 1, cfg.eval.num_windows * cfg.eval.seq_len
    if b.enabled and need > have:
        what = (f"bench.depth={b.depth} is not allowed with bench.input_len={b.input_len}" if b.depth
                else f"bench.input_len={b.input_len} is not allowed")
        raise ConfigError(f"{what}: {b.warmup + b.repeats} distinct requests need {need} tokens of evaluation text "
                          f"and eval.num_windows x eval.seq_len = {have}; raise eval.num_windows or lower "
                          f"{'bench.depth' if b.depth else 'bench.input_len'}")


def measure(generate_once: Callable[[list[int]], Timing], tokens: Sequence[int], cfg: BenchConfig,
            target: Target) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of one throughput measurement under the rules above."""
    depth = cfg.depth
    reqs = requests(tokens, depth + cfg.input_len, cfg.warmup + cfg.repeats)
    for prompt in reqs[: cfg.warmup]:
        generate_once(prompt)
    target.reset_peak()
    with Monitor(target.device) as monitor:
        timings = [generate_once(prompt) for prompt in reqs[cfg.warmup :]]
    timed = cfg.input_len if target.depth_untimed else depth + cfg.input_len
    metrics = summarize(timings, timed, cfg.output_len)
    tags = {"bench.label": label(cfg)}
    if depth:
        tags["bench.depth_prefill"] = (
            f"untimed: {depth} tokens filled before the clock starts (as llama-bench -d)" if target.depth_untimed
            else f"timed: the {depth} depth tokens are prefilled inside the measured request; ttft_s and "
                 f"prefill_tokens_per_s cover {timed} tokens")
    if (peak := target.peak_bytes()) is not None:
        metrics["mem_engine_peak_gib"] = peak / 2**30
    if target.tensors is None:
        return metrics | monitor.metrics(), tags | monitor.tags() | {
            "roofline": "none: the engine's weight bytes are unknown (set bench.model_bytes)"}
    context = depth + cfg.input_len + cfg.output_len / 2  # the KV cache's mean length while decoding
    roofline, roofline_tags = roofline_metrics(metrics.get("decode_tokens_per_s"), target.tensors, context,
                                               cfg.batch_size, target.device)
    return metrics | monitor.metrics() | roofline, tags | monitor.tags() | roofline_tags


def now() -> float:
    return time.perf_counter()


__all__ = ["LEAD", "Monitor", "Target", "Timing", "label", "measure", "merge_concurrent", "now", "percentile",
           "check", "prompts", "requests", "stamps_from_stream", "summarize", "variants"]
