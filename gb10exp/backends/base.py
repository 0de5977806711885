"""The backend interface. Adding a backend = one folder ``gb10exp/backends/<name>/`` (config.py is not
needed: options live in ``conf/backend/<name>.yaml``) with a ``backend.py`` that defines a class
satisfying ``Backend``, plus one entry in ``gb10exp.backends.REGISTRY``. Nothing else branches on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gb10exp.config import BenchConfig


@dataclass
class BenchInputs:
    """What a backend gets to benchmark: the (possibly fake-quantized) in-process model and its context."""

    model: torch.nn.Module
    tokenizer: Any
    prompt_tokens: torch.Tensor  # (input_len,) real text tokens, the same for every backend
    device: torch.device
    quantized: bool  # fake quantization: speed is not the format's speed


class Backend(Protocol):
    name: str

    def check(self) -> None:
        """Cheap availability check (imports, server reachable); raise ConfigError with the fix."""

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        """(metrics, tags) of one throughput measurement, following gb10exp.bench's rules."""
