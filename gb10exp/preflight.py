"""Before any job: expand the sweep, compose every job, and run the one ordered list of checks on each.

A typo in the last value of a sweep fails in one line at once, not after hours of earlier jobs, and
nothing is recorded. ``CHECKS`` is the only list of checks (each area's knowledge in one ``check(cfg)``);
``check_job`` runs it, here for every job of the sweep and in ``runner.prepare`` for the job it runs (in
the process that runs it: a Ray or SLURM node has its own files and GPUs), once per job and process.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
import re
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gb10exp import backends as backends_
from gb10exp import bench, config, data, hardware, models, quant, tracking
from gb10exp.backends import support
from gb10exp.config import Config, ConfigError
from gb10exp.evaluate import tasks
from gb10exp.quant import export
from gb10exp.utils import check_writable

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SWEEPER_PARAMS = "hydra.sweeper.params."

# The checks, in the order a user fixes them: each takes the job's typed Config and raises a one-line
# ConfigError naming the key, the value, what is allowed and how to fix it.
CHECKS: list[Callable[[Config], None]] = [
    hardware.check,  # the device exists here
    models.check,  # the model can be had: files, token, package
    tracking.check,  # the store can be written or reached
    backends_.check,  # the engine is installed, runs this format, takes this batch size and this mode
    quant.check,  # the format can be made here (KV cache, auto's candidates, CUDA-only scales)
    support.check,  # engine x format x GPU
    export.check,  # export=true can work for this format
    bench.check,  # bench.depth within the evaluation text
    tasks.check,  # the lm-eval tasks exist
    models.check_context,  # sequence lengths within the model's context
    data.check,  # the texts hold enough tokens for the samples, windows and prompts
]
_passed: set[str] = set()


def check_job(cfg: Config) -> None:
    """Every check of ``CHECKS`` on one job, once per job and process."""
    key = repr(cfg)
    if key in _passed:
        return
    for check in CHECKS:
        check(cfg)
    _passed.add(key)


def top_level_keys() -> str:
    """--help's list of top-level keys, read from the schema (``config.Config``: each field, its default and
    its comment), so it cannot drift from what the config accepts."""
    out, comment = [], []
    for line in inspect.getsource(Config).splitlines()[1:]:
        if line.strip().startswith("#"):
            comment.append(line.strip().lstrip("# "))
            continue
        found = re.match(r"^    (\w+): ([^=]+?) = ([^#]+?)\s*(?:#\s*(.*))?$", line)
        if found and not found.group(2).strip().endswith("Config"):
            name, _, default, note = found.groups()
            text = note or " ".join(comment)
            default = {"True": "true", "False": "false", "None": "null"}.get(default.strip(), default.strip().strip('"'))
            out.append(f"  {name}={default}".ljust(28) + text)
        comment = [] if not line.strip().startswith("#") else comment
        if line.strip().startswith("def "):
            break
    return "\n".join(out).replace("$", "$$")  # Hydra fills the template with string.Template


def register_configs() -> None:
    """Register the typed schemas with Hydra (YAML files in conf/ are validated against them): the whole
    tree once, and each backend's options under ``backend_schema/<name>`` (its YAML's defaults list)."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("gb10exp_keys"):  # --help's key list (conf/hydra/help/gb10exp.yaml)
        OmegaConf.register_new_resolver("gb10exp_keys", top_level_keys)
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for name, schema in backends_.schemas().items():
        store.store(group="backend_schema", name=name, node=schema)


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
    """OmegaConf.to_object silently drops keys added with ``+key=...``: a typo must fail, with the key that
    was probably meant."""
    schema = node._metadata.object_type
    if not dataclasses.is_dataclass(schema):
        return
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key} is not a key of {schema.__name__}{_closest(key, allowed, prefix)}: "
                              f"allowed {sorted(allowed)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, f"{prefix}{key}.")


def _closest(key: str, allowed: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {prefix}{near[0]}?)" if near else ""


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


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


def _parse(overrides: list[str]) -> list:
    """Hydra's override parser, one override at a time so that the error names the one at fault."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for i, override in enumerate(overrides):
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            hint = ""
            if "=" not in override and i and "=" in overrides[i - 1]:  # the shell split a value at a space
                hint = ("; it looks like the rest of a value with a space in it: quote the whole override, "
                        f"e.g. '{overrides[i - 1]} {override}'")
            raise ConfigError(f"cannot parse the override {override!r}: {'; '.join(lines)}{hint}") from None
    return parsed


def _check_options(overrides: list) -> list:
    """Unknown group options (``qformat=int5``) in one line; Hydra's own message spans many."""
    for o in overrides:
        group = o.key_or_group.removeprefix("+")
        options = group_options(group)
        if options and not group.startswith("hydra"):  # launchers etc. also come from plugins
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in options:
                    hint = _closest(value, options)
                    raise ConfigError(f"{group}={value!r} is not allowed{hint}: one of {options}")
    return overrides


