"""Export nvfp4, fp8 and int4_awq of a random-weight small Llama and check the checkpoint files.

    python benchmarks/export_check.py                 # GPU if present; results under $OUT (or ./export_check)
    python benchmarks/export_check.py --out DIR --device cpu --tiny   # the CPU smoke version (seconds)

No network: the model is built from a LlamaConfig with seeded random weights, calibrated on random tokens,
quantized with gb10exp's modelopt path and exported with gb10exp.quant.export.write_checkpoint (the function
``export=true`` and the TensorRT-LLM backend use). For every format it checks, from the safetensors headers:
hf_quant_config.json's quant_algo; NVFP4: packed U8 weights [out, in/2], F8_E4M3 weight_scale [out, in/16],
F32 weight_scale_2 and input_scale; FP8: F8_E4M3 weights, F32 weight_scale and input_scale; INT4 AWQ: packed U8
weights [out/2, in] and a scale per 128 inputs; every unquantized tensor BF16; the tensors' bytes within 6% of
gb10exp's weight_gib count; and for NVFP4 how many unpacked weights differ from the fake-quantized ones.
Writes export_check.json and export_check.log; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gb10exp.quant import bytes as weight_bytes  # noqa: E402
from gb10exp.quant import calibration_loop, formats, quantize  # noqa: E402
from gb10exp.quant.bytes import safetensors_header  # noqa: E402
from gb10exp.quant.export import write_checkpoint  # noqa: E402
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4  # noqa: E402

FORMATS = {name: formats.load_qformat(name) for name in ("nvfp4", "fp8", "int4_awq")}  # conf/qformat/
SMALL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=1024,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)
LAYER = "model.layers.0.mlp.down_proj"
log = logging.getLogger("export_check")


def expected_tensors(algo: str, out_f: int, in_f: int) -> dict[str, tuple[str, list[int] | None]]:
    """(dtype, shape or None for any) of the test layer's tensors."""
    if algo == "NVFP4":
        return {
            "weight": ("U8", [out_f, in_f // 2]),
            "weight_scale": ("F8_E4M3", [out_f, in_f // 16]),
            "weight_scale_2": ("F32", []),
            "input_scale": ("F32", []),
        }
    if algo == "FP8":
        return {"weight": ("F8_E4M3", [out_f, in_f]), "weight_scale": ("F32", []), "input_scale": ("F32", [])}
    return {"weight": ("U8", [out_f // 2, in_f]), "weight_scale": (None, [out_f, in_f // 128])}


def check_one(name: str, arch: dict, device: torch.device, out: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    qformat = FORMATS[name]
    fmt = formats.of(qformat)  # quant_algo and bits, derived from the modelopt config
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(LlamaConfig(**arch)).to(device=device, dtype=dtype).eval()  # architectures None
    calib = torch.randint(0, arch["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    model = quantize(model, qformat, calibration_loop(calib, 4, device))
    quantize_s = time.perf_counter() - t0
    expected_bytes = weight_bytes.from_module(model, fmt).weight_bytes
    layer = dict(model.named_modules())[LAYER]
    with torch.no_grad():
        simulated = layer.weight_quantizer(layer.weight).float().cpu()
        compute_dtype = layer.weight.dtype  # bf16 on a GPU: the fake-quantized values are rounded to it
    t0 = time.perf_counter()
    ckpt = write_checkpoint(model, None, out / name, quantized=True)
    export_s = time.perf_counter() - t0

    checks: dict[str, bool] = {"quant_algo": ckpt.quant_algo == fmt.quant_algo}
    header = safetensors_header(out / name / "model.safetensors")
    for suffix, (want_dtype, want_shape) in expected_tensors(
        fmt.quant_algo, arch["hidden_size"], arch["intermediate_size"]
    ).items():
        info = header.get(f"{LAYER}.{suffix}")
        checks[f"{suffix}"] = (
            info is not None
            and (want_dtype in (None, info["dtype"]))
            and (want_shape is None or info["shape"] == want_shape)
        )
    checks["unquantized_bf16"] = all(
        header[k]["dtype"] == "BF16"
        for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    )
    ratio = ckpt.tensor_bytes / expected_bytes
    checks["size_vs_weight_gib"] = abs(ratio - 1) <= 0.06
    result = {
        "format": name,
        "quant_algo": ckpt.quant_algo,
        "checks": checks,
        "ok": all(checks.values()),
        "tensor_bytes": ckpt.tensor_bytes,
        "file_bytes": ckpt.file_bytes,
        "weight_gib_bytes": expected_bytes,
        "size_ratio": ratio,
        "dtypes": ckpt.dtypes,
        "quantize_s": quantize_s,
        "export_s": export_s,
        "layer": {
            k.removeprefix(LAYER + "."): [v["dtype"], v["shape"]]
            for k, v in header.items()
            if k.startswith(LAYER + ".")
        },
    }
    if fmt.quant_algo == "NVFP4":
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
        from safetensors.torch import load_file

        t = load_file(out / name / "model.safetensors")
        packed = NVFP4QTensor(simulated.shape, torch.float32, t[f"{LAYER}.weight"])
        unpacked = packed.dequantize(
            dtype=torch.float32,
            scale=t[f"{LAYER}.weight_scale"],
            double_scale=t[f"{LAYER}.weight_scale_2"],
            block_sizes={-1: 16},
        )
        # Compared in the model's dtype: FP4 x FP8 scale x F32 scale_2 is exact in float32, the fake-quantized
        # weight was rounded to bf16 on a GPU.
        differ = (unpacked.to(compute_dtype).float() != simulated).float().mean().item()
        result["nvfp4_unpacked_vs_fake_quant_differ_fraction"] = differ
        checks["nvfp4_unpacked_matches_fake_quant"] = differ < 0.01
        result["ok"] = all(checks.values())
    log.info("%s: %s %s (ratio %.4f)", name, "OK" if result["ok"] else "FAIL", checks, ratio)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "export_check"), help="results folder ($OUT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 0.2M-parameter model (CPU smoke test)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(out / "export_check.log", mode="w")],
    )
    device = torch.device(args.device)
    arch = TINY if args.tiny else SMALL
    import modelopt
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu {platform.processor()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modelopt": modelopt.__version__,
        "arch": arch,
    }
    log.info("%s", env)
    results = []
    # the checkpoints stay out of --out: a few hundred MB that only their headers matter for
    checkpoints = Path(tempfile.mkdtemp(prefix="export_check-"))
    for name in args.formats.split(","):
        try:
            with cpu_nvfp4():  # modelopt's NVFP4 ops on CPU tensors (the runner wraps every job alike)
                results.append(check_one(name, arch, device, checkpoints))
        except Exception as exc:  # one format failing must not hide the others
            log.exception("%s failed", name)
            results.append({"format": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    shutil.rmtree(checkpoints, ignore_errors=True)
    summary = {"env": env, "ok": all(r["ok"] for r in results), "results": results}
    (out / "export_check.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("all ok: %s -> %s", summary["ok"], out / "export_check.json")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
