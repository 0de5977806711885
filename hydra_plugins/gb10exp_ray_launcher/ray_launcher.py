"""The Hydra side of gb10exp's Ray launcher, and the checks of its options; the work is in ``_core``, imported
only when a sweep is checked against its cluster or launched (it imports Ray)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

OWN_FIELDS = ("num_cpus", "num_gpus", "resources")  # hydra.launcher.<key>, not hydra.launcher.remote.<key>


def check_options(options: DictConfig) -> None:
    """What can be checked without Ray or the cluster, each in one line."""
    from gb10exp.config import ConfigError
    from gb10exp.tracking.secrets import SECRET_NAME

    if options.address is None:
        raise ConfigError("hydra.launcher.address=None is not allowed: give the head's host:port "
                          "(hydra.launcher.address=spark-1:6379, or export RAY_ADDRESS), or use hydra/launcher=ray_local")
    remote = OmegaConf.to_container(options.remote, resolve=True)
    for key in OWN_FIELDS:
        if key in remote:
            raise ConfigError(f"hydra.launcher.remote.{key} is not allowed: set hydra.launcher.{key} "
                              "(the launcher decides a job's GPUs from its device)")
    if remote.get("max_retries", 0) != 0:
        raise ConfigError(f"hydra.launcher.remote.max_retries={remote['max_retries']!r} is not allowed: only 0 "
                          "(a retried job would take its lost attempt's RUNNING run for a live one); rerun the "
                          "command instead: it runs only what is missing")
    for where, kwargs in (("init", OmegaConf.to_container(options.init, resolve=True)), ("remote", remote)):
        for name in (kwargs.get("runtime_env") or {}).get("env_vars") or {}:
            if SECRET_NAME.search(name):
                raise ConfigError(f"hydra.launcher.{where}.runtime_env.env_vars.{name} is not allowed: Ray writes "
                                  "runtime_env in plain text to every node's logs; add "
                                  f"{name} to hydra.launcher.env instead (sent with each task, never logged)")


def _core(options: DictConfig) -> Any:
    """``_core``, imported after the token settings are in the environment: Ray reads them when imported."""
    from gb10exp.config import ConfigError

    has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if options.address == "local" and not has_token:
        # Ray 2.60 turns token authentication on for a new local Ray and, given no token, saves one in
        # ~/.ray/auth_token for good; this one lives only in this process and the Ray it starts.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        has_token = True
    if has_token:
        # Given an address, Ray sends the token only with RAY_AUTH_MODE=token; without it a driver retries
        # "Unauthenticated" for ~20 s and fails with a bare ConnectionError.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        from hydra_plugins.gb10exp_ray_launcher import _core
    except ImportError as exc:
        raise ConfigError(f"hydra/launcher=ray_* is not allowed here: {exc}; install Ray with "
                          "pip install -e '.[ray]' (on the driver and on every node)") from None
    return _core


class RayLauncher(Launcher):
    def __init__(self, **options: Any) -> None:
        self.options = OmegaConf.create(options)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    @staticmethod
    def preflight(options: DictConfig, jobs: list) -> None:
        """Called by gb10exp.preflight before any job is sent: the options, then the cluster (joined here and
        kept for ``launch``): some node must have each job's resources."""
        check_options(options)
        _core(options).preflight(options, jobs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        check_options(self.options)
        return _core(self.options).launch(self, job_overrides, initial_job_idx)
