"""PLACEHOLDER for the export helper's support matrix (CONTRACT: ``gb10exp.backends.support``).

Only ``native_engines(qformat, arch)`` with the agreed signature, so that the report's recommendation can
be written and tested; the lead merges the export helper's full module (``lookup``, ``arch_of``, sources)
in its place. Entries follow /work/shared/FACTS.md (engines' format support read from their sources).
"""

from __future__ import annotations

from typing import Any

_GPU = ("ampere", "ada", "hopper", "blackwell", "gb10")
_NATIVE: dict[str, dict[str, tuple[str, ...]]] = {
    "bf16": {**{a: ("trtllm", "vllm", "llamacpp") for a in _GPU}, "cpu": ("llamacpp",)},
    "fp8": {a: ("trtllm", "vllm") for a in ("ada", "hopper", "blackwell", "gb10")},
    "nvfp4": {a: ("trtllm", "vllm") for a in ("blackwell", "gb10")},
    "nvfp4_wo": {a: ("vllm",) for a in ("blackwell", "gb10")},
    "int4": {a: ("trtllm",) for a in ("ampere", "ada", "hopper")},
    "int4_awq": {a: ("trtllm",) for a in ("ampere", "ada", "hopper")},
    "w4a8_awq": {a: ("trtllm",) for a in ("ada", "hopper")},
    "gguf_q4_k_m": {a: ("llamacpp",) for a in (*_GPU, "cpu")},
}


def native_engines(qformat: Any, arch: str) -> list[str]:
    """Engines that run ``qformat`` (a QFormatConfig or its name) with native kernels on ``arch``."""
    name = qformat if isinstance(qformat, str) else getattr(qformat, "name", str(qformat))
    return list(_NATIVE.get(name, {}).get(arch, ()))
