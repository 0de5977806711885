"""NVFP4 fake quantization on the CPU, through modelopt's own NVFP4 numerics.

modelopt 0.47 quantizes NVFP4 tensors with a Triton or CUDA kernel and refuses CPU tensors ("amax must
be a CUDA tensor for dynamic block quantization"). Its ``NVFP4QTensor.quantize``/``dequantize`` are plain
torch, though, and compute the same thing: an FP32 scale per tensor (amax / (6 * 448)), an FP8 E4M3
scale per block of 16 values, and FP4 E2M1 values. This adapter routes exactly that one case (CPU tensor,
E2M1 values, E4M3 block scales) through a round trip of ``NVFP4QTensor``; every other call goes to
modelopt's original operator untouched. benchmarks/nvfp4_cpu_vs_gpu.py checks on a GPU that both agree.
"""

from __future__ import annotations

import torch

_installed = False


def nvfp4_fake_quant(inputs: torch.Tensor, amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Quantize to NVFP4 and back (in float32, as modelopt's kernel computes), keeping dtype and shape."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    global_amax = amax.float().amax()
    if global_amax == 0:  # an all-zero tensor: the scales would divide by zero
        return torch.zeros_like(inputs)
    scale_2 = global_amax / (6.0 * 448.0)
    x = inputs.float()
    packed, scale, scale_2 = NVFP4QTensor.quantize(x, block_size, weights_scaling_factor_2=scale_2)
    out = packed.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: block_size})
    return out.to(inputs.dtype)


def enable_cpu_nvfp4() -> None:
    """Wrap modelopt's dynamic block quantization operator so CPU NVFP4 tensors take the path above."""
    global _installed
    if _installed:
        return
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant.dynamic_block_quantize_op

    def dynamic_block_quantize_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        # (num_bits, exponent_bits) = (4, 2) is E2M1; (8, 4) is the E4M3 block scale: NVFP4.
        nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if nvfp4 and not inputs.is_cuda and amax is not None:
            return nvfp4_fake_quant(inputs, amax, block_size)
        return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    # _dynamic_block_quantize_forward looks this module attribute up at call time.
    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_op
    _installed = True
