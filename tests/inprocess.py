"""Run one job in this process (no Hydra launch, no 10-second interpreter start): compose the real
config with overrides, then call ``gb10exp.runner.run`` exactly as the entry point does."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gb10exp.config import Config

TINY = ["model=tiny_llama", "calib_size=4", "calib.seq_len=64", "eval.seq_len=64", "eval.num_windows=4",
        "bench.enabled=false"]


_TEMPLATE: list[Path] = []


def new_store(folder: Path) -> Path:
    """``folder`` with a ready MLflow SQLite store: a copy of one made per session, because creating
    MLflow's tables takes ~5 s each time."""
    if not _TEMPLATE:
        from mlflow.tracking import MlflowClient

        # One per pytest-xdist worker: the workers share the cache, and a copy must not catch one half made.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        template = Path(os.environ["GB10EXP_CACHE"]) / f"store-template-{worker}" / "mlflow.db"
        template.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        with sqlite3.connect(template) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file before copying
        _TEMPLATE.append(template)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(_TEMPLATE[0], folder / "mlflow.db")
    return folder


def fresh_cache(folder: Path, monkeypatch) -> Path:
    """An empty gb10exp cache that still shares the session's converted tokenizers (~12 s to rebuild)."""
    shared = Path(os.environ["GB10EXP_CACHE"]) / "tokenizers"
    shared.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizers").symlink_to(shared)
    monkeypatch.setenv("GB10EXP_CACHE", str(folder))
    return folder


def tracking(store: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_root={store}/artifacts"]


def compose(overrides: list[str]) -> tuple[Config, dict]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gb10exp.__main__ import CONF_DIR, to_config

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        dcfg = hydra_compose("config", overrides=overrides)
    return to_config(dcfg), OmegaConf.to_container(dcfg, resolve=True)


def run_job(overrides: list[str], store: Path) -> dict[str, Any]:
    from gb10exp.runner import run

    cfg, resolved = compose([*TINY, *tracking(store), *overrides])
    return run(cfg, resolved, overrides, {"sweep_id": "inprocess"})


def client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")


def all_runs(store: Path) -> list:
    c = client(store)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], order_by=["attributes.start_time ASC"])


def accuracy(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a rerun must reproduce exactly (timers, speeds, peak memory and offload reads excluded:
    they measure the process and the machine, not the model)."""
    return {k: v for k, v in metrics.items()
            if not k.endswith("_s") and "per_s" not in k and not k.startswith(("mem_", "offload_read"))}
