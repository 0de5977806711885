"""The backend interface. Adding a backend = one folder ``gb10exp/backends/<name>/`` (config.py is not
needed: options live in ``conf/backend/<name>.yaml``) with a ``backend.py`` that defines a class
satisfying ``Backend``, plus one entry in ``gb10exp.backends.REGISTRY``. Nothing else branches on it.

The runner calls, in order: ``check`` (cheap, before any MLflow run exists), ``prepare`` (timed as
``startup_s``: GGUF conversion, checkpoint export, engine build, server start), ``perplexity`` (accuracy
through the engine's own kernels), ``benchmark``, and ``close`` (always, even after a failure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:  # importable without Hydra (benchmarks/hf_decode.py imports the hf fast path)
    from gb10exp.config import BenchConfig, ModelConfig, QFormatConfig


class EngineAccuracyUnavailable(Exception):
    """The engine cannot score prompts (no echo, no prompt log-probabilities, not all of them): the run
    goes on with a tag saying so, never with a number computed from what the engine did return."""


@dataclass
class BenchInputs:
    """What a backend gets: the (possibly fake-quantized) in-process model and its context."""

    model: torch.nn.Module
    tokenizer: Any
    prompt_tokens: torch.Tensor  # (n,) real text tokens, the same for every backend; prompts are cut from it
    device: torch.device
    quantized: bool  # modelopt fake quantization: in-process speed is not the format's speed
    model_cfg: ModelConfig | None = None
    qformat: QFormatConfig | None = None
    weight_bytes: float = 0.0  # the deployed weights' bytes (gb10exp.quant.bytes.deployed_weight_bytes)
    decode_bytes: float = 0.0  # the deployed format's bytes per decoded token (..bytes.deployed_decode_bytes)


class Backend(Protocol):
    name: str

    def check(self, qformat: QFormatConfig, tokenizer: Any = None) -> None:
        """Cheap availability check (imports, server reachable, format servable); raise ConfigError with the fix.
        An engine that runs a model of its own (a GGUF file, a server) compares its tokenizer with
        ``tokenizer`` (``gb10exp.backends.same_model``); None: speed only (eval.enabled=false), not compared."""

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        """One-time work before any request (artifacts, engine, server); returns tags describing it."""

    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        """Per window of ``windows`` (N, T): (summed negative log-likelihood in nats, tokens scored), computed
        by the engine itself over the targets ``score_from[i]`` .. T-1 of window i (T - score_from[i] tokens,
        as ``eval.protocol`` scores them; None: every target 1..T-1); an engine that re-tokenizes text may
        score a few more or fewer; None when the backend has no engine of its own to score with; raises
        ``EngineAccuracyUnavailable`` when the engine cannot return log-probabilities for the whole prompt."""

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        """(metrics, tags) of one throughput measurement, following gb10exp.bench's rules."""

    def close(self) -> None:
        """Release the engine (stop servers, free GPU memory)."""
