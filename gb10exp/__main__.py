"""Entry point: ``python -m gb10exp [group=option ...] [key=value ...]``.

Before Hydra launches anything, every job of the sweep (command-line sweeps and a preset's
hydra.sweeper.params alike) is composed and passes ``JOB_CHECKS``, so a typo in the last value of a
sweep fails in one line at once instead of after hours of earlier jobs, and nothing is recorded.

Exit status: 0 when every job finished (or was skipped as already done), 1 when any job failed,
2 for bad input caught before the first job, 130 / 143 after Ctrl-C / SIGTERM (the current run KILLED).
Everything the process prints or logs is redacted (gb10exp/tracking/secrets.py).
"""

from __future__ import annotations

import logging
import secrets as random_tokens
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gb10exp import checks
from gb10exp.config import Config, ConfigError, register_configs
from gb10exp.tracking import liveness, secrets

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Hydra's own flags and modes in which no job runs: no validation needed before them.
NO_JOB_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion")

log = logging.getLogger("gb10exp")
register_configs()
# ${sweep_uid:} in hydra.sweep.dir: a random suffix, drawn once per sweep (cached in the config, which Hydra
# copies into every job), so two sweeps started in the same second get different folders and sweep_ids.
OmegaConf.register_new_resolver("sweep_uid", lambda: random_tokens.token_hex(3), use_cache=True, replace=True)
_failed_jobs: list[int] = []  # jobs of this process that failed (the in-process launcher)


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


# The cheap checks every job of a sweep passes before the first job starts (in this order: the one a
# user fixes first comes first). Each takes the job's typed Config and raises a one-line ConfigError.
# Other modules add theirs here: ``def preflight_check(cfg: Config) -> None``.
def _lazy(target: str) -> Callable[[Config], None]:
    """A check named "module:function", imported when first called: `--help` must not import torch."""
    import importlib

    module, _, name = target.partition(":")

    def check(cfg: Config) -> None:
        getattr(importlib.import_module(module), name)(cfg)

    check.__name__ = name
    return check


JOB_CHECKS: list[Callable[[Config], None]] = [
    checks.check_device,
    checks.check_model,
    checks.check_store,
    checks.check_backend,
    _lazy("gb10exp.quant:preflight_check"),  # the format (recipe, auto budget, KV cache) can run here
    _lazy("gb10exp.backends.support:preflight_check"),  # engine x format x GPU
    _lazy("gb10exp.backends.trtllm.backend:preflight_check"),  # batch size within the engine's limit
    _lazy("gb10exp.quant.export:preflight_check"),  # export=true can work for this format
    _lazy("gb10exp.bench:preflight_check"),  # bench.depth within the evaluation text
    _lazy("gb10exp.tracking.identity:preflight_check"),  # uses_calibration: false really needs no data
    checks.check_context_length,
    checks.check_data,
]
SWEEPER_PARAMS = "hydra.sweeper.params."


def _parse(overrides: list[str]) -> list:
    """Hydra's override parser, one override at a time so that the error names the one at fault."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise ConfigError(f"cannot parse the override {override!r}: {'; '.join(lines)}") from None
    return parsed


def _sweep_params(compose, overrides: list) -> list[str]:
    """The sweep an ``+experiment=`` preset declares under hydra.sweeper.params, as overrides."""
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    hydra_cfg = _compose(compose, fixed, hydra=True).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.params) if hydra_cfg.sweeper.get("params") else {}
    return [f"{key}={value}" for key, value in (params or {}).items()]


def normalize(args: list[str]) -> list[str]:
    """``hydra.sweeper.params.qformat=bf16,int5`` (or ``='bf16,int5'``) means what ``qformat=bf16,int5``
    means (Hydra's sweeper puts its params before the command line); Hydra itself fails on it with an
    AssertionError, since the sweeper's params are null unless a preset sets them."""
    out = []
    for arg in args:
        if arg.startswith(SWEEPER_PARAMS) and "=" in arg:
            key, value = arg.removeprefix(SWEEPER_PARAMS).split("=", 1)
            if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            arg = f"{key}={value}"
        out.append(arg)
    return out


def sweep_jobs(args: list[str], compose) -> list[list[str]]:
    """Every job of the sweep ``args`` describe, as Hydra's BasicSweeper will run them: the preset's
    hydra.sweeper.params first, then the command line (a later value of a key replaces an earlier one)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = _check_options(_parse([a for a in args if not a.startswith("-")]))
    parsed = _check_options(_parse(_sweep_params(compose, overrides))) + overrides
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _check_options(overrides: list) -> list:
    """Unknown group options (``qformat=int5``) in one line; Hydra's own message spans many."""
    for o in overrides:
        group = o.key_or_group.removeprefix("+")
        options = _group_options(group)
        if options and not group.startswith("hydra"):  # launchers etc. also come from plugins
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in options:
                    raise ConfigError(f"{group}={value!r} is not allowed: one of {options}")
    return overrides


def preflight(args: list[str]) -> int:
    """Compose every job of the sweep that ``args`` describe and run ``JOB_CHECKS`` on each, before the
    first job starts; return the job count."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gb10exp.utils import check_writable

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            jobs = sweep_jobs(args, compose)
            for job in jobs:
                cfg = to_config(_compose(compose, list(job)))
                for check in JOB_CHECKS:
                    check(cfg)
            if jobs:  # Hydra would fail later with a traceback; one sweep folder for every job
                hydra_cfg = _compose(compose, list(jobs[0]), hydra=True).hydra
                check_writable(hydra_cfg.sweep.dir, "hydra.sweep.dir")
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)


def _compose(compose, overrides: list[str], hydra: bool = False) -> DictConfig:
    """Hydra's composition errors span lines (the hint, e.g. "use +experiment=...", is on the last); say
    them in one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose("config", overrides=overrides, return_hydra_config=hydra)
    except AssertionError as exc:  # OmegaConf asserts when an override sets a key inside a null node
        keys = [o for o in overrides if o.split("=")[0].count(".") > 1]
        if keys:
            raise ConfigError(f"{keys} set keys inside a node this option leaves null (qformat.auto.* needs "
                              "qformat=auto or auto_5bit; see --cfg job for the keys an option has)") from None
        raise ConfigError(f"{type(exc).__name__}: {exc} (see --help for groups, --cfg job for keys)") from None
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = str(exc.__cause__).strip().splitlines()[0] if exc.__cause__ and str(exc.__cause__).strip() else ""
        if cause and cause not in lines:  # the cause right after the headline, Hydra's hint (+key=...) last
            lines.insert(1, cause)
        message = " ".join(lines) or type(exc).__name__
        raise ConfigError(f"{message} (see --help for groups, --cfg job for keys)") from None


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
        _failed_jobs.append(hc.job.num)
        return None
    except Exception as exc:  # recorded as FAILED in MLflow already; the other jobs still run
        log.exception("job %s failed", hc.job.num)
        mark_failed(hc.runtime.output_dir, f"{type(exc).__name__}: {exc}")
        _failed_jobs.append(hc.job.num)
        return None
    return results.get("metrics", {}).get("perplexity")


def main() -> None:
    secrets.install()  # stdout, stderr and logging redacted from here on
    for arg in sys.argv[1:]:
        secrets.remember_in(arg)  # a URI's password is masked wherever it shows up later
    args = normalize(sys.argv[1:])
    if not any(a.split("=")[0] in NO_JOB_FLAGS for a in args):
        try:
            preflight(args)
        except ConfigError as exc:
            print(f"gb10exp: error: {secrets.redact(str(exc))}", file=sys.stderr)
            raise SystemExit(2) from None
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
