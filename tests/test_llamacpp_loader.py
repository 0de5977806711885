"""The project's llama.cpp loader: the only place a ``llama_cpp.Llama`` is built, and its CPU decision.

On Intel CPUs with AMX, llama-cpp-python 0.3.36 segfaults in ``llama_decode`` with llama.cpp's extra CPU
buffer types on, and the segfault takes the whole pytest session down. These tests run on any CPU: the
decision is checked on faked /proc/cpuinfo files, and the source tree is scanned for any other construction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

from gb10exp.backends.llamacpp import loader

LOADER = ROOT / "gb10exp" / "backends" / "llamacpp" / "loader.py"
SAPPHIRE_RAPIDS = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                   "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8\n")
EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def _llama_constructions(path: Path) -> list[int]:
    """Lines of ``path`` that construct llama.cpp's Llama: ``llama_cpp.Llama(...)``, ``x.Llama(...)``, or a
    ``Llama`` imported from llama_cpp and called (``from llama_cpp import Llama``)."""
    tree = ast.parse(path.read_text(), str(path))
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("llama_cpp") for alias in node.names if alias.name == "Llama"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "Llama") or (
                isinstance(func, ast.Name) and func.id in imported):
            lines.append(node.lineno)
    return lines


def test_nothing_but_the_loader_builds_a_llama_cpp_model():
    files = [p for folder in ("gb10exp", "tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50  # the walk really saw the tree
    found = {str(p.relative_to(ROOT)): lines for p in files if p != LOADER and (lines := _llama_constructions(p))}
    assert found == {}, f"llama_cpp.Llama built outside gb10exp/backends/llamacpp/loader.py: {found}"
    assert _llama_constructions(LOADER)  # and the scan does find the one construction there is


def test_the_scan_sees_every_way_of_writing_it(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import llama_cpp\nfrom llama_cpp import Llama as L\nllama_cpp.Llama('m')\nL('m')\n"
                      "import llama_cpp as lc\nlc.Llama(model_path='m')\n")
    assert _llama_constructions(sample) == [3, 4, 6]


def test_amx_turns_the_extra_buffer_types_off_and_their_absence_on(tmp_path):
    intel, amd, missing = tmp_path / "intel", tmp_path / "amd", tmp_path / "missing"
    intel.write_text(SAPPHIRE_RAPIDS)
    amd.write_text(EPYC)
    assert loader.amx_flags(intel) == ["amx_bf16", "amx_int8", "amx_tile"] and loader.amx_flags(amd) == []
    assert loader.use_extra_bufts("auto", intel) is False
    assert loader.use_extra_bufts("auto", amd) is True
    assert loader.use_extra_bufts("auto", missing) is True  # no flags to read: llama.cpp's own default
    assert loader.use_extra_bufts(True, intel) is True and loader.use_extra_bufts(False, amd) is False
    assert loader.cpu_model(intel) == "Intel(R) Xeon(R) Processor" and loader.cpu_model(missing) == "unknown"
    assert loader.describe(False) == "off (auto: this CPU has AMX)"
    assert loader.describe(True, True) == "on (backend.options.extra_bufts)"
    for bad in ("yes", 0, 1, None):
        with pytest.raises(ValueError, match=r"extra_bufts=.* is not allowed: auto, true or false"):
            loader.use_extra_bufts(bad)


@pytest.mark.llamacpp
def test_the_decision_reaches_the_parameters_llama_cpp_loads_with(tmp_path):
    raw = pytest.importorskip("llama_cpp.llama_cpp")
    intel, amd = tmp_path / "intel", tmp_path / "amd"
    intel.write_text(SAPPHIRE_RAPIDS)
    amd.write_text(EPYC)
    try:
        loader.set_extra_bufts(loader.use_extra_bufts("auto", intel))
        assert raw.llama_model_default_params().use_extra_bufts is False
        loader.set_extra_bufts(loader.use_extra_bufts("auto", amd))
        assert raw.llama_model_default_params().use_extra_bufts is True
    finally:  # this machine's own decision again, for whatever loads next in this session
        loader.set_extra_bufts(loader.use_extra_bufts())
