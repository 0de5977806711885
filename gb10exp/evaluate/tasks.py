"""Downstream accuracy with lm-evaluation-harness, on the already-quantized model in memory.

lm-eval's ``HFLM`` wraps the model object itself, so the fake-quantized layers stay in place (nothing is
saved or reloaded). Tasks are named in ``eval.tasks``: lm-eval's built-in tasks (which download their
data from the hub) or local ones, YAML files under ``eval.task_include_path`` whose data are local
files (``dataset_path: json`` with ``dataset_kwargs.data_files``). Relative ``data_files`` are resolved
against the YAML's own folder, so a task folder works from any working directory (``datasets`` alone
would resolve them against the working directory).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import torch

from gb10exp.config import Config, ConfigError, EvalConfig

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    # Indexing lm-eval's ~15k task YAMLs takes seconds: once per process and include folder.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _include_path(cfg: EvalConfig) -> str | None:
    return str(Path(cfg.task_include_path).expanduser().resolve()) if cfg.task_include_path else None


def check(cfg: Config) -> None:
    """Preflight: the task folder exists and every task name is known."""
    check_tasks(cfg.eval)


def check_tasks(cfg: EvalConfig) -> None:
    """Fail before quantizing when the task folder is missing or a task name is unknown."""
    if not cfg.tasks:
        return
    include = _include_path(cfg)
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"eval.task_include_path={cfg.task_include_path!r} is not allowed: no such folder; "
                          "give the folder of your lm-eval task YAMLs (relative paths start at the working "
                          "directory)")
    known = set(_task_manager(include).all_tasks)
    for name in cfg.tasks:
        if name not in known:
            where = f" or in {cfg.task_include_path}" if include else " (local tasks need eval.task_include_path)"
            raise ConfigError(f"eval.tasks={name!r} is not allowed: no such lm-eval task among its built-in tasks{where}")


def _resolve_files(files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list, or a dict of either) with relative paths that exist next to the
    YAML made absolute; anything else (globs, hub paths) is left to ``datasets``."""
    if isinstance(files, dict):
        return {split: _resolve_files(f, folder) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_files(f, folder) for f in files]
    if isinstance(files, str) and not Path(files).is_absolute() and (folder / files).exists():
        return str(folder / files)
    return files


def load_task_yaml(path: Path) -> dict:
    """A task YAML as lm-eval reads it (``include`` merged, ``!function`` resolved). lm-eval has no public
    loader: its private ``lm_eval.tasks._yaml_loader`` (0.4.10+) is used where it exists, else
    ``_load_yaml`` below, which implements the same two documented rules (tests/test_task_yaml.py compares them)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        return _load_yaml(path)
    return load_yaml(path, resolve_func=True)


def _load_yaml(path: Path, seen: frozenset[Path] = frozenset()) -> dict:
    """``include: other.yaml`` (a path or a list, relative to this file; this file's keys win) and
    ``!function module.name`` (``module.py`` next to this file), as lm-eval's task guide documents them."""
    import yaml

    path = path.expanduser().resolve()
    if path in seen:
        raise ValueError(f"include cycle at {path}")

    def function(loader: yaml.Loader, node: yaml.Node):
        module_name, _, attr = loader.construct_scalar(node).rpartition(".")
        spec = importlib.util.spec_from_file_location(module_name, path.parent / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, attr)

    class Loader(yaml.SafeLoader):  # safe: no arbitrary python/object tags
        pass

    Loader.add_constructor("!function", function)
    cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(cfg, dict):
        raise ValueError(f"expected a YAML mapping in {path}, got {type(cfg).__name__}")
    includes = cfg.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged |= _load_yaml(path.parent / inc if not Path(inc).is_absolute() else Path(inc), seen | {path})
    return merged | cfg


def _task_spec(name: str, manager) -> str | dict:
    """The task's name, or its full config with local data files made absolute."""
    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return name
    cfg = load_task_yaml(Path(entry.yaml_path))
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return name
    cfg["dataset_kwargs"]["data_files"] = _resolve_files(files, Path(entry.yaml_path).resolve().parent)
    return cfg


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``simple_evaluate``'s per-task results as flat metrics ``task/<task>/<metric>``. lm-eval names metrics
    ``<metric>,<filter>``: the default filter ``none`` is dropped, others become a suffix
    (``exact_match_strict-match``). Non-numeric entries (aliases, "N/A" standard errors) are skipped."""
    out: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            metric, _, filter_ = key.partition(",")
            suffix = "" if filter_ in ("", "none") else f"_{filter_}"
            out[f"task/{task}/{metric}{suffix}"] = float(value)
    return out


def run_tasks(model: torch.nn.Module, tokenizer: Any, cfg: EvalConfig, device: torch.device) -> dict[str, float]:
    """Run ``cfg.tasks`` through lm-eval on ``model`` as it is in memory; return ``task/<name>/<metric>``."""
    if not cfg.tasks:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(_include_path(cfg))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    metrics = task_metrics(simple_evaluate(model=lm, tasks=[_task_spec(name, manager) for name in cfg.tasks],
                                           task_manager=manager, limit=cfg.task_limit, log_samples=False))
    log.info("lm-eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics
