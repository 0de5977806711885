"""What a run ran on: hardware, library versions, code version. Recorded as MLflow tags on every run, and
the machine-dependent parts of a run's identity (``gb10exp.tracking.identity``).

Only named facts are read; no environment variable is copied wholesale, so tokens and keys cannot leak.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = (
    "torch",
    "transformers",
    "nvidia-modelopt",
    "hydra-core",
    "mlflow",
    "lm-eval",
    "llama-cpp-python",
    "tensorrt-llm",
)
ROOT = Path(__file__).resolve().parents[2]  # the checkout holding gb10exp/ and conf/
CODE_DIRS = ("gb10exp", "conf")  # what computes a run's numbers; tests, docs and README do not


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _in_own_checkout(root: Path) -> bool:
    """False for an installed copy inside some other repository (site-packages under a project's .venv)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    return top is not None and Path(top.strip()).resolve() == root.resolve()


def _git_commit(root: Path = ROOT) -> str:
    """The commit, "-dirty" when tracked files anywhere differ (the record of the whole checkout)."""
    commit = _git(root, "rev-parse", "HEAD") if _in_own_checkout(root) else None
    if commit is None:
        return "unknown"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit.strip() + ("-dirty" if dirty and dirty.strip() else "")


def code_version(root: Path = ROOT) -> str:
    """The commit of the code that computes the numbers, with "-dirty" when tracked *or untracked*
    (not ignored) files under gb10exp/ or conf/ differ from it; "unknown" outside a git checkout."""
    commit = _git(root, "rev-parse", "HEAD") if _in_own_checkout(root) else None
    if commit is None:
        return "unknown"
    # --untracked-files=all: a new module or YAML changes results as surely as an edited one.
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *CODE_DIRS)
    return commit.strip() + ("-dirty" if status is None or status.strip() else "")


def code_digest(root: Path = ROOT) -> str:
    """sha256[:16] of every file under gb10exp/ and conf/ (names and contents, caches excluded): two
    different uncommitted states share the "-dirty" version but not this digest, and it works without git."""
    h = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


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


def hardware(device: torch.device) -> str:
    """What computed the numbers, as one comparable string: "NVIDIA H100 80GB HBM3 sm_90", or on the CPU
    its model and thread count ("cpu AMD EPYC 7B13 x2": float reductions split by thread can differ)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm_{props.major}{props.minor}"
    return f"cpu {_cpu_name()} x{torch.get_num_threads()}"


def fp4_tensor_cores(device: torch.device) -> bool:
    """NVFP4 tensor cores exist from Blackwell on (compute capability 10.x, 12.x; GB10 is 12.1). Having
    them says nothing about whether a run used them: see ``identity.quantization_tags``."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "hardware": hardware(device),
        "cpu": _cpu_name(),
        "cpu_count": str(torch.get_num_threads()),
        "memory_gib": str(_memory_gib()),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device": device.type,
    }
    env |= {f"version.{p}": version(p) for p in PACKAGES}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": str(round(props.total_memory / 2**30, 1)),
            "gpu_fp4_tensor_cores": str(fp4_tensor_cores(device)).lower(),
            "cuda": str(torch.version.cuda),
        }
    else:
        env |= {"gpu": "none"}
    return env