def _sweep_params(compose, overrides: list) -> list[str]:
    """The sweep an ``+experiment=`` preset declares under hydra.sweeper.params, as overrides."""
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    hydra_cfg = _compose(compose, fixed, hydra=True).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.params) if hydra_cfg.sweeper.get("params") else {}
    return [f"{key}={value}" for key, value in (params or {}).items()]


def sweep_jobs(args: list[str], compose) -> list[list[str]]:
    """Every job of the sweep ``args`` describe, in the order Hydra's basic sweeper runs them: the preset's
    hydra.sweeper.params first, then the command line (a later value of a key replaces an earlier one),
    the cartesian product over the swept keys in their order."""
    overrides = _check_options(_parse([a for a in args if not a.startswith("-")]))
    values: dict[str, list[str]] = {}
    for o in _check_options(_parse(_sweep_params(compose, overrides))) + overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            values[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise ConfigError(f"{o.input_line!r} is not allowed: sweep discrete values (a,b,c, choice(...) or "
                              "range(...)); intervals need an optimizing sweeper")
    return [list(job) for job in itertools.product(*values.values())]


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
        raise ConfigError(_one_line(exc, overrides)) from None


def _one_line(exc: Exception, overrides: list[str]) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = str(exc.__cause__).strip().splitlines()[0] if exc.__cause__ and str(exc.__cause__).strip() else ""
    if cause and cause not in lines:  # the cause right after the headline, Hydra's hint last
        lines.insert(1, cause)
    message = " ".join(lines) or type(exc).__name__
    if "Could not override" in message and "+" in message:  # Hydra says "append with +key": that fails too
        key = next((o.split("=")[0] for o in overrides if f"'{o.split('=')[0]}'" in message), None)
        if key is not None and (CONF_DIR / key).is_dir():  # a group without a default: a preset
            value = next(o.split("=", 1)[1] for o in overrides if o.split("=")[0] == key)
            return (f"{key}={value}: {key} has no default to override; add it with +{key}={value} "
                    f"(the options are the files in conf/{key}/)")
        if key is not None and not key.startswith(("+", "hydra")):
            near = _nearest_key(key)
            return (f"{key} is not a key of the config{f' (did you mean {near}?)' if near else ''}; "
                    "see --cfg job for the keys")
    return f"{message} (see --help for groups, --cfg job for keys)"


def _nearest_key(key: str) -> str | None:
    """The existing config key closest to a mistyped dotted ``key`` (same parent), e.g. eval.num_window."""
    node: object = Config
    parts = key.split(".")
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = fields[part].type
        if isinstance(node, str):  # a string annotation (``from __future__ import annotations``)
            node = getattr(config, node.split("|")[0].strip(), None)
    names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    near = difflib.get_close_matches(parts[-1], names, n=1)
    return ".".join([*parts[:-1], near[0]]) if near else None


def check_launcher(launcher: DictConfig, jobs: list[Config]) -> None:
    """The launcher's own check of the whole sweep, when its class has one (``preflight(options, jobs)``):
    the Ray launcher joins its cluster and checks that some node has each job's resources."""
    from hydra.utils import get_class

    try:
        cls = get_class(launcher._target_)
    except Exception as exc:  # hydra.utils wraps the ImportError; its first line names the module
        raise ConfigError(f"hydra.launcher._target_={launcher._target_!r} cannot be imported "
                          f"({str(exc).strip().splitlines()[0]}); install the launcher's package") from None
    check = getattr(cls, "preflight", None)
    if check is not None:
        check(OmegaConf.masked_copy(launcher, [k for k in launcher if k != "_target_"]), jobs)


def preflight(args: list[str]) -> int:
    """Compose every job of the sweep that ``args`` describe and run ``check_job`` on each, before the first
    job starts; return the job count."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            jobs = sweep_jobs(args, compose)
            configs = []
            for job in jobs:
                configs.append(to_config(_compose(compose, list(job))))
                check_job(configs[-1])
            if jobs:  # Hydra would fail later with a traceback; one sweep folder for every job
                hydra_cfg = _compose(compose, list(jobs[0]), hydra=True).hydra
                check_writable(hydra_cfg.sweep.dir, "hydra.sweep.dir")
                check_launcher(hydra_cfg.launcher, configs)
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)
