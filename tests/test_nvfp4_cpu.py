"""The CPU NVFP4 adapter computes NVFP4 exactly: checked against an independent implementation of the
format written here from its definition, and through modelopt's own quantizer module."""

from __future__ import annotations

import copy

import pytest
import torch

from gb10exp.models import random_llama
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4, nvfp4_fake_quant

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_nvfp4(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """NVFP4 from its definition: FP32 tensor scale s2 = amax/(6*448); per block of 16 an E4M3 scale
    s = fp8(block_amax / (6 * s2)); values rounded to the nearest E2M1 value (ties to the even code)."""
    s2 = x.abs().amax() / (6.0 * 448.0)
    blocks = x.reshape(-1, block)
    s = (blocks.abs().amax(-1) / (6.0 * s2)).to(torch.float8_e4m3fn).float()
    s[s == 0] = 1.0
    scaled = (blocks / (s * s2)[:, None]).abs().clamp(max=6.0)
    dist = (scaled[..., None] - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best  # on a tie both neighbours are nearest: take the even code (index)
    codes = torch.where(ties, torch.arange(8), torch.full((8,), 99)).remainder(2).eq(0) & ties
    index = torch.where(codes.any(-1), codes.float().argmax(-1), ties.float().argmax(-1))
    q = E2M1[index] * blocks.sign() * (s * s2)[:, None]
    return q.reshape(x.shape)


@pytest.mark.parametrize("shape,scale", [((64, 256), 0.02), ((4, 32, 128), 3.0), ((8, 1024), 1e-4)])
def test_adapter_matches_the_definition_exactly(shape, scale):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * scale
    ours = nvfp4_fake_quant(x, x.abs().amax())
    assert torch.equal(ours, reference_nvfp4(x))
    assert not torch.equal(ours, x)  # it does quantize
    assert len(torch.unique(ours.reshape(-1, 16)[0].abs())) <= 8  # at most the 8 E2M1 magnitudes per block


def test_ties_round_to_the_even_code():
    # amax 6: tensor scale 6/(6*448), block scale 448 (exact in E4M3), so values are scaled by exactly 1
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    q = nvfp4_fake_quant(values, torch.tensor(6.0))
    assert q[:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_zero_tensor_stays_zero_and_dtype_is_kept():
    assert torch.equal(nvfp4_fake_quant(torch.zeros(4, 16), torch.tensor(0.0)), torch.zeros(4, 16))
    x = torch.randn(4, 32).to(torch.bfloat16)
    assert nvfp4_fake_quant(x, x.abs().amax().float()).dtype == torch.bfloat16


def test_modelopt_nvfp4_runs_on_cpu_through_the_adapter():
    import modelopt.torch.quantization as mtq

    model = random_llama(num_hidden_layers=1, vocab_size=512)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    with cpu_nvfp4():
        quantized = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), lambda m: m(tokens))
    with torch.no_grad(), pytest.raises(AssertionError, match="amax must be a CUDA tensor"):
        quantized(tokens)  # outside the block, modelopt is as installed: it refuses CPU tensors
    with torch.no_grad(), cpu_nvfp4():
        after = quantized(tokens).logits
    assert torch.isfinite(after).all()
    assert 1e-4 < (after - before).abs().max().item() < 10.0
    # the weight the quantizer produces is exactly NVFP4 of the original weight
    layer = quantized.model.layers[0].mlp.down_proj
    with torch.no_grad(), cpu_nvfp4():
        qw = layer.weight_quantizer(layer.weight)
    assert torch.equal(qw, reference_nvfp4(layer.weight.detach()))
    from modelopt.torch.quantization import tensor_quant

    assert tensor_quant.dynamic_block_quantize_op.__module__ == "torch._ops.tensorrt"  # modelopt's own, restored


@pytest.mark.parametrize("shape,scale", [((64, 256), 0.02), ((8, 1024), 3.0)])
def test_static_scales_at_block_amax_give_the_definition(shape, scale):
    """The static-scale path (nvfp4_mse, nvfp4_local_hessian, nvfp4_four_over_six), fed each block's own
    amax and the tensor amax, is plain NVFP4: the same E2M1 value for every element; the scale products
    are rounded in another order (modelopt's scaled_e4m3_impl), so values agree to float32 ulps, whereas a
    different rounding decision would differ by a whole FP4 step (>= 1/6 of the block scale)."""
    from gb10exp.quant.nvfp4_cpu import static_nvfp4_fake_quant

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * scale
    block_amax = x.reshape(-1, 16).abs().amax(-1)
    ours = static_nvfp4_fake_quant(x, block_amax, x.abs().amax())
    assert torch.allclose(ours, reference_nvfp4(x), rtol=1e-6, atol=0)


def test_static_scales_below_block_amax_clip_to_six():
    from gb10exp.quant.nvfp4_cpu import static_nvfp4_fake_quant

    # One block, amax 6 (scale exactly 1 after FP8 rounding), a smaller chosen amax 3: scale 0.5, so the
    # largest representable magnitude is 3 and larger values clip there.
    values = torch.tensor([6.0, -5.0, 2.9, 0.1] + [0.0] * 12)
    q = static_nvfp4_fake_quant(values, torch.tensor([3.0]), torch.tensor(6.0))
    assert q[:4].tolist() == [3.0, -3.0, 3.0, 0.0]
    # four-over-six normalizes the FP8 block scales by 256 instead of 448: still exact here
    q46 = static_nvfp4_fake_quant(
        values, torch.tensor([6.0]), torch.tensor(6.0), fp8_max_for_normalization=256.0
    )
    assert q46[:4].tolist() == [6.0, -4.0, 3.0, 0.0]


def test_modelopt_static_nvfp4_recipes_run_on_cpu_through_the_adapter():
    import modelopt.torch.quantization as mtq

    model = random_llama(num_hidden_layers=1, vocab_size=512)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    errors = {}
    for name in ("NVFP4_DEFAULT_CFG", "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "NVFP4_FOUR_OVER_SIX_CFG"):
        with cpu_nvfp4():
            quantized = mtq.quantize(copy.deepcopy(model), copy.deepcopy(getattr(mtq, name)), lambda m: m(tokens))
            layer = quantized.model.layers[0].mlp.down_proj
            with torch.no_grad():
                after = quantized(tokens).logits
                qw = layer.weight_quantizer(layer.weight)
        assert torch.isfinite(after).all() and 1e-4 < (after - before).abs().max().item() < 10.0
        assert len(torch.unique(qw.reshape(-1, 16)[0].abs())) <= 8  # NVFP4 values in every block
        errors[name] = (qw - layer.weight).pow(2).sum().item()
    # The MSE sweep picks, per block, the scale with the least squared error, amax/6 among its candidates:
    # its weight error can only be lower than plain NVFP4's.
    assert errors["NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG"] < errors["NVFP4_DEFAULT_CFG"]
