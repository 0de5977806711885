"""Every file under conf/ (and every experiment preset) composes into a valid typed config, the CLI
shows its groups, and bad input fails in one line before any work, leaving nothing recorded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, TINY, cli_error, run_gb10exp
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gb10exp.__main__ import CONF_DIR, to_config
from gb10exp.config import Config, ConfigError

# Values for options whose YAML leaves a required key (???) for the user to fill in.
REQUIRED = {
    "model/hub": ["model.id=Qwen/Qwen2.5-0.5B-Instruct"],
    "model/local": ["model.path=/models/x"],
    "calib/text_file": ["calib.path=/data/x.txt"],
    "eval/text_file": ["eval.path=/data/x.txt"],
    "tracking/server": ["tracking.uri=http://127.0.0.1:5000"],
}


def config_files() -> list[Path]:
    """Every YAML under conf/, recursively, following the experiment symlink, except Hydra's own."""
    files = [p for p in CONF_DIR.rglob("*.yaml") if "hydra" not in p.relative_to(CONF_DIR).parts[:1]]
    files += sorted((ROOT / "experiments").rglob("*.yaml"))  # rglob does not follow the symlink
    return sorted(set(files))


def compose_overrides(path: Path) -> list[str]:
    if path.is_relative_to(ROOT / "experiments"):
        return [f"+experiment={path.relative_to(ROOT / 'experiments').with_suffix('').as_posix()}"]
    rel = path.relative_to(CONF_DIR).with_suffix("").as_posix()
    if rel == "config":
        return []
    group, _, option = rel.rpartition("/")
    return [f"{group}={option}", *REQUIRED.get(rel, [])]


@pytest.fixture(scope="module")
def composer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=overrides)
    GlobalHydra.instance().clear()


def test_the_walk_sees_every_group_and_nested_folder():
    files = config_files()
    groups = {p.relative_to(CONF_DIR).parts[0] for p in files if p.is_relative_to(CONF_DIR) and p.parent != CONF_DIR}
    assert {"model", "qformat", "calib", "eval", "backend", "tracking"} <= groups
    assert len([p for p in files if p.parent.name == "qformat"]) >= 22
    # the walk is recursive: count independently with os.walk (which follows nothing) over both trees
    import os

    expected = sum(
        1 for base in (CONF_DIR, ROOT / "experiments") for d, _, names in os.walk(base)
        if "hydra" not in Path(d).relative_to(base).parts for n in names if n.endswith(".yaml")
    )
    assert len(files) == expected


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_file_composes_and_validates(composer, path: Path):
    cfg = to_config(composer(compose_overrides(path)))
    assert isinstance(cfg, Config)
    assert cfg.calib_size > 0 and cfg.qformat.name and cfg.model.name


def test_qformats_map_to_modelopt_configs(composer):
    import modelopt.torch.quantization as mtq

    for path in sorted((CONF_DIR / "qformat").glob("*.yaml")):
        cfg = to_config(composer([f"qformat={path.stem}"]))
        assert cfg.qformat.name == path.stem  # the option name is the name users see in tables
        if cfg.qformat.modelopt_cfg is not None:
            assert isinstance(getattr(mtq, cfg.qformat.modelopt_cfg)["quant_cfg"], list)


def test_unknown_key_is_rejected(composer):
    with pytest.raises(ConfigError, match="model.not_a_key is not a key of ModelConfig"):
        to_config(composer(["+model.not_a_key=1"]))  # Hydra lets `+` add it; the schema does not


def test_help_lists_groups_and_options():
    out = run_gb10exp("--help")
    assert out.returncode == 0, out.stderr
    qformats = sorted(p.stem for p in (CONF_DIR / "qformat").glob("*.yaml"))
    assert "qformat: " + ", ".join(qformats) in out.stdout and "nvfp4_mlp_only" in qformats
    assert "model:" in out.stdout and "smollm2_135m" in out.stdout and "calib:" in out.stdout
    # Every top-level key of the schema, with its default, read from gb10exp/config.py (it cannot drift).
    import dataclasses

    from gb10exp.config import Config

    scalars = [f for f in dataclasses.fields(Config) if not f.type.endswith("Config")]
    assert {f.name for f in scalars} >= {"calib_size", "seed", "device", "export", "export_dir"}
    for f in scalars:
        assert re.search(rf"^  {f.name}=\S+ +\S", out.stdout, re.M), f.name
    assert "  export=false " in out.stdout and "  cache=true " in out.stdout and "$GB10EXP_CACHE" in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = run_gb10exp("qformat=fp8", "calib_size=64", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "modelopt_cfg: FP8_DEFAULT_CFG" in out.stdout and "calib_size: 64" in out.stdout


BAD_INPUT = [
    (["qformat=nvfp44"], "qformat='nvfp44' is not allowed (did you mean nvfp4?): one of ['auto', 'auto_5bit', 'bf16'"),
    (["qformat=nvfp4,int5"], "qformat='int5' is not allowed"),
    (["calib_size=0"], "calib_size=0 is not allowed: a positive number of calibration samples"),
    (["calib_size=64,-5"], "calib_size=-5 is not allowed"),  # the bad job fails before the good one runs
    (["calib_size=abc"], "calib_size"),
    (["model=local", "model.path=/nonexistent/model"], "model.path='/nonexistent/model' is not allowed: it does not exist"),
    (["device=tpu"], "device='tpu' is not allowed: auto, cpu, cuda or cuda:N"),
    (["kv_cache_qformat=int3"], "kv_cache_qformat='int3' is not allowed"),
    (["eval.num_windows=0"], "eval.num_windows=0 is not allowed"),
    # a typo'd key: Hydra's hint to append it with "+" would fail too; the closest key is named instead
    (["model.not_a_key=1"], "model.not_a_key is not a key of the config; see --cfg job for the keys"),
    (["eval.num_window=8"], "eval.num_window is not a key of the config (did you mean eval.num_windows?)"),
    (["eval.path=/my", "dir/x.txt"], "it looks like the rest of a value with a space in it: quote the whole "
                                     "override, e.g. 'eval.path=/my dir/x.txt'"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_fails_in_one_line_before_any_work(tmp_path, args, message):
    assert message in cli_error(*args, store=tmp_path)


def test_gated_model_without_token_fails_before_loading(tmp_path, monkeypatch):
    for key, value in {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    line = cli_error("model=llama3_1_8b_instruct", store=tmp_path)
    assert "model.id='meta-llama/Llama-3.1-8B-Instruct' is gated and HF_TOKEN is not set" in line


def test_dataset_unreachable_offline_fails_without_a_run(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    # Both libraries read these variables when first imported, which an earlier test of this process may have
    # done: without the lines below, the check went to the network and waited ~20 s for its retries to fail,
    # and a wikitext in this machine's own cache would have been found.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    line = cli_error(*TINY, "qformat=fp8", "calib=wikitext2", store=tmp_path)  # caught in preflight, before any job
    assert "calib.dataset could not load wikitext/wikitext-2-raw-v1 (train) offline" in line


def test_config_error_type_is_one_line():
    with pytest.raises(ConfigError) as info:
        Config(calib_size=-1)
    assert "\n" not in str(info.value)
