"""Every job of a sweep is one Ray task, on a running cluster (``address: HOST:PORT``) or a local Ray.

Why not hydra-ray-launcher (1.2.2, tried with Ray 2.60): it ``ray.get``s the jobs in order and raises at
the first one whose node died; the driver exits, Ray kills the jobs still running, the summary never prints.
Here a lost job is one failed job of the sweep: its MLflow run is marked KILLED at once, the other jobs go
on, the summary prints and the exit status is 1; rerunning the command runs only what is missing. Ray never
retries a job (``max_retries=0``): a retry would find its lost attempt's run still RUNNING, with a fresh
heartbeat, and take it for a live twin.

What each job gets from the driver, as task arguments (which Ray does not log):
- the driver's working directory: the job runs there, so relative paths (hydra.sweep.dir, the default
  ``sqlite:///mlruns/...`` store, data files) mean what they mean with the default launcher. Ray starts
  workers in the directory its node's ``ray start`` ran in; this directory must exist on every node (run
  from the checkout, at the same path on every node);
- the driver's values of the variables named in ``hydra.launcher.env`` (MLflow credentials, HF_TOKEN,
  GB10EXP_CACHE): a job on another node starts from the environment of that node's ``ray start``. Never
  ``runtime_env.env_vars`` for a secret: every node's runtime_env_agent log holds them in plain text.

What comes back: Hydra's JobReturn and the job's failure note (``failed.txt``, written where the job ran,
maybe another machine), which the driver writes into its own sweep folder for the summary.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from gb10exp.config import ConfigError
from gb10exp.report.summary import FAILED_FILE, mark_failed
from gb10exp.tracking import Recorder, liveness
from gb10exp.tracking.secrets import redact

log = logging.getLogger(__name__)


def connect(options: DictConfig) -> None:
    """Join the cluster at ``options.address`` (or start a local Ray), once per process."""
    if ray.is_initialized():
        return
    init = {k: v for k, v in OmegaConf.to_container(options.init, resolve=True).items() if v is not None}
    try:
        ray.init(address=options.address, logging_level=logging.WARNING, **init)
    except Exception as exc:  # ConnectionError, AuthenticationError, ValueError: all mean "cannot join"
        first = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise ConfigError(
            f"hydra.launcher.address={options.address!r}: cannot start or join Ray ({type(exc).__name__}: "
            f"{first[:300]}); start the cluster (ray start --head on the head, ray start --address on the others) "
            "and give the driver the cluster's token (RAY_AUTH_TOKEN_PATH=<token file>)"
        ) from None


def _nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def demand(options: DictConfig, device: str, cluster_gpus: float) -> dict[str, float]:
    """The resources one job asks for: CPUs, a GPU unless it runs on the CPU, custom resources."""
    gpus = options.num_gpus if device != "cpu" and cluster_gpus > 0 else 0
    need = {"CPU": float(options.num_cpus), **{k: float(v) for k, v in options.resources.items()}}
    return need | ({"GPU": float(gpus)} if gpus else {})


def _remote_options(options: DictConfig, need: dict[str, float]) -> dict[str, Any]:
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0), "resources": custom, "max_retries": 0,
            **OmegaConf.to_container(options.remote, resolve=True)}


def _describe(nodes: list[dict]) -> str:
    return ", ".join(
        f"{n['NodeManagerAddress']} {{{', '.join(f'{k}: {v:g}' for k, v in sorted(n['Resources'].items()) if 'memory' not in k and not k.startswith('node:'))}}}"
        for n in nodes
    )


def preflight(options: DictConfig, jobs: list) -> None:
    """Before any job is sent: the cluster (joined here, reused by ``launch``), and that some node has every
    job's resources (Ray would otherwise keep an impossible job pending forever)."""
    connect(options)
    nodes = _nodes()
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    for num, job in enumerate(jobs):
        if job.device.startswith("cuda") and not gpus:
            raise ConfigError(f"device={job.device!r} is not allowed on the Ray cluster at {options.address}: none "
                              f"of its {len(nodes)} node(s) has a GPU ({_describe(nodes)}); use device=auto or cpu")
        need = demand(options, job.device, gpus)
        if not any(all(n["Resources"].get(k, 0) >= v for k, v in need.items()) for n in nodes):
            raise ConfigError(f"hydra.launcher: job #{num} asks for {need}, more than any node of the Ray cluster at "
                              f"{options.address} has ({_describe(nodes)}); lower hydra.launcher.num_cpus, "
                              "num_gpus or resources, or add a node")


@ray.remote
def _run_job(hydra_context: Any, sweep_config: DictConfig, task_function: Any, singleton_state: dict, cwd: str,
             env: dict[str, str]) -> tuple[JobReturn, str | None]:
    """In the Ray worker: Hydra's job, in the driver's working directory and with the forwarded variables;
    both are restored afterwards (Ray reuses the worker for the sweep's next job)."""
    if not os.path.isdir(cwd):
        raise NotADirectoryError(f"the driver's working directory {cwd} does not exist on the Ray node "
                                 f"{ray.util.get_node_ip_address()}: run gb10exp from a folder that every node "
                                 "has at the same path (the checkout)")
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        setup_globals()
        Singleton.set_state(singleton_state)
        HydraConfig.instance().set_config(sweep_config)
        ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        note = Path(ret.hydra_cfg.hydra.runtime.output_dir) / FAILED_FILE
        return ret, note.read_text() if note.is_file() else None
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


