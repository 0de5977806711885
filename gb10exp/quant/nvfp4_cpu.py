"""NVFP4 fake quantization on the CPU, through modelopt's own NVFP4 numerics.

modelopt 0.47 quantizes NVFP4 tensors with a Triton or CUDA kernel and refuses CPU tensors ("amax must
be a CUDA tensor for dynamic block quantization"). Its ``NVFP4QTensor.quantize``/``dequantize`` are plain
torch, though, and compute the same thing: an FP32 scale per tensor (amax / (6 * 448)), an FP8 E4M3
scale per block of 16 values, and FP4 E2M1 values. This adapter routes exactly that one case (CPU tensor,
E2M1 values, E4M3 block scales) through a round trip of ``NVFP4QTensor``; every other call goes to
modelopt's original operator untouched. benchmarks/nvfp4_cpu_vs_gpu.py checks on a GPU that both agree.

The recipes with *static* weight scales (nvfp4_mse, nvfp4_local_hessian, nvfp4_four_over_six) call a
second Triton-only operator, ``static_blockwise_fp4_fake_quant``: per-block amax values chosen during
calibration, scaled to FP8 E4M3 block scales by modelopt's own (plain torch) ``scaled_e4m3_impl``, then
every value rounded to the nearest E2M1 magnitude with the Triton kernel's decision boundaries. On the CPU
``static_nvfp4_fake_quant`` computes the same in torch. MX formats stay refused: their only
implementation is a CUDA extension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def nvfp4_fake_quant(inputs: torch.Tensor, amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Quantize to NVFP4 and back (in float32, as modelopt's kernel computes), keeping dtype and shape."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    global_amax = amax.float().amax()
    if global_amax == 0:  # an all-zero tensor: the scales would divide by zero
        return torch.zeros_like(inputs)
    scale_2 = global_amax / (6.0 * 448.0)
    x = inputs.float()
    packed, scale, scale_2 = NVFP4QTensor.quantize(x, block_size, weights_scaling_factor_2=scale_2)
    out = packed.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2,
                            block_sizes={-1: block_size})
    return out.to(inputs.dtype)


# The decision boundaries of modelopt's ``fp4_round_magnitude`` (kernels/quantization/common/nvfp4_quant.py):
# a magnitude at a boundary goes to the value below it where the comparison is <=, above where it is <,
# which is round-half-to-even on E2M1 codes.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_UPPER = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # upper bound of each value's interval
_INCLUSIVE = (True, False, True, False, True, False, True)  # <= (True) or < (False) as in the kernel


def _round_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(magnitude, _E2M1[-1])
    for value, bound, inclusive in reversed(list(zip(_E2M1, _UPPER, _INCLUSIVE, strict=False))):
        below = magnitude <= bound if inclusive else magnitude < bound
        out = torch.where(below, torch.full_like(magnitude, value), out)
    return out


def static_nvfp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None = None,
                            quantize_block_scales: bool = True, fp8_max_for_normalization: float = 448.0,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4 with calibrated per-block amax (``amax.numel()`` blocks along the last dim), in float32."""
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl

    blocks = amax.numel()
    xf = x.float().reshape(blocks, -1)
    scale = amax.float().reshape(blocks, 1) / 6.0
    if quantize_block_scales:
        g = (amax.float().amax() if global_amax is None else global_amax.float()).reshape(())
        scale = scaled_e4m3_impl(scale, g * (448.0 / fp8_max_for_normalization) / 6.0)
    bad = (scale == 0) | ~torch.isfinite(scale)
    safe = torch.where(bad, torch.ones_like(scale), scale)
    q = _round_e2m1(xf.abs() / safe) * safe
    q = torch.where(xf >= 0, q, -q)
    q = torch.where(scale == 0, torch.zeros_like(q), q)
    return q.reshape(x.shape).to(out_dtype or x.dtype)


def _dynamic_op(original):
    def dynamic_block_quantize_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                                  scale_exponent_bits):
        # (num_bits, exponent_bits) = (4, 2) is E2M1; (8, 4) is the E4M3 block scale: NVFP4.
        nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if nvfp4 and not inputs.is_cuda and amax is not None:
            return nvfp4_fake_quant(inputs, amax, block_size)
        return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    return dynamic_block_quantize_op


def _static_op(original):
    def static_blockwise_fp4_fake_quant(x, amax, global_amax=None, quantize_block_scales=True,
                                        fp8_max_for_normalization=448.0, out_dtype=None, pass_through_bwd=False):
        if x.is_cuda:
            return original(x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization, out_dtype,
                            pass_through_bwd)
        # Calibration (MSE sweeps) only runs forwards, so no straight-through backward is needed here.
        return static_nvfp4_fake_quant(x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization,
                                       out_dtype)

    return static_blockwise_fp4_fake_quant


_depth = [0]


@contextlib.contextmanager
def cpu_nvfp4() -> Iterator[None]:
    """Inside the block, modelopt's two NVFP4 operators take the CPU path above for CPU tensors (every
    other call goes to the original); outside it, modelopt is as installed. Re-entrant: the outermost
    block restores. Everything that runs an NVFP4 model on the CPU (quantize, restore, evaluate, export)
    runs inside one: the runner wraps the whole job."""
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    # modelopt looks both module attributes up at call time (_dynamic_block_quantize_forward,
    # StaticBlockScaleQuantizer._fake_quantize), so replacing them reroutes every quantizer.
    originals = (tensor_quant.dynamic_block_quantize_op, tensor_quantizer.static_blockwise_fp4_fake_quant)
    if _depth[0] == 0:
        tensor_quant.dynamic_block_quantize_op = _dynamic_op(originals[0])
        tensor_quantizer.static_blockwise_fp4_fake_quant = _static_op(originals[1])
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            tensor_quant.dynamic_block_quantize_op, tensor_quantizer.static_blockwise_fp4_fake_quant = originals
