"""Entry point: ``python -m gb10exp [group=option ...] [key=value ...]``.

Before Hydra launches anything, every job of the sweep is composed and checked (``gb10exp.preflight``), so
a bad value anywhere fails in one line at once and nothing is recorded. Then Hydra runs the jobs, each
``gb10exp.runner.run``.

Exit status: 0 when every job finished (or was skipped as already done), 1 when any job failed,
2 for bad input caught before the first job, 130 / 143 after Ctrl-C / SIGTERM (the current run KILLED).
Everything the process prints or logs is redacted (gb10exp/tracking/secrets.py).
"""

from __future__ import annotations

import logging
import secrets as random_tokens
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gb10exp.config import ConfigError
from gb10exp.preflight import CONF_DIR, normalize, preflight, register_configs, to_config
from gb10exp.report.summary import mark_failed
from gb10exp.runner import run
from gb10exp.tracking import liveness, secrets

# Hydra's own flags and modes in which no job runs: no validation needed before them.
NO_JOB_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion")

log = logging.getLogger("gb10exp")
register_configs()
# ${sweep_uid:} in hydra.sweep.dir: a random suffix, drawn once per sweep (cached in the config, which Hydra
# copies into every job), so two sweeps started in the same second get different folders and sweep_ids.
OmegaConf.register_new_resolver("sweep_uid", lambda: random_tokens.token_hex(3), use_cache=True, replace=True)
_failed_jobs: list[int] = []  # jobs of this process that failed (the in-process launcher)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _job(dcfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        cfg = to_config(dcfg)
        resolved = OmegaConf.to_container(dcfg, resolve=True)
        sweep_tags = {"sweep_id": Path(hc.sweep.dir).name, "sweep_dir": str(Path(hc.sweep.dir).resolve()),
                      "job_num": str(hc.job.num)}
        results = run(cfg, resolved, list(hc.overrides.task), sweep_tags)
    except ConfigError as exc:
        log.error("%s", exc)
        mark_failed(hc.runtime.output_dir, str(exc))
        _failed_jobs.append(hc.job.num)
        return None
    except Exception as exc:  # recorded as FAILED in MLflow already; the other jobs still run
        log.exception("job %s failed", hc.job.num)
        mark_failed(hc.runtime.output_dir, f"{type(exc).__name__}: {exc}")
        _failed_jobs.append(hc.job.num)
        return None
    return results.get("metrics", {}).get("perplexity")


def bad_input(args: list[str]) -> str | None:
    """The one line ``python -m gb10exp ARGS`` prints and exits 2 with when any job of the sweep cannot run
    (every job is checked: ``gb10exp.preflight``), else None."""
    if any(a.split("=")[0] in NO_JOB_FLAGS for a in args):
        return None
    try:
        preflight(args)
    except ConfigError as exc:
        return f"gb10exp: error: {secrets.redact(str(exc))}"
    return None


def main() -> None:
    secrets.install()  # stdout, stderr and logging redacted from here on
    for arg in sys.argv[1:]:
        secrets.remember_in(arg)  # a URI's password is masked wherever it shows up later
    args = normalize(sys.argv[1:])
    if (error := bad_input(args)) is not None:
        print(error, file=sys.stderr)
        raise SystemExit(2)
    sys.argv[1:] = args
    raise SystemExit(_run_sweep())


def _run_sweep() -> int:
    """Run Hydra; the exit status is non-zero whenever a job failed, even if the summary did too."""
    liveness.handle_signals()
    try:
        _job()
        status = 0
    except liveness.Interrupted as exc:
        print(f"gb10exp: stopped: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:  # raised before our handler was installed, or by a library
        print("gb10exp: stopped: Ctrl-C", file=sys.stderr)
        return 130
    except SystemExit as exc:  # Hydra's error path, or the summary's "some jobs failed"
        status = exc.code if isinstance(exc.code, int) else 1
    return status or (1 if _failed_jobs else 0)


if __name__ == "__main__":
    main()
