"""GPU tests (opt-in: `make test-gpu` / `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cpu_nvfp4_weights_equal_modelopt_gpu_kernel(dtype=torch.float32):
    """The CPU adapter and modelopt's GPU kernel compute the same NVFP4 quantization. Not bit for bit:
    the Triton kernel divides in approximate float32, so the block scales can differ in the last bit
    and, for some tensors, a block scale lands on the other side of an FP8 rounding boundary (measured on
    an H100: benchmarks/results/nvfp4_gpu_diag.txt). What must hold: the two disagree far less than
    either differs from the unquantized weights. float32 only: the CPU path computes in float32; in
    bfloat16 many values sit exactly on an E2M1 boundary, where the kernel's division rounds them down."""
    import modelopt.torch.kernels.quantization.gemm as kernels

    from gb10exp.quant.nvfp4_cpu import nvfp4_fake_quant

    for seed in range(3):
        w = (torch.randn(1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) * 0.02)
        w = w.to(dtype)
        amax = w.abs().amax().float()
        gpu = kernels.fp4_fake_quant_block(w, amax).cpu().float()
        cpu = nvfp4_fake_quant(w.cpu(), amax.cpu()).float()
        quant_error = (w.cpu().float() - gpu).norm()
        assert (gpu - cpu).norm() < 0.1 * quant_error
        assert (w.cpu().float() - cpu).norm() == pytest.approx(quant_error.item(), rel=0.02)


def byte_level_tokenizer(folder) -> str:
    """A small BPE tokenizer trained here on CPython's docs: GPU machines may lack the embedded model."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(topics.values(), trainers.BpeTrainer(vocab_size=2000, special_tokens=["<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return str(folder)


@needs_cuda
def test_run_on_cuda_records_gpu_tags(tmp_path):
    from conftest import TINY, mlflow_runs, run_gb10exp

    tokenizer = byte_level_tokenizer(tmp_path / "tokenizer")
    out = run_gb10exp(*TINY, f"model.tokenizer={tokenizer}", "qformat=bf16,fp8,nvfp4", "device=cuda", store=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    tags = runs[0].data.tags
    assert tags["gpu"] == torch.cuda.get_device_name() and tags["compute_dtype"] == "bfloat16"
    major, minor = torch.cuda.get_device_capability()
    assert tags["hardware"] == f"{torch.cuda.get_device_name()} sm_{major}{minor}"
    nvfp4 = next(r.data.tags for r in runs if r.data.params["qformat.name"] == "nvfp4")
    assert nvfp4["nvfp4"] == "simulated" and "nvfp4" not in tags  # the hf backend simulates, even on Blackwell
    kl = {r.data.params["qformat.name"]: r.data.metrics["kl_mean"] for r in runs}
    assert kl["bf16"] == 0.0 and 0.0 < kl["fp8"] < kl["nvfp4"]
