"""Entry point: ``python -m gb10exp [group=option ...] [key=value ...]``.

Before Hydra launches anything, every job of the sweep is composed and validated, so a typo in the
last value of a sweep fails in one line at once instead of after hours of earlier jobs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gb10exp.config import Config, ConfigError, register_configs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Hydra's own flags and modes in which no job runs: no validation needed before them.
NO_JOB_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion")

log = logging.getLogger("gb10exp")
register_configs()


def to_config(dcfg: DictConfig) -> Config:
    """The typed config (dataclasses, __post_init__ checks run); errors become one-line ConfigErrors."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        _reject_unknown_keys(dcfg)
        return OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        first = str(exc).splitlines()[0]
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise ConfigError(f"{key}: {first}") from None


def _reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """OmegaConf.to_object silently drops keys added with `+key=...`; a typo must fail instead."""
    import dataclasses

    schema = node._metadata.object_type
    if not dataclasses.is_dataclass(schema):
        return
    allowed = {f.name for f in dataclasses.fields(schema)}
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key} is not a key of {schema.__name__}: allowed {sorted(allowed)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, f"{prefix}{key}.")


def _group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preflight(args: list[str]) -> int:
    """Compose and validate every job of the sweep that ``args`` describes; return the job count."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    for o in parsed:  # unknown group options: Hydra's own message spans many lines
        group = o.key_or_group.removeprefix("+")
        options = _group_options(group)
        if options and not group.startswith("hydra"):  # launchers etc. also come from plugins
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in options:
                    raise ConfigError(f"{group}={value!r} is not allowed: one of {options}")
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    from gb10exp.models import check_model
    from gb10exp.tracking import check_store
    from gb10exp.utils import check_writable

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            for job in jobs:
                cfg = to_config(_compose(compose, list(job)))
                check_model(cfg.model)
                check_store(cfg.tracking)
            if jobs:  # Hydra would fail later with a traceback; one sweep folder for every job
                hydra_cfg = compose("config", overrides=list(jobs[0]), return_hydra_config=True).hydra
                check_writable(hydra_cfg.sweep.dir, "hydra.sweep.dir")
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)


def _compose(compose, overrides: list[str]) -> DictConfig:
    """Hydra's composition errors span lines and suggest `+key` for typos; say it in one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).splitlines()[0]
        cause = str(exc.__cause__).splitlines()[0] if exc.__cause__ else ""
        raise ConfigError(f"{first} {cause}".strip() + " (see --help for groups, --cfg job for keys)") from None
    except AssertionError:  # OmegaConf asserts when an override sets a key inside a null node
        keys = [o for o in overrides if o.split("=")[0].count(".") > 1]
        raise ConfigError(f"{keys} set keys inside a node this option leaves null (qformat.auto.* needs "
                          "qformat=auto or auto_5bit; see --cfg job for the keys an option has)") from None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _job(dcfg: DictConfig) -> float | None:
    from gb10exp.runner import run
    from gb10exp.tracking.summary import mark_failed

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
        return None
    except Exception as exc:  # recorded as FAILED in MLflow already; the other jobs still run
        log.exception("job %s failed", hc.job.num)
        mark_failed(hc.runtime.output_dir, f"{type(exc).__name__}: {exc}")
        return None
    return results.get("metrics", {}).get("perplexity")


def main() -> None:
    args = sys.argv[1:]
    if not any(a.split("=")[0] in NO_JOB_FLAGS for a in args):
        try:
            preflight(args)
        except ConfigError as exc:
            print(f"gb10exp: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    _job()


if __name__ == "__main__":
    main()
