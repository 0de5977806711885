"""backend=trtllm where TensorRT-LLM cannot run (every CPU machine): one clear line; and its pure logic."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import TINY, run_gb10exp
from test_bench import tiny_llama

from gb10exp.backends import get_backend
from gb10exp.backends.trtllm.backend import checkpoint_decode_bytes
from gb10exp.bench.roofline import torch_decode_bytes
from gb10exp.config import BackendConfig, ConfigError, QFormatConfig

NO_TRTLLM = importlib.util.find_spec("tensorrt_llm") is None


@pytest.mark.skipif(not NO_TRTLLM, reason="TensorRT-LLM is installed here")
def test_missing_tensorrt_llm_fails_in_one_line_saying_how_to_get_it():
    backend = get_backend(BackendConfig(name="trtllm", options={}))
    with pytest.raises(ConfigError, match=r"backend=trtllm needs tensorrt_llm.*nvcr.io/nvidia/tensorrt-llm") as info:
        backend.check(QFormatConfig(name="nvfp4", modelopt_cfg="NVFP4_DEFAULT_CFG"))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not NO_TRTLLM, reason="TensorRT-LLM is installed here")
def test_cli_run_with_trtllm_exits_with_the_reason(tmp_path):
    out = run_gb10exp(*TINY, "qformat=bf16", "backend=trtllm", store=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "backend=trtllm needs tensorrt_llm" in out.stdout + out.stderr


def test_gguf_formats_are_refused_by_engines_that_cannot_run_them():
    gguf = QFormatConfig(name="gguf_q4_k_m", gguf_type="Q4_K_M")
    for name in ("trtllm", "hf"):
        with pytest.raises(ConfigError, match="qformat='gguf_q4_k_m' is not allowed with backend="):
            get_backend(BackendConfig(name=name, options={})).check(gguf)


def test_unknown_backend_option_is_rejected():
    with pytest.raises(ConfigError, match=r"backend.options.n_gpu_layer is not allowed for backend=llamacpp: one of"):
        get_backend(BackendConfig(name="llamacpp", options={"n_gpu_layer": 1}))


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_bytes_read_from_safetensors_headers(tmp_path, tied):
    model = tiny_llama(tied=tied).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert checkpoint_decode_bytes(tmp_path) == torch_decode_bytes(model)
