"""backend=llamacpp end to end on the embedded SmolLM2-135M: a real llama.cpp, real numbers; and the
child process that keeps a native crash from taking the sweep down."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, mlflow_runs, run_gb10exp

from gb10exp.backends.llamacpp.loader import amx_flags
from gb10exp.backends.llamacpp.worker import Engine, EngineCrashed

WORKER = str(ROOT / "gb10exp" / "backends" / "llamacpp" / "worker.py")
# 4 windows of 256 tokens (prompts are cut from them), short generations, few repeats: ~1 minute a run.
SMALL = ["calib_size=4", "calib.seq_len=256", "eval.seq_len=256", "eval.num_windows=4", "bench.input_len=64",
         "bench.output_len=12", "bench.warmup=1", "bench.repeats=3", "bench.engine_ppl_windows=2"]


def assert_sane_speed(m: dict, tags: dict) -> None:
    """A CPU run's speed: real figures, a roofline whose verdict matches its fraction (above 1 on a CPU,
    whose caches hold a small model, it must say implausible and why), and no GB10 projection from a CPU."""
    assert m["ttft_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0
    assert m["roofline_fraction"] > 0 and m["decode_bound_tokens_per_s"] > 0
    if m["roofline_fraction"] > 1:
        assert tags["roofline"] == "implausible" and tags["roofline.reason"]
    else:
        assert tags["roofline"] == "plausible"
    assert "gb10_projected_decode_tokens_per_s" not in m and tags["roofline.gb10"].startswith("no projection")
    assert m["mem_system_used_peak_gib"] > 0


def test_a_killed_child_is_reported_as_a_crash_with_its_signal():
    engine = Engine()  # the child imports llama_cpp only to load a model: this runs without it
    assert engine.call("pid") == {"pid": engine.pid}
    os.kill(engine.pid, signal.SIGSEGV)
    with pytest.raises(EngineCrashed, match=r"^llama.cpp crashed \(signal 11\) \[SIGSEGV\] during pid; its log: "):
        engine.call("pid")
    engine.close()


def _kill_first_worker(stop: threading.Event, killed: list[int]) -> None:
    """SIGSEGV to the first llama.cpp child of this worktree once it has mapped its GGUF (llama.cpp is
    loading or running the model): what a native crash in llama_decode does to it."""
    while not stop.is_set() and not killed:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if WORKER.encode() in (proc / "cmdline").read_bytes().split(b"\0") and ".gguf" in (proc / "maps").read_text():
                    time.sleep(0.5)
                    os.kill(int(proc.name), signal.SIGSEGV)
                    killed.append(int(proc.name))
                    return
            except OSError:
                continue
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_a_native_crash_fails_its_run_and_the_next_job_runs(tmp_path):
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_worker, args=(stop, killed), daemon=True)
    watcher.start()
    try:
        out = run_gb10exp("backend=llamacpp", "qformat=bf16,gguf_q4_k_m", *SMALL, store=tmp_path)
    finally:
        stop.set()
    assert killed, "no llama.cpp child process was seen"
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"], out.stdout[-3000:]
    failed, finished = runs
    assert failed.data.tags["error"].startswith("EngineCrashed: llama.cpp crashed (signal 11) [SIGSEGV]")
    trace = Path(client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))).read_text()
    quoted = trace.split("last lines:\n", 1)[1]
    assert quoted.strip() != "(empty)" and "llama_" in quoted  # the child's own log (llama.cpp's lines), quoted
    assert finished.data.params["qformat.name"] == "gguf_q4_k_m" and finished.data.metrics["decode_tokens_per_s"] > 0
    assert out.returncode == 1 and "FAILED job 0" in out.stdout


@pytest.mark.slow
@pytest.mark.llamacpp
def test_q4_k_m_and_f16_through_llama_cpp(tmp_path):
    out = run_gb10exp("backend=llamacpp", "qformat=gguf_q4_k_m,bf16", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    by_format = {r.data.params["qformat.name"]: r for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}

    q4 = by_format["gguf_q4_k_m"]
    m = q4.data.metrics
    assert_sane_speed(m, q4.data.tags)
    assert q4.data.tags["quantization"] == "by the engine (Q4_K_M)"
    assert q4.data.tags["llamacpp.offload"].startswith("none: CPU only")  # and "all N/N layers" on a GPU
    assert "Q4_K_M.gguf" in q4.data.tags["gguf.file"]
    # Its accuracy is llama.cpp's own, over every window; the PyTorch figure is the unquantized source's.
    assert m["perplexity"] == pytest.approx(m["engine_perplexity"], rel=0.05)
    assert m["perplexity"] > m["source_perplexity"] and "kl_mean" not in m
    assert 0.08 < m["engine_weight_gib"] < 0.11  # the GGUF's tensor bytes, not a 16-bit estimate
    assert q4.data.tags["bench.label"] == "pp64+tg12 @ d0"
    assert q4.data.tags["llamacpp.extra_bufts"] == ("off (auto: this CPU has AMX)" if amx_flags()
                                                    else "on (auto: this CPU has no AMX)")

    f16 = by_format["bf16"].data
    assert_sane_speed(f16.metrics, f16.tags)
    # The same weights through llama.cpp's kernels and through PyTorch, on the same token ids.
    assert f16.metrics["engine_perplexity"] == pytest.approx(f16.metrics["offline_perplexity_same_windows"], rel=0.01)
    assert f16.tags["engine_ppl_check"].startswith("ok")


@pytest.mark.slow
@pytest.mark.llamacpp
def test_hf_fast_path_on_the_embedded_default(tmp_path):
    out = run_gb10exp("qformat=bf16", "backend.options.compare=[generate]", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    m, tags = runs[0].data.metrics, runs[0].data.tags
    assert_sane_speed(m, tags)
    assert m["generate.decode_tokens_per_s"] > 0 and m["compile_s"] >= 0
    assert tags["bench.method"] == "fast" and tags["speed_valid"] == "true"


@pytest.mark.slow
@pytest.mark.llamacpp
def test_fake_quantized_formats_are_not_timed_on_hf(tmp_path):
    out = run_gb10exp("qformat=fp8", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    m, tags = runs[0].data.metrics, runs[0].data.tags
    assert "decode_tokens_per_s" not in m and tags["speed_valid"] == "false"
    assert tags["speed_measured"].startswith("no: fake quantization")


@pytest.mark.slow
@pytest.mark.llamacpp
def test_efficiency_audit_preset_without_tensorrt_llm_is_refused_before_any_job(tmp_path):
    # Preflight checks every job of the preset (issue 10): the TensorRT-LLM half cannot run here, so the
    # sweep stops in one line before the llama.cpp half spends anything, and nothing is recorded.
    out = run_gb10exp("+experiment=efficiency_audit", *SMALL, store=tmp_path)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("gb10exp: error:")]
    assert len(errors) == 1 and "backend=trtllm" in errors[0] and "tensorrt_llm" in errors[0]
    assert "Traceback" not in out.stderr and not (tmp_path / "mlflow.db").exists()
