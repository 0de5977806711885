"""Does gb10exp's CPU NVFP4 path compute what modelopt's GPU kernel computes?

Run on a CUDA machine:  python benchmarks/nvfp4_cpu_vs_gpu.py --out results.json

1. Tensors: weight- and activation-shaped tensors (float32 and bfloat16) go through modelopt's NVFP4
   TensorQuantizer (the one NVFP4_DEFAULT_CFG inserts) on the GPU, and through gb10exp's CPU adapter
   (gb10exp.quant.nvfp4_cpu) on a CPU copy with the same amax; the outputs are compared element-wise.
2. A model: a small random Llama quantized with NVFP4_DEFAULT_CFG on the same calibration batch, once
   on the CPU (adapter) and once on the GPU (modelopt's kernel), in float32; logits are compared.
Prints a table and writes JSON. Without a GPU it says so and exits 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch


def nvfp4_quantizer(device: torch.device):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    entry = next(e for e in mtq.NVFP4_DEFAULT_CFG["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    return TensorQuantizer(QuantizerAttributeConfig(**entry["cfg"])).to(device)


def compare_tensor(name: str, x: torch.Tensor) -> dict:
    from gb10exp.quant.nvfp4_cpu import nvfp4_fake_quant

    quantizer = nvfp4_quantizer(x.device)
    with torch.no_grad():
        gpu = quantizer(x).cpu()
    amax = x.abs().amax().float().cpu()
    import modelopt.torch.kernels.quantization.gemm as triton_kernel

    direct = triton_kernel.fp4_fake_quant_block(x, amax.to(x.device)).cpu()  # the kernel, called directly
    cpu = nvfp4_fake_quant(x.cpu(), amax)  # the adapter, on a CPU copy
    cpu_module = nvfp4_quantizer(torch.device("cpu"))  # and through modelopt's module on the CPU
    with torch.no_grad():
        cpu_via_modelopt = cpu_module(x.cpu())
    diff = (gpu.float() - cpu.float()).abs()
    return {**boundary_report(x.cpu(), amax, diff > 0),
        "tensor": name, "dtype": str(x.dtype).removeprefix("torch."), "numel": x.numel(),
        "amax": amax.item(), "differing": int((diff > 0).sum()), "max_abs_diff": diff.max().item(),
        "modelopt_module_on_cpu_equals_adapter": bool(torch.equal(cpu_via_modelopt, cpu)),
        "gpu_module_equals_kernel_called_directly": bool(torch.equal(direct, gpu)),
        "quant_error_rms": (x.cpu().float() - cpu.float()).pow(2).mean().sqrt().item(),
    }


THRESHOLDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # E2M1 rounding boundaries


def boundary_report(x: torch.Tensor, amax: torch.Tensor, differs: torch.Tensor) -> dict:
    """Where the two paths disagree: how far |x|/block_scale sits from an E2M1 rounding boundary.
    A disagreement within a few float32 ulps of a boundary is last-bit arithmetic (division vs the
    kernel's division), not a different format."""
    if not differs.any():
        return {"differing_max_rel_distance_to_boundary": 0.0}
    s2 = amax.float() / (6.0 * 448.0)
    blocks = x.float().reshape(-1, 16)
    scale = (blocks.abs().amax(-1) / (6.0 * s2)).clamp(max=448.0).to(torch.float8_e4m3fn).float() * s2
    scaled = (blocks.abs() / scale[:, None]).reshape(-1)[differs.reshape(-1)]
    rel = ((scaled[:, None] - THRESHOLDS).abs() / THRESHOLDS).min(-1).values
    return {"differing_max_rel_distance_to_boundary": rel.max().item(),
            "differing_scaled_examples": scaled[:5].tolist()}


def compare_model(device: torch.device) -> dict:
    import modelopt.torch.quantization as mtq
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096)
    base = LlamaForCausalLM(config).float().eval()
    tokens = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(1))

    def quantized_logits(dev: torch.device) -> torch.Tensor:
        model = copy.deepcopy(base).to(dev)
        batch = tokens.to(dev)
        mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), lambda m: m(batch))
        with torch.no_grad():
            return model(batch).logits.float().cpu()

    cpu, gpu = quantized_logits(torch.device("cpu")), quantized_logits(device)
    with torch.no_grad():
        reference = base(tokens).logits.float()
    diff = (cpu - gpu).abs()
    return {
        "model": "random Llama 256x2 layers, float32, NVFP4_DEFAULT_CFG", "logits": cpu.numel(),
        "max_abs_diff_cpu_vs_gpu": diff.max().item(), "mean_abs_diff_cpu_vs_gpu": diff.mean().item(),
        "max_abs_change_vs_unquantized": (cpu - reference).abs().max().item(),
        "top1_agreement_cpu_vs_gpu": (cpu.argmax(-1) == gpu.argmax(-1)).float().mean().item(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this check compares the CPU path with modelopt's GPU kernel", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {
        "weight 4096x4096 (std 0.02)": torch.randn(4096, 4096, device=device, generator=g) * 0.02,
        "activation 8x512x4096 (outliers)": torch.randn(8, 512, 4096, device=device, generator=g)
        * torch.where(torch.rand(4096, device=device, generator=g) < 0.01, 20.0, 1.0),
    }
    from gb10exp.quant.nvfp4_cpu import cpu_nvfp4

    with cpu_nvfp4():  # modelopt's NVFP4 ops take the project's CPU path for CPU tensors, the kernel for CUDA ones
        rows = [compare_tensor(name, t.to(dtype)) for name, t in tensors.items()
                for dtype in (torch.float32, torch.bfloat16)]
        model = compare_model(device)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tensors": rows, "model": model}
    print(f"GPU: {result['gpu']}  torch {result['torch']}")
    print(f"{'tensor':36} {'dtype':9} {'values':>10} {'differ':>8} {'max |diff|':>11} {'amax':>8}")
    for r in rows:
        print(f"{r['tensor']:36} {r['dtype']:9} {r['numel']:>10} {r['differing']:>8} {r['max_abs_diff']:>11.3g} {r['amax']:>8.3g}")
    print("model:", json.dumps(model))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
