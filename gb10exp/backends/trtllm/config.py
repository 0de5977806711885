"""``backend=trtllm`` options (``backend.options.*``): TensorRT-LLM's LLM API on the exported checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from gb10exp.config import BackendConfig, _require


@dataclass
class TRTLLMOptions:
    checkpoint: str | None = None  # an already exported checkpoint folder to serve instead of this run's model
    free_gpu_memory_fraction: float = 0.5  # of the free GPU memory, for TensorRT-LLM's KV cache
    max_batch_size: int = 8  # TensorRT-LLM queues requests beyond it (bench.batch_size is checked against it)
    keep_checkpoint: bool = False  # true: keep the exported checkpoint (under $GB10EXP_CACHE/trtllm/)

    def __post_init__(self) -> None:
        _require(0 < self.free_gpu_memory_fraction < 1, "backend.options.free_gpu_memory_fraction",
                 self.free_gpu_memory_fraction, "a fraction in (0, 1), e.g. 0.5")
        _require(self.max_batch_size > 0, "backend.options.max_batch_size", self.max_batch_size, "a positive number")


@dataclass
class TRTLLMBackendConfig(BackendConfig):
    name: str = "trtllm"
    options: TRTLLMOptions = field(default_factory=TRTLLMOptions)
