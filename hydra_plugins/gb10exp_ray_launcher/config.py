"""The Ray launcher's options (``hydra.launcher.*``), typed; conf/hydra/launcher/ray_*.yaml fill them."""

# ruff: noqa: UP006, UP045  (OmegaConf 2.3 reads typing's Dict/List/Optional in structured configs)
# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules,
# where dataclasses would look up string annotations.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035

from hydra.core.config_store import ConfigStore

# The driver's values of these variables are set in every job (sent as a task argument, which Ray does not
# log). A job on another node does not inherit the driver's environment: Ray starts it from the environment
# of that node's `ray start`.
FORWARDED_ENV = [
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
    "HF_HOME",
    "GB10EXP_CACHE",
]


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.gb10exp_ray_launcher.ray_launcher.RayLauncher"
    # host:port of a running cluster's head (its GCS port, 6379 unless `ray start --head --port` said
    # otherwise); "local" starts a private Ray inside this process instead. null: not given.
    address: Optional[str] = None
    init: Dict[str, Any] = field(default_factory=dict)  # more ray.init() arguments (num_cpus for a local Ray...)
    num_cpus: float = 1  # per job; Ray also sets the job's OMP_NUM_THREADS (torch's threads) to it
    # Per job whose device is not cpu, when the cluster has GPUs (on a cluster without any, device=auto runs
    # on the CPU as it would on a machine without one).
    num_gpus: float = 1
    resources: Dict[str, float] = field(default_factory=dict)  # custom resources (`ray start --resources`)
    remote: Dict[str, Any] = field(default_factory=dict)  # other ray.remote() options (scheduling_strategy...)
    env: List[str] = field(default_factory=lambda: list(FORWARDED_ENV))


ConfigStore.instance().store(group="hydra/launcher", name="gb10exp_ray", node=RayLauncherConf,
                             provider="gb10exp")
