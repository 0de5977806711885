"""``backend=hf`` options (``backend.options.*``): in-process PyTorch/transformers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gb10exp.config import BackendConfig, _require

MODES = ("fast", "static", "generate")


def is_choice(value: object) -> bool:
    """auto, true or false (0 and 1 are not: they would pass an ``in`` check as False and True)."""
    return value == "auto" or isinstance(value, bool)


@dataclass
class HFOptions:
    # fast: StaticCache + decode step compiled and captured in a CUDA graph (eager loop on a CPU);
    # static: generate(cache_implementation="static"); generate: plain eager generate
    mode: str = "fast"
    compare: list[str] = field(default_factory=list)  # more modes timed in the same run, metrics "<mode>.*"
    compile: Any = "auto"  # fast mode: torch.compile the decode step; auto = on CUDA only (CPU compiles take minutes)
    cuda_graph: bool = True  # fast mode on CUDA: replay the decode step as one CUDA graph (no host work per token)
    tuned: bool = False  # kept for old configs: the default fast path already compiles with Inductor autotuning
    # Programmatic Dependent Launch (Hopper and newer) in the compiled step: auto compiles both, times both and
    # keeps the faster (+2 to +9% on H200s, 0 to -3% on H100s: benchmarks/results/hf_decode_*.json)
    pdl: Any = "auto"
    # compile the native (Llama-like) step by layer: one layer tuned and reused for all. On an H100 (8B shape,
    # bf16, two calls on one machine) 25-29 s cold against 61-68 s for the whole step, as fast (172.8-173.3
    # against 168.0-172.9 tokens/s): benchmarks/results/cold_start_h100.log. false: the whole step, one graph
    regional: bool = True

    def __post_init__(self) -> None:
        for m in [self.mode, *self.compare]:
            _require(m in MODES, "backend.options.mode", m, f"one of {list(MODES)}")
        _require(is_choice(self.compile), "backend.options.compile", self.compile, "auto, true or false")
        _require(is_choice(self.pdl), "backend.options.pdl", self.pdl, "auto, true or false")


@dataclass
class HFBackendConfig(BackendConfig):
    name: str = "hf"
    options: HFOptions = field(default_factory=HFOptions)