@dataclass
class _Job:
    num: int
    config: DictConfig  # the job's composed config, hydra node included
    ref: Any  # the Ray ObjectRef of its result

    def output_dir(self, sweep_dir: Path) -> Path:
        return sweep_dir / str(self.config.hydra.sweep.subdir)


def launch(launcher: Any, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    config, options = launcher.config, launcher.options
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    connect(options)  # already joined by preflight, unless Hydra was called some other way
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    nodes = _nodes()
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    log.info("Launching %d jobs on Ray (%s: %s)", len(job_overrides), options.address, _describe(nodes))
    env = {name: os.environ[name] for name in options.env if name in os.environ}
    # Put once, passed by reference: pickling them per job costs ~0.2 s each on 2 cores.
    shared = [ray.put(launcher.hydra_context), ray.put(launcher.task_function), ray.put(Singleton.get_state())]
    stores: dict[str, Recorder] = {}
    jobs = []
    for num, overrides in enumerate(job_overrides, initial_job_idx):
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"ray_{num}"
            sweep_config.hydra.job.num = num
        _prepare_store(stores, sweep_config)
        need = demand(options, sweep_config.device, gpus)
        ref = _run_job.options(**_remote_options(options, need)).remote(
            shared[0], sweep_config, shared[1], shared[2], os.getcwd(), env)
        jobs.append(_Job(num, sweep_config, ref))
    return _gather(jobs, sweep_dir, stores)


def _prepare_store(stores: dict[str, Recorder], sweep_config: DictConfig) -> None:
    """Create each experiment once, here: jobs that start together on a basic-auth MLflow server and all
    create a new experiment race, and one of them gets 403 (the creator's permission is granted just after)."""
    tracking = OmegaConf.to_object(sweep_config.tracking)
    if repr(tracking) not in stores:
        stores[repr(tracking)] = Recorder(tracking)


def _gather(jobs: list[_Job], sweep_dir: Path, stores: dict[str, Recorder]) -> list[JobReturn]:
    """Each job's result as it arrives; a lost job becomes a failed one and the others go on."""
    pending = {job.ref: job for job in jobs}
    results: dict[int, JobReturn] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                results[job.num] = _result(job, sweep_dir, stores)
    except BaseException as exc:  # Ctrl-C or SIGTERM in the driver: stop every job, mark their runs KILLED
        # force=True: Ray 2.60's gentle cancel (a KeyboardInterrupt in the task) did not interrupt a running
        # job here; it finished minutes later. Killed, a job cannot mark its run: the driver does.
        for job in pending.values():
            ray.cancel(job.ref, force=True)
        signum = liveness.received()
        name = signal.Signals(signum).name if signum else type(exc).__name__
        for job in pending.values():
            _end_runs(job, sweep_dir, stores, f"stopped: {name} in the driver")
        if signum and not isinstance(exc, liveness.Interrupted):  # ray.wait turns it into a plain KeyboardInterrupt
            raise liveness.Interrupted(signum) from None
        raise
    return [results[job.num] for job in jobs]


def _result(job: _Job, sweep_dir: Path, stores: dict[str, Recorder]) -> JobReturn:
    try:
        ret, failure = ray.get(job.ref)
    except ray.exceptions.RayError as exc:
        return _lost(job, sweep_dir, stores, exc)
    note = job.output_dir(sweep_dir) / FAILED_FILE
    if failure and not note.is_file():  # the job ran on another machine
        mark_failed(str(note.parent), failure.strip())
    return ret


def _lost(job: _Job, sweep_dir: Path, stores: dict[str, Recorder], exc: Exception) -> JobReturn:
    """The job's node or worker died (or the task could not start): mark its MLflow run KILLED, if it got
    one, and leave the failure note; the job counts as failed, like one whose code raised."""
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps what the task raised
    first = (str(cause).strip().splitlines() or [""])[0]
    first = first.split(" This can happen")[0]  # Ray's generic advice after "... Node IP: X, node ID: Y."
    reason = redact(f"{type(cause).__name__}: {first}")[:400]
    ended = _end_runs(job, sweep_dir, stores, f"lost on Ray: {reason}")
    note = f"lost on Ray: {reason}" + (f" (run {', '.join(ended)} marked KILLED)" if ended else "")
    mark_failed(str(job.output_dir(sweep_dir)), note + "; rerun the same command to run it again")
    log.error("job #%d %s", job.num, note)
    ret = JobReturn(overrides=list(job.config.hydra.overrides.task), status=JobStatus.COMPLETED)
    ret.return_value = None  # as gb10exp's own job reports a failure: None, and failed.txt for the summary
    return ret


def _end_runs(job: _Job, sweep_dir: Path, stores: dict[str, Recorder], reason: str) -> list[str]:
    """Mark the job's RUNNING MLflow run (if it got one) KILLED with ``reason``; its process cannot."""
    tracking = OmegaConf.to_object(job.config.tracking)
    try:
        return stores[repr(tracking)].end_lost_runs({"sweep_dir": str(sweep_dir), "job_num": str(job.num)}, reason)
    except Exception as err:  # the store's trouble must not hide the job's
        log.warning("could not mark job #%d's run KILLED: %s", job.num, redact(str(err))[:200])
        return []
