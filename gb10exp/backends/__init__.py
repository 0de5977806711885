"""Backends by short name, and the backend's preflight check. An unknown name fails with the valid ones."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gb10exp.backends.base import Backend, BenchInputs
from gb10exp.config import ConfigError
from gb10exp.models import load_tokenizer
from gb10exp.quant import formats

if TYPE_CHECKING:
    from gb10exp.config import BackendConfig, Config

# name -> (backend class, options schema) as "module:Class"; imported on demand, so that a missing optional
# engine only matters when it is chosen and --help never imports torch.
REGISTRY = {
    "hf": ("gb10exp.backends.hf.backend:HFBackend", "gb10exp.backends.hf.config:HFBackendConfig"),
    "llamacpp": ("gb10exp.backends.llamacpp.backend:LlamaCppBackend",
                 "gb10exp.backends.llamacpp.config:LlamaCppBackendConfig"),
    "openai": ("gb10exp.backends.openai.backend:OpenAIBackend", "gb10exp.backends.openai.config:OpenAIBackendConfig"),
    "trtllm": ("gb10exp.backends.trtllm.backend:TRTLLMBackend", "gb10exp.backends.trtllm.config:TRTLLMBackendConfig"),
}
_checked: dict[str, Backend] = {}


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def schemas() -> dict[str, type]:
    """Each backend's config schema (``BackendConfig`` with its typed options), by name."""
    return {name: _load(schema) for name, (_, schema) in REGISTRY.items()}


def build(cfg: BackendConfig) -> Backend:
    if cfg.name not in REGISTRY:
        raise ConfigError(f"backend.name={cfg.name!r} is not allowed: one of {sorted(REGISTRY)}")
    return _load(REGISTRY[cfg.name][0])(cfg.options)


def check(cfg: Config) -> None:
    """The backend is installed and serves this format; an engine with a model of its own serves the run's
    model; the batch size is within the engine's limit; a speed-only run has an engine that serves a model."""
    backend = build(cfg.backend)
    backend.check(formats.of(cfg.qformat, cfg.kv_cache_qformat), load_tokenizer(cfg.model) if cfg.eval.enabled else None)
    limit = backend.max_batch_size
    if cfg.bench.enabled and limit is not None and cfg.bench.batch_size > limit:
        raise ConfigError(f"bench.batch_size={cfg.bench.batch_size} is not allowed with backend={cfg.backend.name}: at "
                          f"most {limit} (the engine would queue the rest); lower bench.batch_size (or raise "
                          "backend.options.max_batch_size where the backend has it)")
    if not cfg.eval.enabled and backend.served_model is None:
        raise ConfigError(f"eval.enabled=false is not allowed with backend={cfg.backend.name}: speed-only runs time "
                          "what an engine serves; use backend=openai, or backend=llamacpp with "
                          "backend.options.gguf=FILE (or eval.enabled=true)")
    _checked[repr(cfg)] = backend


def checked(cfg: Config) -> Backend:
    """The backend ``check`` passed for this job (checked now if it was not, e.g. in a fresh process)."""
    if repr(cfg) not in _checked:
        check(cfg)
    return _checked.pop(repr(cfg))


__all__ = ["REGISTRY", "Backend", "BenchInputs", "build", "check", "checked", "schemas"]
