"""The backend interface. A new backend is one folder ``gb10exp/backends/<name>/`` (``config.py``: its
options, a ``BackendConfig`` subclass; ``backend.py``: a class satisfying ``Backend``), one ``REGISTRY`` entry and one
``conf/backend/<name>.yaml``. The runner calls ``check`` (preflight, before any MLflow run), ``prepare``
(timed as ``startup_s``: GGUF conversion, export, engine build, server start), ``perplexity`` (accuracy
through the engine's own kernels), ``benchmark``, and ``close`` (always, even after a failure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from gb10exp.config import BenchConfig, ModelConfig
    from gb10exp.quant.bytes import Tensors
    from gb10exp.quant.formats import Format


@dataclass
class BenchInputs:
    """What a backend gets: the (possibly fake-quantized) in-process model and its context."""

    model: torch.nn.Module | None  # None: speed only (eval.enabled=false), nothing of ours is loaded
    tokenizer: Any
    prompt_tokens: torch.Tensor  # (n,) real text tokens, the same for every backend; prompts are cut from it
    device: torch.device
    fmt: Format
    model_cfg: ModelConfig | None = None
    deployed: Tensors | None = None  # the format's deployed tensors (gb10exp.quant.bytes.from_module)
    cache_key: str | None = None  # the quantized model's content key (what an engine builds from it is cached by it)

    @property
    def quantized(self) -> bool:
        """modelopt fake quantization: in-process speed is not the format's speed."""
        return self.model is not None and self.fmt.modelopt


class Backend(Protocol):
    """What the runner calls. Backends subclass it for the defaults: nothing to prepare, score or describe."""

    name: str
    max_batch_size: int | None = None  # concurrent sequences the engine runs at once (None: no limit)
    served_model: str | None  # the model an engine serves on its own (a server's, a given GGUF's), else None
    engine_package: str | None  # the Python package of the engine it embeds (its version is part of a run's identity)
    returns_logits: bool = False  # ``logits`` gives the engine's logits of whole windows, scored as PyTorch's

    def check(self, fmt: Format, tokenizer: Any = None) -> None:
        """Cheap availability check (imports, server reachable, format servable); raise ConfigError with the fix.
        An engine that runs a model of its own (a GGUF file, a server) compares its tokenizer with
        ``tokenizer`` (``gb10exp.backends.same_model``); None: speed only (eval.enabled=false), not compared."""

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        """One-time work before any request (artifacts, engine, server); returns tags describing it."""
        return {}

    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        """Per window of ``windows`` (N, T): (summed NLL in nats, tokens scored) by the engine itself over the
        targets ``score_from[i]`` .. T-1 (as ``eval.protocol`` scores them; None: 1..T-1; an engine that
        re-tokenizes text may score a few more or fewer); None: no engine of its own to score with. Raises
        ``gb10exp.evaluate.engine.EngineAccuracyUnavailable`` when the engine cannot score the whole
        prompt."""
        return None

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        """The engine's logits at every position of ``windows`` (N, T) -> (N, T, vocabulary), float32; only
        where ``returns_logits``."""

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        """(metrics, tags) of one throughput measurement, following gb10exp.bench's rules."""

    def describe(self) -> dict[str, str]:
        """What the engine ran, known once it has run (kernels, buffer types, offload), as run tags (none: the
        run's own tags already say what ran)."""
        return {}

    def close(self) -> None:
        """Release the engine (stop servers, free GPU memory)."""
