"""Measurement rules, in one place for every backend.

A backend supplies one function, ``generate_once(prompt) -> Timing``, that sends one request of exactly
``input_len`` prompt tokens (``batch_size`` sequences) and receives exactly ``output_len`` new tokens per
sequence, EOS ignored, stamping the time each token became available to the caller. ``measure`` then:

- gives every request its own prompt (``prompts``): a different cut of the evaluation text, so no engine
  can answer a repetition from its prefix cache and report a TTFT it never paid for;
- runs ``warmup`` requests unrecorded, then ``repeats`` recorded ones, while ``Monitor`` samples GPU clocks,
  power, throttle reasons and memory (``monitor.py``);
- reduces the timings to medians and p90s (``summarize``) and places decode speed under the
  memory-bandwidth roofline (``roofline.py``).

GPU backends make the device's work visible before they stamp a time (synchronize, or CUDA events read
after the request): a stamp never marks work that was only queued.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gb10exp.bench.monitor import Monitor
from gb10exp.bench.roofline import roofline_metrics

if TYPE_CHECKING:  # importable without Hydra: benchmarks/hf_decode.py runs where only torch is installed
    from gb10exp.config import BenchConfig


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
    decode_bytes: float  # bytes one decode step reads: every weight except the embedding-table lookup
    # The engine's own peak-memory figure (torch.cuda.max_memory_allocated, llama.cpp's buffer sizes...):
    reset_peak: Callable[[], None] = lambda: None
    peak_bytes: Callable[[], float | None] = lambda: None


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
    from subtracting TTFT from end-to-end time (which can go negative under noise)."""
    for t in timings:
        if len(t.token_times) != output_len:
            raise RuntimeError(f"a backend returned {len(t.token_times)} tokens, expected output_len={output_len}")
    ttft = [t.ttft for t in timings]
    tpot = [statistics.fmean(t.inter_token) for t in timings if t.inter_token]
    gaps = [g for t in timings for g in t.inter_token]
    batch = timings[0].batch_size
    out = {
        "ttft_s": statistics.median(ttft),
        "ttft_p90_s": percentile(ttft, 0.9),
        "e2e_s": statistics.median([t.e2e for t in timings]),
        "e2e_p90_s": percentile([t.e2e for t in timings], 0.9),
        "prefill_tokens_per_s": batch * input_len / statistics.median(ttft),
    }
    if tpot:
        out |= {
            "tpot_s": statistics.median(tpot),
            "tpot_p90_s": percentile(tpot, 0.9),
            "itl_p90_s": percentile(gaps, 0.9),
            "decode_tokens_per_s": batch / statistics.median(tpot),
        }
    return out


def prompts(tokens: Sequence[int], input_len: int, count: int) -> list[list[int]]:
    """``count`` different prompts of ``input_len`` tokens cut from ``tokens`` (real text), spread evenly.
    Consecutive prompts start at different tokens, so they share no prefix an engine could cache."""
    tokens = [int(t) for t in tokens]
    spare = len(tokens) - input_len
    if spare < count - 1:
        from gb10exp.config import ConfigError

        raise ConfigError(
            f"bench.input_len={input_len} is not allowed: {count} distinct prompts need {input_len + count - 1} "
            f"tokens of evaluation text and there are {len(tokens)}; lower bench.input_len or raise eval.num_windows"
        )
    stride = min(input_len, spare // max(count - 1, 1)) if count > 1 else 0
    return [tokens[i * stride : i * stride + input_len] for i in range(count)]


def measure(
    generate_once: Callable[[list[int]], Timing], tokens: Sequence[int], cfg: BenchConfig, target: Target
) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of one throughput measurement under the rules above."""
    requests = prompts(tokens, cfg.input_len, cfg.warmup + cfg.repeats)
    for prompt in requests[: cfg.warmup]:
        generate_once(prompt)
    target.reset_peak()
    with Monitor(target.device) as monitor:
        timings = [generate_once(prompt) for prompt in requests[cfg.warmup :]]
    metrics = summarize(timings, cfg.input_len, cfg.output_len)
    metrics["decode_bytes_per_token"] = target.decode_bytes
    if (peak := target.peak_bytes()) is not None:
        metrics["mem_engine_peak_gib"] = peak / 2**30
    roofline, roofline_tags = roofline_metrics(metrics.get("decode_tokens_per_s"), target.decode_bytes,
                                               cfg.batch_size, target.device)
    return metrics | monitor.metrics() | roofline, monitor.tags() | roofline_tags


def now() -> float:
    return time.perf_counter()


__all__ = ["Monitor", "Target", "Timing", "measure", "merge_concurrent", "now", "percentile", "prompts",
           "stamps_from_stream", "summarize"]
