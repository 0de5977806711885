"""What a run ran on: hardware, library versions, git commit. Recorded as MLflow tags on every run.

Only named facts are read; no environment variable is copied wholesale, so tokens and keys cannot leak.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "nvidia-modelopt", "hydra-core", "mlflow", "lm-eval", "llama-cpp-python", "tensorrt-llm")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def nvfp4_native(device: torch.device) -> bool:
    """NVFP4 tensor cores exist from Blackwell on (compute capability 10.x, 12.x; GB10 is 12.1)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "cpu": _cpu_name(),
        "cpu_count": str(torch.get_num_threads()),
        "memory_gib": str(_memory_gib()),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device": device.type,
    }
    env |= {f"version.{p}": _version(p) for p in PACKAGES}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": str(round(props.total_memory / 2**30, 1)),
            "cuda": str(torch.version.cuda),
            "nvfp4": "native" if nvfp4_native(device) else "emulated",
        }
    else:
        env |= {"gpu": "none", "nvfp4": "emulated"}
    return env
