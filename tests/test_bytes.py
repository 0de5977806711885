"""The one byte rule (gb10exp/quant/bytes.py): bytes a decode step reads, from three readers, the KV cache at
the step's depth, and the recommendation's GB10 projection, each against an independent hand count."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT

from gb10exp.config import QFormatConfig
from gb10exp.models import EMBEDDED, embedded_file, random_llama
from gb10exp.quant import bytes as qbytes
from gb10exp.quant import calibration_loop, formats, quantize

CPU = torch.device("cpu")
# The tiny Llama (gb10exp.models.TINY_ARCH) with a 300-token vocabulary. Per layer: q 64x64, k and v 64x32,
# o 64x64, gate/up/down 64x128 = 36,864 weights; 2 norms of 64 per layer and a final one; the table 300x64.
LINEAR, NORMS, TABLE = 2 * 36864, 2 * 2 * 64 + 64, 300 * 64
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 2  # K and V x 2 layers x 2 KV heads x head_dim 16 x 2 bytes
INT4 = formats.of(QFormatConfig(name="int4", modelopt_cfg="INT4_BLOCKWISE_WEIGHT_ONLY_CFG"))
NVFP4 = formats.of(QFormatConfig(name="nvfp4", modelopt_cfg="NVFP4_DEFAULT_CFG"))


def tiny(tied: bool):
    return random_llama(vocab_size=300, tie_word_embeddings=tied)


def test_tied_embeddings_count_once_and_the_16_bit_count():
    tied, untied = qbytes.from_module(tiny(True)), qbytes.from_module(tiny(False))
    assert tied.weight_bytes == (LINEAR + NORMS + TABLE) * 2  # float32 in memory, 16-bit deployed
    assert untied.weight_bytes == (LINEAR + NORMS + 2 * TABLE) * 2
    # A decode step reads one row of an untied input table, all of a tied one (it is the output head).
    assert qbytes.decode_step_bytes(tied) == tied.weight_bytes
    assert qbytes.decode_step_bytes(untied) == (LINEAR + NORMS + TABLE) * 2
    held = qbytes.from_module(tiny(False), dense_bits=None)  # as PyTorch holds it
    assert qbytes.decode_step_bytes(held) == (LINEAR + NORMS + TABLE) * 4 and held.kv_bytes_per_token == 2 * KV_PER_TOKEN


def test_the_kv_cache_read_at_the_steps_depth():
    t = qbytes.from_module(tiny(False))
    assert t.kv_bytes_per_token == KV_PER_TOKEN
    weights = (LINEAR + NORMS + TABLE) * 2
    assert qbytes.decode_step_bytes(t, context=1000) == weights + 1000 * KV_PER_TOKEN
    # each sequence of a batch has its own cache; the weights are read once per step
    assert qbytes.decode_step_bytes(t, context=1000, batch=4) == weights + 4 * 1000 * KV_PER_TOKEN
    fp8_kv = qbytes.from_module(tiny(False), NVFP4, kv_cache_qformat="fp8")
    assert fp8_kv.kv_bytes_per_token == KV_PER_TOKEN / 2


def test_quantized_tiny_model_matches_a_hand_count():
    model = tiny(False)
    samples = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(model, formats.load_qformat("int4"), calibration_loop(samples, 2, CPU))
    t = qbytes.from_module(model, INT4)
    # The 14 decoder linears at 4.125 bits (4 + a 16-bit scale per 128); embeddings, output head (modelopt
    # leaves lm_head alone) and norms at 16.
    assert t.weight_bytes == LINEAR * 4.125 / 8 + (NORMS + 2 * TABLE) * 2
    assert qbytes.decode_step_bytes(t) == LINEAR * 4.125 / 8 + (NORMS + TABLE) * 2
    # An engine-quantized format (no quantizers in PyTorch): every linear but the output head at its bits.
    q4 = formats.of(QFormatConfig(name="gguf_q4_k_m", gguf_type="Q4_K_M"))
    assert qbytes.from_module(tiny(False), q4).weight_bytes == pytest.approx(LINEAR * 4.85 / 8 + (NORMS + 2 * TABLE) * 2)


@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_folder_reads_as_its_module(tmp_path, tied):
    model = tiny(tied).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    folder, module = qbytes.from_safetensors(tmp_path), qbytes.from_module(model)
    assert folder.weight_bytes == module.weight_bytes
    assert qbytes.decode_step_bytes(folder, 512) == qbytes.decode_step_bytes(module, 512)


def test_a_gguf_file_reads_as_its_module():
    """The embedded SmolLM2-135M: its GGUF (Q4_1, tied embeddings) and the model transformers builds from it
    (the GGUF's own config; on the meta device: shapes, not 540 MB of dequantized weights) have the same KV
    geometry (30 layers, 3 KV heads of 64) and the same tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = embedded_file(EMBEDDED)
    gguf = qbytes.from_gguf(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        module = qbytes.from_module(AutoModelForCausalLM.from_config(config))
    assert gguf.kv_bytes_per_token == module.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert gguf.head == gguf.embed == "token_embd.weight" and module.head == module.embed  # tied
    assert qbytes.decode_step_bytes(gguf) == gguf.weight_bytes  # a tied table is the output head: read in full
    assert len(gguf.sizes) == 272 and len(module.sizes) == 272  # every tensor, the tied one once
    assert gguf.weight_bytes < module.weight_bytes / 2  # 4-bit Q4_1 on disk against the 16-bit deployed count


def test_llama3_8b_nvfp4_projection_matches_a_hand_count_and_the_readme():
    """The issue's case: the 8B shape in NVFP4 on GB10. By hand: 32 layers x (q 4096x4096, k and v 4096x1024,
    o 4096x4096, gate/up/down 4096x14336) at 4.5 bits, the untied 128256x4096 output head and 65 norms of 4096
    at 16 bits; the input table is not read (one row per token). GB10: 273 GB/s."""
    from gb10exp.report.recommend import _speed

    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    hand = linear * 4.5 / 8 + 128256 * 4096 * 2 + 65 * 4096 * 2
    model = random_llama({**formats_free_8b()}, device="meta")
    counted = qbytes.decode_step_bytes(qbytes.from_module(model, NVFP4_ENGINE))
    assert counted == hand
    assert round(hand / 1e9, 2) == 4.98 and "4.98 GB per step" in (ROOT / "README.md").read_text()

    class Run:  # what the recommendation reads of a run: its metrics and tags
        metrics, tags = {"decode_gib": counted / 2**30}, {"hardware": "cpu"}

    speed, kind, _ = _speed(type("Row", (), {"run": Run})(), "GB10", 273.0)
    assert kind == "projected" and speed == pytest.approx(273e9 / hand) and round(speed) == 55
    quoted = re.search(r"4\.98 GB per step: a bound of about (\d+) tokens/s", (ROOT / "README.md").read_text())
    assert quoted and int(quoted.group(1)) == 55


NVFP4_ENGINE = formats.of(QFormatConfig(name="gguf_nvfp4", gguf_type="NVFP4"))  # 4.5 bits, no quantizers needed


def formats_free_8b() -> dict:
    return {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256}
