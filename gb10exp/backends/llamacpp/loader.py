"""The project's one way to build a llama.cpp model: ``load_llama``. Nothing else constructs
``llama_cpp.Llama``
(tests/test_llamacpp_loader.py fails on any other construction in gb10exp/, tests/ or benchmarks/).

Why: on Intel CPUs with AMX, llama-cpp-python 0.3.36 segfaults in ``llama_decode`` unless the model is loaded
with ``use_extra_bufts = False`` (llama.cpp's AMX / weight-repacking CPU buffer types), and a segfault kills
the whole process (a sweep, a pytest session). So the loader decides from the machine (``extra_bufts="auto"``:
off where /proc/cpuinfo lists AMX, on elsewhere, where the repacked Q4_K/Q4_0 kernels decode faster). Neither
``Llama(...)`` nor the server's settings expose the field; both build their parameters from
``llama_model_default_params()``, which ``set_extra_bufts`` wraps once per process. Imports nothing heavy (no
torch, no gb10exp package): the llama.cpp child process (``worker.py``, run by path) imports it as a module.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
EXTRA_BUFTS_CHOICES = ("auto", True, False)
_state = {"extra_bufts": True, "wrapped": False}


def _cpuinfo_field(name: str, cpuinfo: Path) -> str | None:
    """The value of ``cpuinfo``'s first ``name`` line (None: no such line, or the file cannot be read)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[-1] for line in lines if line.startswith(name)), None)


def amx_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """The AMX flags the CPU lists in ``cpuinfo`` (empty: no AMX, or the file cannot be read)."""
    return sorted(f for f in (_cpuinfo_field("flags", cpuinfo) or "").split() if f in AMX_FLAGS)


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from ``cpuinfo`` ("unknown" where it does not say)."""
    name = _cpuinfo_field("model name", cpuinfo)
    return "unknown" if name is None else name.strip()


def use_extra_bufts(choice: str | bool = "auto", cpuinfo: Path = CPUINFO) -> bool:
    """Whether llama.cpp may use its extra CPU buffer types: ``auto`` = not where the CPU has AMX."""
    if choice not in EXTRA_BUFTS_CHOICES or isinstance(choice, int) and not isinstance(choice, bool):
        raise ValueError(f"extra_bufts={choice!r} is not allowed: auto, true or false")
    return not amx_flags(cpuinfo) if choice == "auto" else bool(choice)


def describe(on: bool, choice: str | bool = "auto") -> str:
    """The run tag ``llamacpp.extra_bufts``: what was decided, and why."""
    if choice != "auto":
        return ("on" if on else "off") + " (backend.options.extra_bufts)"
    return "on (auto: this CPU has no AMX)" if on else "off (auto: this CPU has AMX)"


def set_extra_bufts(on: bool) -> None:
    """Every ``llama_cpp.Llama`` this process builds from now on loads with ``use_extra_bufts = on``."""
    import llama_cpp.llama_cpp as raw

    _state["extra_bufts"] = on
    if _state["wrapped"]:
        return
    original = raw.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = _state["extra_bufts"]
        return p

    raw.llama_model_default_params = params
    _state["wrapped"] = True


def load_llama(path: str | Path, extra_bufts: str | bool = "auto", cpuinfo: Path = CPUINFO, **kwargs):
    """A ``llama_cpp.Llama`` of the GGUF at ``path`` (``kwargs``: Llama's own), with the CPU buffer types
    this machine can run (``use_extra_bufts``)."""
    import llama_cpp

    set_extra_bufts(use_extra_bufts(extra_bufts, cpuinfo))
    return llama_cpp.Llama(str(path), **kwargs)
