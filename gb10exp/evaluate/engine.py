"""Perplexity through the measured engine's own kernels, next to the offline (PyTorch) figure.

Some NVFP4 kernels have produced garbage at full speed: tokens/s mean nothing unless the same kernels also
compute correctly. Engines that return prompt log-probabilities (llama.cpp, OpenAI-compatible servers with
``echo`` + ``logprobs``, TensorRT-LLM's context logits) score the first ``bench.engine_ppl_windows``
evaluation windows, the very token ids the offline evaluation scored; a ratio to the offline perplexity on
those windows beyond ``bench.ppl_tolerance`` is flagged. For a format the engine quantizes itself
(``qformat.gguf_type``) PyTorch holds only the unquantized source: the engine scores every window and its
perplexity is the run's; the source's becomes ``source_perplexity`` and, on the same scored tokens, the
run's in-run reference (``reference_perplexity``, ``windows.ref_nll``).

An engine that returns its logits (``Backend.logits``: llama.cpp) is scored on every window by the code that
scores PyTorch (``evaluate_accuracy``), against the same unquantized reference. A modelopt format deployed
there is then measured twice on the same windows: the headline stays modelopt's simulation (as on every
backend), the engine's figures are ``perplexity_deployed``, ``kl_mean_deployed``, ``top1_agreement_deployed``,
and ``deployed_vs_simulated`` is their paired perplexity ratio - 1 (per-window sums of both in results.json:
``windows``, ``windows_deployed``; the report bootstraps its interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch

from gb10exp.config import Config
from gb10exp.data import EvalWindows
from gb10exp.evaluate import AccuracyResult, WindowStats, evaluate_accuracy
from gb10exp.quant.formats import Format


class EngineAccuracyUnavailable(Exception):
    """The engine cannot score prompts (no echo, no prompt log-probabilities, not all of them): the run
    goes on with a tag saying so, never with a number computed from what the engine did return."""


@dataclass
class EngineAccuracy:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    windows: dict | None = None  # per-window sums when the engine's figures are the run's accuracy
    deployed: dict | None = None  # per-window sums of the engine's own scoring, beside a simulated headline


def _ppl(nll: list[float], tokens: list[int]) -> float:
    return math.exp(sum(nll) / sum(tokens))


def _ppl_check(engine_ppl: float, offline_ppl: float, ok: bool, on: str, count: int,
               cfg: Config) -> tuple[dict[str, float], str]:
    """The engine's perplexity beside PyTorch's on the same windows: its metrics and its check tag."""
    metrics = {"engine_perplexity": engine_ppl, "offline_perplexity_same_windows": offline_ppl,
               "engine_ppl_ratio": engine_ppl / offline_ppl, "engine_ppl_windows": float(count)}
    return metrics, (("ok" if ok else "MISMATCH") + f": engine {engine_ppl:.3f} vs PyTorch {offline_ppl:.3f} "
                     f"on {on} windows (tolerance {cfg.bench.ppl_tolerance:.0%})")


class _EngineModel:
    """An engine's logits as a model for ``evaluate_accuracy``: ``model(batch).logits``."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.backend.logits(batch.cpu()).to(batch.device))


def engine_accuracy(backend, windows: EvalWindows, offline: AccuracyResult, cfg: Config, fmt: Format,
                    device: torch.device, reference: Callable[[], torch.nn.Module | None]) -> EngineAccuracy:
    """Score windows through the engine and compare with ``offline`` on the same scored tokens. ``reference``
    gives the unquantized model (KL and top-1), called only for an engine that returns logits."""
    if backend.returns_logits:
        baseline = reference() if cfg.eval.compare_baseline else None
        scored = evaluate_accuracy(_EngineModel(backend), windows, cfg.eval.batch_size, device, baseline)
        return _scored(scored, offline, cfg, fmt)
    return _checked(backend, windows, offline, cfg, fmt)


def _scored(scored: AccuracyResult, offline: AccuracyResult, cfg: Config, fmt: Format) -> EngineAccuracy:
    """The engine's own accuracy on every window: the run's headline for a format only the engine has (GGUF),
    ``*_deployed`` beside the simulated headline otherwise."""
    sums = scored.as_dict()["windows"]
    engine_ppl, offline_ppl = scored.perplexity, offline.perplexity
    if fmt.kind == "gguf":
        return EngineAccuracy(
            metrics=scored.metrics() | {"source_perplexity": offline_ppl},
            tags={"accuracy_source": f"engine ({cfg.backend.name}): qformat {fmt.name} is not in PyTorch",
                  "engine_ppl_check": f"engine scored all {len(sums['nll'])} windows (its accuracy is the run's)"},
            windows=sums)
    metrics = {f"{k}_deployed": v for k, v in scored.metrics().items() if k in DEPLOYED}
    ratio = math.expm1(scored.nll_mean - offline.nll_mean) if scored.eval_tokens == offline.eval_tokens else None
    if fmt.modelopt:  # the deployment against modelopt's simulation of it, on the same scored tokens
        tags = {"accuracy_deployed": f"engine ({cfg.backend.name}) on the deployed checkpoint, every window"}
        return EngineAccuracy(metrics=metrics | ({"deployed_vs_simulated": ratio} if ratio is not None else {}),
                              tags=tags, deployed=sums)
    # the same weights: the kernels must agree
    ok, count = ratio is not None and abs(ratio) <= cfg.bench.ppl_tolerance, len(sums["nll"])
    checked, check = _ppl_check(engine_ppl, offline_ppl, ok, f"the same model, all {count}", count, cfg)
    return EngineAccuracy(metrics=metrics | checked, tags={"engine_ppl_check": check}, deployed=sums)


DEPLOYED = ("perplexity", "nll_mean", "kl_mean", "top1_agreement")  # the engine's figures beside the simulation's


def _checked(backend, windows: EvalWindows, offline: AccuracyResult, cfg: Config, fmt: Format) -> EngineAccuracy:
    """Engines that return prompt log-probabilities but no logits: the engine scores the first
    ``bench.engine_ppl_windows`` windows (all of them for a format only the engine has)."""
    engine_quantized = fmt.kind == "gguf"  # the engine made the format: PyTorch has only the source
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
    what = "the unquantized source model" if engine_quantized else "the same model"
    ok = abs(engine_ppl / offline_ppl - 1) <= cfg.bench.ppl_tolerance
    metrics, check = _ppl_check(engine_ppl, offline_ppl, ok, f"{what}, {count}", count, cfg)
    result = EngineAccuracy(metrics=metrics, tags={"engine_ppl_check": check})
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
