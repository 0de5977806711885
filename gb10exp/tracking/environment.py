"""What a run ran with: library versions, code version (and, from ``gb10exp.hardware``, what it ran on).
Recorded as MLflow tags on every run, and parts of a run's identity (``gb10exp.tracking.identity``).

Only named facts are read; no environment variable is copied wholesale, so tokens and keys cannot leak.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from gb10exp import hardware

PACKAGES = ("torch", "transformers", "nvidia-modelopt", "hydra-core", "mlflow", "lm-eval", "llama-cpp-python",
            "tensorrt-llm")
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


def ray_node() -> dict[str, str]:
    """Which node of a Ray cluster runs this job (its id and IP), when it runs as a Ray task; {} otherwise.
    Ray is never imported here: a Ray worker has imported it already."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    if context.get_task_id() is None:  # a driver, not a task
        return {}
    return {"ray.node_id": context.get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}


def environment(device: torch.device) -> dict[str, str]:
    """The run's tags for what it ran on (``gb10exp.hardware.facts``, the Ray node) and with (Python, versions,
    commit)."""
    return hardware.facts(device) | ray_node() | {"python": platform.python_version(), "git_commit": _git_commit()} | {
        f"version.{p}": version(p) for p in PACKAGES}
