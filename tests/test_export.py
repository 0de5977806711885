"""export=true: modelopt's unified Hugging Face checkpoint of every modelopt format, written on the CPU by the
real modelopt export, then read back from the safetensors headers (dtypes, shapes, sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, cli_error, mlflow_runs, run_gb10exp

from gb10exp.config import Config, ConfigError, ModelConfig, QFormatConfig
from gb10exp.models import random_llama
from gb10exp.quant import bytes as qbytes
from gb10exp.quant import calibration_loop, formats, quantize
from gb10exp.quant.bytes import safetensors_header
from gb10exp.quant.export import check, check_model, serve_commands, summarize, write_checkpoint
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4

QFORMATS = {name: formats.load_qformat(name) for name in formats.options()}
FACTS = {name: formats.of(q) for name, q in QFORMATS.items()}
# Every modelopt format that runs on the CPU (the MX formats' E8M0 scales need modelopt's CUDA extension:
# preflight refuses them here, tests/test_recipes.py checks that).
MODELOPT = [n for n, f in FACTS.items() if f.kind == "modelopt" and not f.cuda_only]
# hidden 128 / intermediate 256: every linear input is a whole number of INT4's 128-value blocks
ARCH = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)
LAYER = "model.layers.0.mlp.down_proj"  # in 256, out 128


def quantized_tiny(qformat: QFormatConfig):
    model = random_llama(ARCH)  # architectures=None, as a config built in code
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    return quantize(model, qformat, calibration_loop(calib, 4, torch.device("cpu")))


def test_modelopt_formats_cover_the_conf_folder():
    assert len(MODELOPT) >= 7 and {"fp8", "nvfp4", "int4_awq"} <= set(MODELOPT)
    assert all(FACTS[n].quant_algo for n in MODELOPT)


@pytest.mark.parametrize("name", MODELOPT)
def test_every_modelopt_format_exports_on_the_cpu(tmp_path, name):
    qformat = QFORMATS[name]
    model = quantized_tiny(qformat)
    expected = qbytes.from_module(model, FACTS[name]).weight_bytes
    ckpt = write_checkpoint(model, None, tmp_path, quantized=True)

    # the support matrix is keyed by the derived quant_algo: modelopt's export writes exactly that
    assert ckpt.quant_algo == FACTS[name].quant_algo
    assert (
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"]
        == "modelopt"
    )
    tensors = safetensors_header(tmp_path / "model.safetensors")
    dtype = {k: v["dtype"] for k, v in tensors.items()}
    shape = {k: v["shape"] for k, v in tensors.items()}
    algo = FACTS[name].quant_algo
    if "NVFP4" in algo:  # two E2M1 values a byte, an E4M3 scale per block (16 inputs; 32 in W4A8), FP32 global
        block = 32 if algo == "W4A8_NVFP4_FP8" else 16
        assert (dtype[f"{LAYER}.weight"], shape[f"{LAYER}.weight"]) == ("U8", [128, 128])
        assert (dtype[f"{LAYER}.weight_scale"], shape[f"{LAYER}.weight_scale"]) == ("F8_E4M3", [128, 256 // block])
        assert (dtype[f"{LAYER}.weight_scale_2"], shape[f"{LAYER}.weight_scale_2"]) == ("F32", [])
        assert (f"{LAYER}.input_scale" in dtype) == (algo != "W4A16_NVFP4")  # W4A4 only
        if f"{LAYER}.input_scale" in dtype:
            assert dtype[f"{LAYER}.input_scale"] == "F32"
    elif algo == "FP8":
        assert dtype[f"{LAYER}.weight"] == "F8_E4M3" and shape[f"{LAYER}.weight"] == [128, 256]
        assert dtype[f"{LAYER}.weight_scale"] == dtype[f"{LAYER}.input_scale"] == "F32"
    else:  # INT4 AWQ / W4A8 AWQ: two INT4 values a byte, one scale per 128 inputs
        assert (dtype[f"{LAYER}.weight"], shape[f"{LAYER}.weight"]) == ("U8", [64, 256])
        assert shape[f"{LAYER}.weight_scale"] == [128, 2]
        assert (f"{LAYER}.input_scale" in dtype) == (algo == "W4A8_AWQ")
    # unquantized tensors are bf16 as on a GPU, not the CPU's float32
    assert (
        dtype["model.embed_tokens.weight"] == dtype["lm_head.weight"] == dtype["model.norm.weight"] == "BF16"
    )
    # the file holds what weight_gib counts (scales included), within the per-layer extras (AWQ
    # pre_quant_scale, FP32 INT4 scales on the CPU, global scales)
    assert ckpt.tensor_bytes == pytest.approx(expected, rel=0.06)
    assert ckpt.file_bytes > ckpt.tensor_bytes


def test_nvfp4_checkpoint_holds_the_fake_quantized_weights(tmp_path):
    """Unpacking the exported NVFP4 weight gives back the weight the fake-quantized model computed with, on
    all but a few values: the export derives block scales in another order of float32 operations, so a
    scale at an FP8 rounding boundary can land one step apart (50 of 32,768 values here, one FP4 step)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file

    model = quantized_tiny(QFORMATS["nvfp4"])
    layer = dict(model.named_modules())[LAYER]
    with torch.no_grad(), cpu_nvfp4():  # the CPU's NVFP4 numerics, as the runner's job is wrapped in
        simulated = layer.weight_quantizer(layer.weight).float()
    write_checkpoint(model, None, tmp_path, quantized=True)
    t = load_file(tmp_path / "model.safetensors")
    packed = NVFP4QTensor(torch.Size([128, 256]), torch.float32, t[f"{LAYER}.weight"])
    unpacked = packed.dequantize(
        dtype=torch.float32,
        scale=t[f"{LAYER}.weight_scale"],
        double_scale=t[f"{LAYER}.weight_scale_2"],
        block_sizes={-1: 16},
    )
    differ = unpacked != simulated
    assert differ.float().mean() < 0.005
    # at most one E2M1 step: the largest (4 to 6) is a third of the largest value
    assert (unpacked - simulated).abs().max() <= simulated.abs().max() / 3


