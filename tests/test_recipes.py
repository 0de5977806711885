"""Every qformat option (conf/qformat/, so a new YAML is covered by itself) composes and either runs a
real job on the CPU with the tiny model, with finite numbers and KL > 0 where it quantizes, or is refused
in one line before any work. qformat=auto meets its bit budget and records its per-layer choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from inprocess import client, compose, new_store, run_job

from gb10exp import backends, quant
from gb10exp.config import ConfigError
from gb10exp.quant import formats

OPTIONS = formats.options()
# Kept small so that every option runs in seconds to a minute on 2 shared cores.
AUTO_SIZE = ["qformat.auto.score_samples=1"]
REFUSED_ON_CPU = {  # option -> what its one-line refusal must say
    "mxfp4": "not allowed on the CPU",
    "mxfp6": "not allowed on the CPU",
    "mxfp8": "not allowed on the CPU",
}


def refusal(name: str) -> str | None:
    """What the one-line refusal of ``name`` on the CPU with backend=hf says (None: it runs). A GGUF type
    (gguf_q4_k_m, gguf_nvfp4, any new one) is llama.cpp's to quantize, never PyTorch's."""
    if formats.of(formats.load_qformat(name)).kind == "gguf":
        return "not allowed with backend=hf"
    return REFUSED_ON_CPU.get(name)


def _check(cfg) -> None:
    """What a job checks before loading anything: the qformat's machine check, then the backend's."""
    quant.check(cfg)
    backends.check(cfg)


def test_every_option_is_listed_and_described():
    assert len(OPTIONS) >= 21
    for name in OPTIONS:
        qf = formats.load_qformat(name)
        fmt = formats.of(qf)
        assert qf.name == name and qf.description and 0 < fmt.weight_bits <= 16
        if fmt.kind == "modelopt":  # a recipe of the installed modelopt, and what it exports as
            import modelopt.torch.quantization as mtq

            assert qf.modelopt_cfg in mtq.config.choices, qf.modelopt_cfg
        if fmt.kind in ("none", "gguf"):
            assert fmt.quant_algo is None


@pytest.mark.parametrize("name", OPTIONS)
def test_option_runs_on_cpu_or_is_refused_in_one_line(tmp_path: Path, name: str):
    auto = formats.of(formats.load_qformat(name)).kind == "auto"
    overrides = ["device=cpu", "cache=false", f"qformat={name}", *(AUTO_SIZE if auto else [])]
    cfg, _ = compose(["model=tiny_llama", *overrides])
    if refusal(name):
        with pytest.raises(ConfigError) as info:
            _check(cfg)
        message = str(info.value)
        assert "\n" not in message and f"qformat={name!r}" in message and refusal(name) in message
        return
    _check(cfg)
    results = run_job(overrides, new_store(tmp_path))
    metrics = results["metrics"]
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["perplexity"] > 1
    if formats.of(cfg.qformat).modelopt:
        assert metrics["kl_mean"] > 0 and metrics["top1_agreement"] < 1
    else:
        assert metrics["kl_mean"] == 0
    if auto:  # the budget holds and the choice is recorded, layer by layer
        budget = cfg.qformat.auto.effective_bits
        assert 4.5 <= metrics["effective_bits"] <= budget + 0.1
        text = client(tmp_path).download_artifacts(results["run_id"], "layer_formats.json", str(tmp_path))
        record = json.loads(Path(text).read_text())
        assert len(record["layers"]) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head is not searched
        assert set(record["layers"].values()) <= {"nvfp4", "fp8", "none"}
        assert record["bits"]["model.layers.0.self_attn.q_proj"] in (4.5, 8.0, 16.0)


@pytest.mark.parametrize("kv", ["fp8", "nvfp4"])
def test_kv_cache_formats_run_on_cpu(tmp_path: Path, kv: str):
    overrides = ["device=cpu", "cache=false", "qformat=fp8", f"kv_cache_qformat={kv}"]
    with_kv = run_job(overrides, new_store(tmp_path / "kv"))["metrics"]
    without = run_job(overrides[:-1], new_store(tmp_path / "plain"))["metrics"]
    assert (
        math.isfinite(with_kv["kl_mean"]) and with_kv["kl_mean"] != without["kl_mean"]
    )  # the cache is quantized


BAD = [
    (["qformat=bf16", "kv_cache_qformat=fp8"], "kv_cache_qformat='fp8' is not allowed with qformat=bf16"),
    (["qformat=auto", "kv_cache_qformat=fp8"], "kv_cache_qformat='fp8' is not allowed with qformat=auto"),
    (
        ["qformat=auto", "qformat.auto.effective_bits=4"],
        "qformat.auto.effective_bits=4.0 is not allowed: below the 4.5",
    ),
    (["qformat=auto", "qformat.auto.formats=[nvfp4,bf16]"], "'bf16' is kind=none"),
    (
        ["qformat=auto", "qformat.auto.formats=[nvfp4,mxfp8]", "device=cpu"],
        "qformat='mxfp8' is not allowed on the CPU",
    ),
    (
        ["qformat=auto", "qformat.auto.formats=[nvfp4,nvfp5]"],
        "qformat.auto.formats=['nvfp4', 'nvfp5'] is not allowed: 'nvfp5' is not a qformat option; one of [",
    ),
]


@pytest.mark.parametrize("args,message", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_preflight_refuses_in_one_line(args, message):
    cfg, _ = compose(["model=tiny_llama", *args])
    with pytest.raises(ConfigError) as info:
        quant.check(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["qformat=auto", "qformat.auto.method=hessian"], "qformat.auto.method='hessian' is not allowed"),
        (
            ["qformat=auto", "qformat.auto.effective_bits=17"],
            "qformat.auto.effective_bits=17.0 is not allowed",
        ),
        (["qformat=fp8", "qformat.gguf_type=Q4_K_M"], "qformat.gguf_type='Q4_K_M' is not allowed with "
                                                       "qformat.modelopt_cfg='FP8_DEFAULT_CFG': a format is quantized one way"),
    ],
)
def test_schema_rejects_bad_auto_settings(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        compose(["model=tiny_llama", *args])


def test_auto_weight_bits_of_each_quantizer():
    """The per-layer bits that effective_bits and weight_gib use: element bits + scale bits per block."""
    import modelopt.torch.quantization as mtq

    from gb10exp.models import random_llama
    from gb10exp.quant.auto import layer_choice
    from gb10exp.quant.nvfp4_cpu import cpu_nvfp4

    model = random_llama(num_hidden_layers=1, vocab_size=256)
    tokens = torch.randint(0, 256, (1, 32))
    expected = {
        "NVFP4_DEFAULT_CFG": 4.5,
        "FP8_DEFAULT_CFG": 8.0,
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": 4.125,
        "W4A8_NVFP4_FP8_CFG": 4.25,
    }
    import copy

    for name, bits in expected.items():
        with cpu_nvfp4():
            q = mtq.quantize(copy.deepcopy(model), copy.deepcopy(getattr(mtq, name)), lambda m: m(tokens))
        assert {c["bits"] for c in layer_choice(q).values()} == {bits}, name


def test_auto_settings_on_another_format_fail_in_one_line(tmp_path: Path):
    from conftest import run_gb10exp

    out = run_gb10exp("qformat=fp8", "qformat.auto.effective_bits=5", store=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "qformat.auto.* needs qformat=auto" in lines[0], out.stderr
