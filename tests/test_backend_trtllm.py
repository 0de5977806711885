"""backend=trtllm where TensorRT-LLM cannot run (every CPU machine): one clear line; and its pure logic."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from gb10exp.backends import BenchInputs, build
from gb10exp.backends.hf.config import HFBackendConfig
from gb10exp.backends.trtllm.config import TRTLLMBackendConfig, TRTLLMOptions
from gb10exp.config import BenchConfig, ConfigError, QFormatConfig
from gb10exp.models import random_llama
from gb10exp.quant import formats

NVFP4 = formats.of(QFormatConfig(name="nvfp4", modelopt_cfg="NVFP4_DEFAULT_CFG"))
BF16 = formats.of(QFormatConfig(name="bf16"))

NO_TRTLLM = importlib.util.find_spec("tensorrt_llm") is None


@pytest.mark.skipif(not NO_TRTLLM, reason="TensorRT-LLM is installed here")
def test_missing_tensorrt_llm_fails_in_one_line_saying_how_to_get_it():
    backend = build(TRTLLMBackendConfig())
    with pytest.raises(
        ConfigError, match=r"backend=trtllm needs tensorrt_llm.*nvcr.io/nvidia/tensorrt-llm"
    ) as info:
        backend.check(NVFP4)
    assert "\n" not in str(info.value)


def test_gguf_formats_are_refused_by_engines_that_cannot_run_them():
    gguf = formats.of(QFormatConfig(name="gguf_q4_k_m", gguf_type="Q4_K_M"))
    for cfg in (TRTLLMBackendConfig(), HFBackendConfig()):
        with pytest.raises(ConfigError, match="qformat='gguf_q4_k_m' is not allowed with backend="):
            build(cfg).check(gguf)


# --- Contract tests against a stand-in tensorrt_llm with the 1.x LLM API's signatures (tests/fixtures) ---


@pytest.fixture
def standin(monkeypatch):
    """tests/fixtures/tensorrt_llm importable as tensorrt_llm for one test, then gone again."""
    import sys

    def purge():
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            del sys.modules[name]

    purge()
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures"))
    import tensorrt_llm

    assert tensorrt_llm.__version__.endswith("+standin")
    yield tensorrt_llm
    purge()


def test_standin_rejects_unknown_keywords_like_the_real_api(standin, tmp_path):
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    with pytest.raises(TypeError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=4)  # a transformers name, not TensorRT-LLM's
    with pytest.raises(TypeError):
        KvCacheConfig(enable_prefix_caching=False)  # vLLM's name
    random_llama(tie_word_embeddings=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        LLM(model=str(tmp_path), gpu_memory_utilization=0.5)  # vLLM's name
    llm = LLM(model=str(tmp_path), max_batch_size=2)
    with pytest.raises(TypeError, match="stream"):
        llm.generate_async([1, 2, 3], SamplingParams(max_tokens=1), stream=True)


def _inputs(model, fmt=BF16):
    prompt_tokens = torch.randint(0, 1000, (512,), generator=torch.Generator().manual_seed(2))
    return BenchInputs(model, None, prompt_tokens, torch.device("cpu"), fmt)


def test_backend_calls_match_the_llm_api_and_score_the_windows(standin):
    """prepare / perplexity / benchmark / close through the stand-in: every call our backend makes exists
    with these keywords in TensorRT-LLM 1.x, and the engine's perplexity equals PyTorch's on the same model."""
    model = random_llama(tie_word_embeddings=False)
    windows = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.float(), dim=-1)
    offline = [-logp[i, :-1].gather(-1, windows[i, 1:, None]).sum().item() for i in range(2)]

    backend = build(TRTLLMBackendConfig(options=TRTLLMOptions(max_batch_size=4)))
    tags = backend.prepare(_inputs(model))
    assert tags["trtllm.checkpoint"] == "save_pretrained (unquantized)"
    assert tags["trtllm.version"] == "1.0.0+standin"
    assert standin.LLM is type(backend.llm) and backend.llm.args["max_batch_size"] == 4
    folder = backend.folder
    scored = backend.perplexity(windows)
    assert [t for _, t in scored] == [31, 31]
    assert [n for n, _ in scored] == pytest.approx(offline, rel=1e-4)
    cfg = BenchConfig(input_len=16, output_len=4, batch_size=2, warmup=1, repeats=2)
    metrics, bench_tags = backend.benchmark(_inputs(model), cfg)
    assert metrics["decode_tokens_per_s"] > 0 and bench_tags["bench.method"].startswith("TensorRT-LLM")
    assert "engine_ppl_check" not in bench_tags
    backend.close()
    assert not folder.exists()  # keep_checkpoint=false


def test_missing_context_logits_are_tagged(standin, monkeypatch):
    monkeypatch.setattr(standin.llmapi, "CONTEXT_LOGITS", False)  # TensorRT-LLM 1.0's behaviour
    model = random_llama(tie_word_embeddings=False)
    backend = build(TRTLLMBackendConfig())
    backend.prepare(_inputs(model))
    assert backend.perplexity(torch.randint(0, 1000, (1, 16))) is None
    _, tags = backend.benchmark(_inputs(model), BenchConfig(input_len=8, output_len=2, warmup=0, repeats=1))
    assert tags["trtllm.context_logits"] == "missing"
    assert tags["engine_ppl_check"].startswith("not run: TensorRT-LLM returned no context_logits")
    backend.close()


def test_quantized_export_for_trtllm_uses_the_shared_export(tmp_path):
    import modelopt.torch.quantization as mtq

    from gb10exp.backends.trtllm.backend import export_checkpoint

    model = random_llama(tie_word_embeddings=False)
    tokens = torch.randint(0, 1000, (2, 32))
    model = mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), lambda m: m(tokens))
    how = export_checkpoint(_inputs(model, formats.of(QFormatConfig(name="fp8", modelopt_cfg="FP8_DEFAULT_CFG"))),
                            tmp_path)
    assert how == "modelopt export_hf_checkpoint (FP8)"
    assert json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"


@pytest.mark.parametrize("batch,limit,ok", [(8, 8, True), (9, 8, False), (16, 16, True)])
def test_bench_batch_above_max_batch_size_is_refused(batch, limit, ok, monkeypatch):
    """TensorRT-LLM queues requests beyond max_batch_size: the one batch-size check refuses, in preflight."""
    from inprocess import compose

    import gb10exp.backends as backends
    from gb10exp.backends.trtllm.backend import TRTLLMBackend

    monkeypatch.setattr(TRTLLMBackend, "check", lambda self, fmt, tokenizer=None: None)  # no TensorRT-LLM here
    cfg, _ = compose(["model=tiny_llama", "backend=trtllm", f"bench.batch_size={batch}",
                      f"backend.options.max_batch_size={limit}"])
    if ok:
        backends.check(cfg)
    else:
        with pytest.raises(ConfigError, match=r"^bench.batch_size=9 is not allowed with backend=trtllm: at most 8 "
                                              r"\(the engine would queue the rest\)"):
            backends.check(cfg)


# --- Installing gb10exp in NVIDIA's container without replacing its torch / modelopt ---


def _wheel(folder, name: str, version: str, requires: list[str]) -> None:
    """A minimal real wheel (metadata only) for pip's resolver, offline."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)
        ),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_constraints_pin_the_installed_torch_and_modelopt(tmp_path):
    from gb10exp.backends.trtllm import install

    text = install.constraints_text(install.installed())
    assert f"torch=={torch.__version__}" in text.splitlines()
    assert "nvidia-modelopt==0.47.0" in text.splitlines()


