"""NVFP4 as deployed (issue 23): a modelopt checkpoint converted by llama.cpp's own converter and run by
llama.cpp, beside modelopt's simulation of it on the same windows; llama.cpp's own uncalibrated NVFP4."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import EMBEDDED_SMALL, LLAMACPP_SWEEP, cli_error, runs_by_format, shared_sweep
from inprocess import compose, tracking

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    """The embedded model through llama.cpp (conftest.LLAMACPP_SWEEP, shared with test_backend_llamacpp.py),
    run as a user runs it: 4 windows of 128 tokens, where NVFP4's loss stands far above rounding."""
    by_format = runs_by_format(shared_sweep(tmp_path_factory, *LLAMACPP_SWEEP)[0])
    assert {r.info.status for r in by_format.values()} == {"FINISHED"}
    return by_format


def _results(run) -> dict:
    path = Path(run.info.artifact_uri.removeprefix("file://")) / "results.json"
    return json.loads(path.read_text())


def _perplexity_read_directly(gguf: Path, windows) -> float:
    """Perplexity of ``windows`` from llama.cpp's logits, computed here with numpy: nothing of gb10exp's scoring."""
    from gb10exp.backends.llamacpp.loader import load_llama

    seq_len = windows.tokens.shape[1]
    llm = load_llama(gguf, n_ctx=seq_len, n_batch=seq_len, logits_all=True, verbose=False, n_gpu_layers=0)
    nll, count = 0.0, 0
    try:
        for window, start in zip(windows.tokens.tolist(), windows.score_from.tolist(), strict=True):
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            log_z = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
            targets = np.asarray(window[1:])
            token_nll = log_z - logits[np.arange(len(targets)), targets]
            nll += float(token_nll[start - 1 :].sum())  # position p predicts token p + 1
            count += len(targets) - (start - 1)
    finally:
        llm.close()
    return math.exp(nll / count)


def test_modelopt_nvfp4_deployed_is_measured_by_llama_cpps_own_kernels(deployed):
    run = deployed["nvfp4"]
    m, tags = run.data.metrics, run.data.tags
    # The converter repacked every linear weight into llama.cpp's NVFP4 type (30 layers x 7 linears); their
    # per-tensor scales travel as F32 tensors beside them.
    assert "nvfp4 210" in tags["llamacpp.tensor_types"], tags["llamacpp.tensor_types"]
    assert tags["llamacpp.backend"] == "CPU" and tags["nvfp4"] == "deployed"
    assert tags["gguf.origin"].startswith("modelopt export (NVFP4), then convert_hf_to_gguf.py")
    # Both figures on the same windows: modelopt's simulation (the headline) and the engine's own.
    assert m["perplexity"] > m["reference_perplexity"] and m["perplexity_deployed"] > m["reference_perplexity"]
    assert m["deployed_vs_simulated"] == pytest.approx(m["perplexity_deployed"] / m["perplexity"] - 1, rel=1e-6)
    assert 0 < m["kl_mean_deployed"] < 5 and 0.3 < m["top1_agreement_deployed"] < 1
    # Its speed is the deployed GGUF's: llama.cpp's NVFP4 kernels, the file's own bytes.
    assert m["decode_tokens_per_s"] > 0 and 0.05 < m["engine_weight_gib"] < 0.2
    results = _results(run)
    assert len(results["windows_deployed"]["nll"]) == len(results["windows"]["nll"]) == 4
    assert results["windows_deployed"]["tokens"] == results["windows"]["tokens"]


def test_deployed_perplexity_agrees_with_llama_cpps_logits_read_directly(deployed, tmp_path):
    """The recorded figure against an independent computation on the same GGUF and windows: llama.cpp's
    logits read in this process through the project's loader, log-softmax in numpy. Same engine, same
    tokens, same batch: they differ only by float64 vs float32 summation, far below 1e-4."""
    from gb10exp.runner import prepare

    run = deployed["nvfp4"]
    gguf = Path(run.data.tags["gguf.file"])
    cfg, _ = compose(["backend=llamacpp", "qformat=nvfp4", *EMBEDDED_SMALL, *tracking(tmp_path)])
    windows = prepare(cfg).windows
    direct = _perplexity_read_directly(gguf, windows)
    assert run.data.metrics["perplexity_deployed"] == pytest.approx(direct, rel=1e-4)


def test_llama_cpps_own_nvfp4_needs_no_calibration(deployed):
    run = deployed["gguf_nvfp4"]
    m, tags = run.data.metrics, run.data.tags
    assert tags["llamacpp.tensor_types"].startswith("nvfp4 210,") and "f16 1" in tags["llamacpp.tensor_types"]
    assert tags["llamacpp.file_type"].startswith("NVFP4") and tags["quantization"] == "by the engine (NVFP4)"
    assert tags["nvfp4"] == "deployed" and m["quantize_s"] < 0.5  # no calibration: llama.cpp rounds to nearest
    # The engine's figures are the run's: against the unquantized model scored by PyTorch on the same tokens.
    assert m["perplexity"] > m["reference_perplexity"] and 0 < m["kl_mean"] < 5
    # The same NVFP4 type, with and without modelopt's calibration: both measurably worse than 16-bit.
    assert m["perplexity"] / m["reference_perplexity"] - 1 > 0.02


@pytest.mark.parametrize(("qformat", "why"), [
    ("int4_awq", "llama.cpp's converter cannot repack quant_algo W4A16_AWQ"),
    ("nvfp4_awq", "llama.cpp's converter cannot repack quant_algo NVFP4_AWQ"),
    ("mxfp8", "llama.cpp's converter cannot repack quant_algo MXFP8"),
])
def test_formats_the_converter_cannot_take_are_refused_before_any_job(tmp_path, qformat, why):
    line = cli_error("backend=llamacpp", f"qformat=bf16,{qformat}", *EMBEDDED_SMALL, store=tmp_path)
    assert line.startswith(f"gb10exp: error: qformat={qformat!r} is not allowed with backend=llamacpp: {why}"), line
