"""Backends by short name. An unknown name fails with the list of valid ones."""

from __future__ import annotations

import importlib

from gb10exp.backends.base import Backend, BenchInputs
from gb10exp.config import BackendConfig, ConfigError

# name -> "module:Class"; imported lazily so that a missing optional engine only matters when chosen.
REGISTRY = {
    "hf": "gb10exp.backends.hf.backend:HFBackend",
}


def get_backend(cfg: BackendConfig) -> Backend:
    if cfg.name not in REGISTRY:
        raise ConfigError(f"backend.name={cfg.name!r} is not allowed: one of {sorted(REGISTRY)}")
    module, _, cls = REGISTRY[cfg.name].partition(":")
    return getattr(importlib.import_module(module), cls)(**cfg.options)


__all__ = ["Backend", "BenchInputs", "REGISTRY", "get_backend"]
