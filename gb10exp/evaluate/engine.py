"""Perplexity through the measured engine's own kernels, next to the offline (PyTorch) figure.

Some NVFP4 kernels have produced garbage at full speed: a tokens/s figure means nothing unless the same
kernels also compute correctly. Engines that return prompt log-probabilities (llama.cpp, OpenAI-compatible
servers with ``echo`` + ``logprobs``, TensorRT-LLM's context logits) score the first
``bench.engine_ppl_windows`` evaluation windows, exactly the token ids the offline evaluation scored; a
ratio to the offline perplexity on those windows beyond ``bench.ppl_tolerance`` is flagged.

For a format the engine quantizes itself (``qformat.gguf_type``), PyTorch holds only the unquantized
source model, so the engine scores every window and its perplexity is the run's perplexity; the
source's becomes ``source_perplexity`` and, on the same scored tokens, the run's in-run reference
(``reference_perplexity``, ``windows.ref_nll``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from gb10exp.config import Config
from gb10exp.data import EvalWindows
from gb10exp.evaluate import AccuracyResult, WindowStats


class EngineAccuracyUnavailable(Exception):
    """The engine cannot score prompts (no echo, no prompt log-probabilities, not all of them): the run
    goes on with a tag saying so, never with a number computed from what the engine did return."""


@dataclass
class EngineAccuracy:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    windows: dict | None = None  # per-window sums when the engine's figures are the run's accuracy


def _ppl(nll: list[float], tokens: list[int]) -> float:
    return math.exp(sum(nll) / sum(tokens))


def engine_accuracy(backend, windows: EvalWindows, offline: AccuracyResult, cfg: Config) -> EngineAccuracy:
    """Score windows through ``backend.perplexity`` and compare with ``offline`` on the same scored tokens."""
    engine_quantized = cfg.qformat.gguf_type is not None  # the engine made the format: PyTorch has only the source
    count = len(windows) if engine_quantized else min(cfg.bench.engine_ppl_windows, len(windows))
    if count == 0:
        return EngineAccuracy(tags={"engine_ppl_check": "off (bench.engine_ppl_windows=0)"})
    try:
        scored = backend.perplexity(windows.tokens[:count], windows.score_from[:count].tolist())
    except EngineAccuracyUnavailable as exc:  # a tag, never a number computed from a partial answer
        if engine_quantized:
            raise RuntimeError(f"engine accuracy not available ({exc}), and qformat={cfg.qformat.name!r} has no "
                               "other source of accuracy; eval.enabled=false measures speed only") from exc
        return EngineAccuracy(tags={"engine_ppl_check": f"engine accuracy not available: {exc}"})
    if scored is None:
        if engine_quantized:
            raise RuntimeError(f"backend={cfg.backend.name!r} returned no log-probabilities, and "
                               f"qformat={cfg.qformat.name!r} has no other source of accuracy")
        return EngineAccuracy(tags={"engine_ppl_check": f"none: backend {cfg.backend.name} has no separate engine "
                                                        "scoring prompts (its accuracy is the offline one)"})
    nll, tokens = [n for n, _ in scored], [t for _, t in scored]
    engine_ppl = _ppl(nll, tokens)
    offline_ppl = _ppl(offline.windows.nll[:count], offline.windows.tokens[:count])
    ratio = engine_ppl / offline_ppl
    what = "the unquantized source model" if engine_quantized else "the same model"
    ok = abs(ratio - 1) <= cfg.bench.ppl_tolerance
    result = EngineAccuracy(
        metrics={"engine_perplexity": engine_ppl, "offline_perplexity_same_windows": offline_ppl,
                 "engine_ppl_ratio": ratio, "engine_ppl_windows": float(count)},
        tags={"engine_ppl_check": ("ok" if ok else "MISMATCH")
              + f": engine {engine_ppl:.3f} vs PyTorch {offline_ppl:.3f} on {what}, {count} windows"
              + f" (tolerance {cfg.bench.ppl_tolerance:.0%})"},
    )
    if engine_quantized:
        result.metrics |= {"perplexity": engine_ppl, "nll_mean": sum(nll) / sum(tokens),
                           "eval_tokens": float(sum(tokens)), "source_perplexity": offline.perplexity}
        result.tags["accuracy_source"] = f"engine ({cfg.backend.name}): qformat {cfg.qformat.name} is not in PyTorch"
        result.windows = asdict(WindowStats(nll=list(nll), tokens=tokens))
        del result.windows["ref_nll"]
        if tokens == offline.windows.tokens:  # the source is this run's unquantized reference, same tokens
            result.windows["ref_nll"] = list(offline.windows.nll)
            result.metrics |= {"reference_perplexity": offline.perplexity, "reference_nll_mean": offline.nll_mean}
    return result
