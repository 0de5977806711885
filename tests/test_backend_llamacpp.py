"""backend=llamacpp end to end on the embedded SmolLM2-135M: a real llama.cpp, real numbers."""

from __future__ import annotations

import pytest
from conftest import mlflow_runs, run_gb10exp

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
# 4 windows of 256 tokens (prompts are cut from them), short generations, few repeats: ~1 minute a run.
SMALL = ["calib_size=4", "calib.seq_len=256", "eval.seq_len=256", "eval.num_windows=4", "bench.input_len=64",
         "bench.output_len=12", "bench.warmup=1", "bench.repeats=3", "bench.engine_ppl_windows=2"]


def assert_sane_speed(m: dict) -> None:
    assert m["ttft_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0
    assert 0 < m["roofline_fraction"] <= 1 and m["decode_bound_tokens_per_s"] > m["decode_tokens_per_s"]
    assert m["gb10_projected_decode_tokens_per_s"] > 0 and m["mem_system_used_peak_gib"] > 0


def test_q4_k_m_and_f16_through_llama_cpp(tmp_path):
    out = run_gb10exp("backend=llamacpp", "qformat=gguf_q4_k_m,bf16", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    by_format = {r.data.params["qformat.name"]: r for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}

    q4 = by_format["gguf_q4_k_m"]
    m = q4.data.metrics
    assert_sane_speed(m)
    assert q4.data.tags["quantization"] == "by the engine (Q4_K_M)"
    assert q4.data.tags["llamacpp.offload"].startswith("none: CPU only")  # and "all N/N layers" on a GPU
    assert "Q4_K_M.gguf" in q4.data.tags["gguf.file"]
    # Its accuracy is llama.cpp's own, over every window; the PyTorch figure is the unquantized source's.
    assert m["perplexity"] == pytest.approx(m["engine_perplexity"], rel=0.05)
    assert m["perplexity"] > m["source_perplexity"] and "kl_mean" not in m
    assert m["weight_gib"] < 0.11  # the GGUF's bytes, not a 16-bit estimate

    f16 = by_format["bf16"].data
    assert_sane_speed(f16.metrics)
    # The same weights through llama.cpp's kernels and through PyTorch, on the same token ids.
    assert f16.metrics["engine_perplexity"] == pytest.approx(f16.metrics["offline_perplexity_same_windows"], rel=0.01)
    assert f16.tags["engine_ppl_check"].startswith("ok")


def test_hf_fast_path_on_the_embedded_default(tmp_path):
    out = run_gb10exp("qformat=bf16", "backend.options.compare=[generate]", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    m, tags = runs[0].data.metrics, runs[0].data.tags
    assert_sane_speed(m)
    assert m["generate.decode_tokens_per_s"] > 0 and m["compile_s"] >= 0
    assert tags["bench.method"] == "fast" and tags["speed_valid"] == "true"


def test_fake_quantized_formats_are_not_timed_on_hf(tmp_path):
    out = run_gb10exp("qformat=fp8", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    m, tags = runs[0].data.metrics, runs[0].data.tags
    assert "decode_tokens_per_s" not in m and tags["speed_valid"] == "false"
    assert tags["speed_measured"].startswith("no: fake quantization")


def test_efficiency_audit_preset_runs_llama_cpp_and_says_why_trtllm_did_not(tmp_path):
    out = run_gb10exp("+experiment=efficiency_audit", *SMALL, store=tmp_path)
    _, runs = mlflow_runs(tmp_path)
    assert [r.data.params["backend.name"] for r in runs] == ["llamacpp"]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["qformat.name"] == "gguf_q4_k_m"
    assert "FAILED job 1: backend=trtllm needs tensorrt_llm" in out.stdout
    assert out.returncode == 1  # a sweep with a failed job says so