def test_plan_installs_only_what_is_missing_and_keeps_the_containers_versions():
    from gb10exp.backends.trtllm import install

    container = {
        "torch": "2.8.0a0+5228986c39.nv25.6",
        "nvidia-modelopt": "0.33.1",
        "transformers": "4.56.0",
        "numpy": "1.26.4",
        "tensorrt-llm": "1.0.0",
    }
    missing, notes = install.plan(install.requirements(), container)
    names = [install._split(r)[0] for r in missing]
    assert "torch" not in names and "nvidia-modelopt" not in names and "numpy" not in names
    assert {"hydra-core", "omegaconf", "mlflow", "lm-eval"} <= set(names)
    # Every container version outside gb10exp's range is kept and said so, never replaced.
    assert "nvidia-modelopt 0.33.1 is outside gb10exp's '==0.47.*': kept (the container's)" in notes
    assert sorted(n.split()[0] for n in notes) == ["numpy", "nvidia-modelopt", "transformers"]
    cmds = install.commands(Path("/c.txt"), missing)
    assert cmds[0][-3:] == ["--no-deps", "-e", str(ROOT)] and cmds[1][3:6] == ["install", "-c", "/c.txt"]


def test_pip_with_the_constraints_refuses_to_replace_torch(tmp_path):
    """Real pip, offline: a package wanting a newer torch would replace it; under the constraints it cannot."""
    import os
    import subprocess
    import sys

    from gb10exp.backends.trtllm import install

    _wheel(tmp_path, "torch", "99.0", [])
    _wheel(tmp_path, "gb10exp_probe", "1.0", ["torch>=99"])
    constraints = tmp_path / "c.txt"
    constraints.write_text(install.constraints_text(install.installed()))
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--no-index",
        "--find-links",
        str(tmp_path),
        "gb10exp_probe",
    ]
    # this machine's own pip configuration (a global constraints file, find-links) stays out of it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    free = subprocess.run(pip, capture_output=True, text=True, timeout=300, env=env)
    assert free.returncode == 0 and "torch-99.0" in free.stdout  # without constraints torch would be replaced
    pinned = subprocess.run(
        pip + ["-c", str(constraints)], capture_output=True, text=True, timeout=300, env=env
    )
    assert pinned.returncode != 0
    assert "ResolutionImpossible" in pinned.stderr or "conflict" in pinned.stderr.lower()


def test_install_dry_run_here_changes_nothing(tmp_path, capsys):
    from gb10exp.backends.trtllm import install

    assert install.main(["--dry-run", "--constraints", str(tmp_path / "c.txt")]) == 0
    out = capsys.readouterr().out
    assert f"  torch: {torch.__version__}" in out and "  nvidia-modelopt: 0.47.0" in out
    assert "missing requirements: none" in out  # this venv has every core requirement already
    assert "--no-deps -e" in out and (tmp_path / "c.txt").read_text().count("==") > 50