def test_second_export_of_the_same_model_copies_the_first(tmp_path):
    model = quantized_tiny(QFORMATS["fp8"])
    first = write_checkpoint(model, None, tmp_path / "a", quantized=True)
    second = write_checkpoint(model, None, tmp_path / "b", quantized=True)  # weights are packed by now
    assert (second.tensor_bytes, second.quant_algo) == (first.tensor_bytes, "FP8")
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (
        tmp_path / "a" / "model.safetensors"
    ).read_bytes()


def _cfg(qformat: str, **arch) -> Config:
    model = ModelConfig(name="tiny", source="random", arch={**ARCH, **arch})
    return Config(
        model=model,
        qformat=QFORMATS[qformat],
        calib=None,
        eval=None,
        backend=None,
        tracking=None,
        export=True,
    )


def test_preflight_refuses_exports_that_cannot_work():
    check(_cfg("int4_awq"))  # 128 and 256 are whole blocks
    with pytest.raises(
        ConfigError,
        match=r"export=true is not allowed with qformat='int4_awq' on this model: "
        r"hidden_size .* = 64 is not a multiple of the format's weight block size 128",
    ):
        check(_cfg("int4_awq", hidden_size=64))
    check(_cfg("nvfp4", hidden_size=64))  # 64 is four NVFP4 blocks
    with pytest.raises(ConfigError, match=r"qformat='gguf_q4_k_m': it exports modelopt checkpoints"):
        check(_cfg("gguf_q4_k_m"))
    with pytest.raises(
        ConfigError, match=r"export_dir='/x' is not allowed: a folder, together with export=true"
    ):
        Config(model=None, qformat=None, calib=None, eval=None, backend=None, tracking=None, export_dir="/x")


def test_loaded_model_is_checked_before_quantization():
    model = random_llama({**ARCH, "intermediate_size": 192})
    with pytest.raises(ConfigError, match=r"down_proj.in_features = 192 is not a multiple .* block size 128"):
        check_model(model, _cfg("w4a8_awq"))
    check_model(model, _cfg("nvfp4"))  # 192 = 12 blocks of 16


def test_serve_commands_name_the_folder_and_vllm_quantization(tmp_path):
    model = quantized_tiny(QFORMATS["nvfp4_wo"])
    ckpt = write_checkpoint(model, None, tmp_path, quantized=True)
    trt, vllm, bench = serve_commands(
        ckpt, ["model=tiny_llama", "qformat=nvfp4_wo", "export=true", "backend=hf"]
    )
    assert trt == f"trtllm-serve {tmp_path.resolve()} --port 8000"
    assert vllm == f"vllm serve {tmp_path.resolve()} --port 8000 --quantization modelopt_fp4"
    assert bench == (
        "python -m gb10exp model=tiny_llama qformat=nvfp4_wo backend=openai "
        "backend.options.base_url=http://127.0.0.1:8000/v1 backend.options.prompt_format=tokens"
    )
    assert summarize(tmp_path, "x").quant_algo == "W4A16_NVFP4"


def test_cli_export_true_records_the_checkpoint_in_the_run(tmp_path):
    out = run_gb10exp(*TINY, "qformat=nvfp4", "export=true", store=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    (run,) = runs
    assert run.info.status == "FINISHED"
    folder = Path(run.data.tags["export.path"])
    assert folder == (tmp_path / "outputs" / "0" / "checkpoint").resolve()
    assert run.data.tags["export.quant_algo"] == "NVFP4"
    assert run.data.tags["support"] == "hf/cpu: emulated"
    assert json.loads((folder / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    assert (folder / "tokenizer.json").is_file()
    local = client.download_artifacts(run.info.run_id, "export/hf_quant_config.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["quantization"]["group_size"] == 16
    assert run.data.metrics["export_gib"] > run.data.metrics["export_tensor_gib"] > 0
    assert run.data.metrics["export_tensor_gib"] == pytest.approx(run.data.metrics["weight_gib"], rel=0.06)
    assert f"trtllm-serve {folder}" in out.stdout + out.stderr
    assert f"vllm serve {folder} --port 8000 --quantization modelopt_fp4" in out.stdout + out.stderr


def test_cli_export_of_a_block_misfit_fails_before_any_run(tmp_path):
    # The CLI's own check, before any job (cli_error asserts one line and that nothing was written).
    line = cli_error(*TINY, "qformat=int4_awq", "export=true", store=tmp_path)
    assert "export=true is not allowed with qformat='int4_awq' on this model: hidden_size" in line


@pytest.mark.slow
def test_export_check_script_passes_on_the_cpu(tmp_path):
    """benchmarks/export_check.py, the lead's GPU check, run here on its tiny CPU size."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "export_check.py"),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--tiny",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "export_check.json").read_text())
    assert summary["ok"] and [r["format"] for r in summary["results"]] == ["nvfp4", "fp8", "int4_awq"]
    assert [r["quant_algo"] for r in summary["results"]] == ["NVFP4", "FP8", "W4A16_AWQ"]
    assert (tmp_path / "export_check.log").is_file()
