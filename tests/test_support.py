"""The support matrix: complete, sourced, consistent with the issue's upstream facts, rendered into the docs
from the data, and enforced in one line by the preflight check."""

from __future__ import annotations

import pytest
from conftest import ROOT
from test_export import FACTS as QFORMATS

from gb10exp import hardware
from gb10exp.backends import support
from gb10exp.backends.support import ALGOS, ARCHS, ENGINES, MATRIX, lookup, native_engines
from gb10exp.config import ConfigError
from gb10exp.quant.formats import Format

DOC = ROOT / "docs" / "export_and_support.md"


def test_every_cell_exists_with_a_status_and_a_source():
    for engine in ENGINES:
        assert set(MATRIX[engine]) == set(ALGOS)
        for algo in ALGOS:
            for arch in ARCHS:
                cell = MATRIX[engine][algo][arch]
                assert cell.status in ("native", "emulated", "unsupported")
                assert cell.source and ("/" in cell.source)  # a repository path or URL


@pytest.mark.parametrize(
    "engine,algo,arch,status",
    [  # TensorRT-LLM (re-checked 2026-12-05): W4A16_NVFP4 on sm_120/121 since PR #16511; NVFP4_AWQ on
        # Blackwell's NVFP4 kernels; NVFP4 (W4A4) not on Hopper; int4 AWQ fixed for sm_120/121 (PR #11561);
        # W4A8 AWQ has no sm_120/121 kernels
        ("trtllm", "W4A16_NVFP4", "gb10", "native"),
        ("trtllm", "NVFP4_AWQ", "blackwell", "native"),
        ("trtllm", "NVFP4", "gb10", "native"),
        ("trtllm", "NVFP4", "hopper", "unsupported"),
        ("trtllm", "W4A16_AWQ", "gb10", "native"),
        ("trtllm", "W4A8_AWQ", "gb10", "unsupported"),
        ("trtllm", "W4A16_AWQ", "hopper", "native"),
        ("trtllm", "W4A8_AWQ", "ampere", "unsupported"),
        ("trtllm", "FP8", "ada", "native"),
        ("trtllm", "FP8", "ampere", "unsupported"),
        ("trtllm", "none", "cpu", "unsupported"),
        # vLLM's modelopt loader: FP8 (>= sm_89), NVFP4, W4A16_NVFP4; never the AWQ algos
        ("vllm", "FP8", "hopper", "native"),
        ("vllm", "NVFP4", "gb10", "native"),
        ("vllm", "NVFP4", "hopper", "emulated"),
        ("vllm", "W4A16_NVFP4", "gb10", "native"),
        ("vllm", "W4A16_AWQ", "hopper", "unsupported"),
        ("vllm", "W4A8_AWQ", "ada", "unsupported"),
        ("llamacpp", "GGUF", "cpu", "native"),
        # llama.cpp: its converter repacks modelopt NVFP4 into GGML_TYPE_NVFP4; FP4 tensor cores only on sm_120/121
        ("llamacpp", "NVFP4", "gb10", "native"),
        ("llamacpp", "NVFP4", "cpu", "emulated"),
        ("llamacpp", "NVFP4_AWQ", "gb10", "unsupported"),
        ("llamacpp", "W4A16_AWQ", "cpu", "unsupported"),
        ("ollama", "GGUF", "gb10", "native"),
        ("hf", "NVFP4", "cpu", "emulated"),
        ("hf", "none", "cpu", "native"),
        ("hf", "GGUF", "hopper", "unsupported"),
    ],
)
def test_cells_agree_with_the_upstream_sources(engine, algo, arch, status):
    assert lookup(engine, algo, arch).status == status


def test_lookup_by_qformat_and_native_engines():
    assert lookup("trtllm", QFORMATS["nvfp4"], "gb10").status == "native"
    assert lookup("llamacpp", QFORMATS["gguf_q4_k_m"], "ampere").status == "native"
    assert lookup("trtllm", QFORMATS["bf16"], "hopper").status == "native"
    assert native_engines(QFORMATS["nvfp4_wo"], "gb10") == ["trtllm", "vllm", "llamacpp"]
    assert native_engines(QFORMATS["nvfp4"], "gb10") == ["trtllm", "vllm", "llamacpp"]
    assert native_engines(QFORMATS["int4_awq"], "hopper") == ["trtllm"]
    assert lookup("trtllm", "W4A16", "hopper").note.endswith("is not in the matrix")


@pytest.mark.parametrize(
    "cap,arch",
    [
        ((9, 0), "hopper"),
        ((10, 0), "blackwell"),
        ((10, 3), "blackwell"),
        ((12, 1), "gb10"),
        ((8, 9), "ada"),
        ((8, 6), "ampere"),
        ((8, 0), "ampere"),
        ((7, 5), "turing"),  # T4: in the device table, not a column of the support matrix
        ((7, 0), "sm_70"),
    ],
)
def test_arch_of_capability(cap, arch):
    assert hardware.capability_arch(cap) == arch


def test_arch_of_cpu():
    assert hardware.arch("cpu") == "cpu"


def test_unsupported_combination_is_refused_in_one_line_with_what_works_instead():
    with pytest.raises(ConfigError) as info:
        support.refuse("trtllm", QFORMATS["nvfp4"], "hopper")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("backend=trtllm cannot serve qformat='nvfp4' (quant_algo NVFP4) on hopper: NVFP4: ")
    assert "docs/source/features/quantization.md" in msg  # the cell's source, quoted
    # No engine serves W4A4 NVFP4 natively on Hopper: what this engine does serve there instead.
    assert msg.endswith("instead: qformat in ['bf16', 'fp8', 'int4', 'int4_awq', 'nvfp4_wo', 'w4a8_awq'] on backend=trtllm")
    with pytest.raises(ConfigError, match=r"qformat='w4a8_awq' \(quant_algo W4A8_AWQ\) on gb10: W4A8 AWQ"):
        support.refuse("trtllm", QFORMATS["w4a8_awq"], "gb10")
    support.refuse("trtllm", QFORMATS["int4_awq"], "gb10")  # native there since PR #11561
    support.refuse("trtllm", QFORMATS["int4_awq"], "hopper")
    support.refuse("hf", QFORMATS["nvfp4"], "cpu")  # emulated is allowed (and tagged)
    support.refuse("openai", QFORMATS["nvfp4_wo"], "gb10")  # the server's engine is not known here
    unknown = Format("x", "modelopt", None, 4.5, 16, False, False, None, modelopt_cfg="X_CFG")
    support.refuse("trtllm", unknown, "gb10")  # no quant_algo: not judged


def test_run_tag():
    assert support.tag("hf", QFORMATS["nvfp4"], "cpu") == "hf/cpu: emulated"
    assert support.tag("trtllm", QFORMATS["fp8"], "hopper") == "trtllm/hopper: native"
    assert (
        support.tag("openai", QFORMATS["fp8"], "cpu") == "openai/cpu: unknown (the server's engine decides)"
    )


def test_docs_show_the_matrix_generated_from_the_data():
    text = DOC.read_text()
    assert support.markdown() in text, (
        "docs/export_and_support.md is stale: paste gb10exp.backends.support.markdown()"
    )


def test_readme_shows_the_matrix_generated_from_the_data():
    table = support.glance().split("\n", 1)[1]  # without the generator's comment line
    assert table in (ROOT / "README.md").read_text(), "README's matrix is stale: paste gb10exp.backends.support.glance()"
