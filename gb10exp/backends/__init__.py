"""Backends by short name. An unknown name fails with the list of valid ones."""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

from gb10exp.backends.base import Backend, BenchInputs

if TYPE_CHECKING:  # importable without Hydra (benchmarks/hf_decode.py imports the hf fast path)
    from gb10exp.config import BackendConfig

# name -> "module:Class"; imported lazily so that a missing optional engine only matters when chosen.
REGISTRY = {
    "hf": "gb10exp.backends.hf.backend:HFBackend",
    "llamacpp": "gb10exp.backends.llamacpp.backend:LlamaCppBackend",
    "openai": "gb10exp.backends.openai.backend:OpenAIBackend",
    "trtllm": "gb10exp.backends.trtllm.backend:TRTLLMBackend",
}


def get_backend(cfg: BackendConfig) -> Backend:
    from gb10exp.config import ConfigError

    if cfg.name not in REGISTRY:
        raise ConfigError(f"backend.name={cfg.name!r} is not allowed: one of {sorted(REGISTRY)}")
    module, _, cls = REGISTRY[cfg.name].partition(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    allowed = [k for k in inspect.signature(backend_cls).parameters]
    for key in cfg.options:
        if key not in allowed:
            raise ConfigError(f"backend.options.{key} is not allowed for backend={cfg.name}: one of {allowed}")
    return backend_cls(**cfg.options)


__all__ = ["Backend", "BenchInputs", "REGISTRY", "get_backend"]
