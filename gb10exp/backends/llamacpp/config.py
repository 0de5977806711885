"""``backend=llamacpp`` options (``backend.options.*``): llama.cpp through llama-cpp-python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gb10exp.config import BackendConfig, _require


@dataclass
class LlamaCppOptions:
    gguf: str | None = None  # an existing GGUF file to run instead of building one from the model
    n_gpu_layers: int = -1  # -1: every layer on the GPU where one is present (the run records the offload)
    n_threads: int | None = None  # CPU threads (null: the cores this process may run on)
    allow_cpu: bool = False  # true: accept a CPU-only llama.cpp build on a machine that has a GPU
    # llama.cpp's AMX / weight-repacking CPU buffer types: auto = off on CPUs with AMX (llama-cpp-python 0.3.36
    # segfaults in decode with them there), on elsewhere | true | false
    extra_bufts: Any = "auto"

    def __post_init__(self) -> None:
        _require(self.extra_bufts == "auto" or isinstance(self.extra_bufts, bool), "backend.options.extra_bufts",
                 self.extra_bufts, "auto (off on CPUs with AMX, where llama-cpp-python 0.3.36 crashes with them), "
                 "true or false")
        _require(self.n_threads is None or self.n_threads > 0, "backend.options.n_threads", self.n_threads,
                 "null (this process's cores) or a positive number")
        _require(self.gguf is None or bool(self.gguf.strip()), "backend.options.gguf", self.gguf, "null or a GGUF file")


@dataclass
class LlamaCppBackendConfig(BackendConfig):
    name: str = "llamacpp"
    options: LlamaCppOptions = field(default_factory=LlamaCppOptions)
