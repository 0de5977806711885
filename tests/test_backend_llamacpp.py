"""backend=llamacpp end to end on the embedded SmolLM2-135M: a real llama.cpp, real numbers; and the
child process that keeps a native crash from taking the sweep down."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    E2E_SWEEP,
    EMBEDDED_SMALL,
    LLAMACPP_SWEEP,
    ROOT,
    TINY,
    cli_error,
    mlflow_runs,
    run_gb10exp,
    runs_by_format,
    shared_sweep,
)

from gb10exp.backends.llamacpp.loader import amx_flags
from gb10exp.backends.llamacpp.worker import Engine, EngineCrashed

WORKER = str(ROOT / "gb10exp" / "backends" / "llamacpp" / "worker.py")
TINY_BENCH = [*TINY[:-1], "bench.input_len=32", "bench.output_len=8", "bench.warmup=1", "bench.repeats=2"]


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
    """SIGSEGV to the first llama.cpp child of this worktree the moment it maps its GGUF (llama.cpp is loading
    the model): what a native crash in llama.cpp does to it. The child is watched closely once it exists: on the
    tiny model it loads, scores and decodes in a fraction of a second, and a signal that comes after its last
    reply crashes nothing the job still waits on."""
    while not stop.is_set() and not killed:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or WORKER.encode() not in (proc / "cmdline").read_bytes().split(b"\0"):
                    continue
                while not stop.is_set():
                    if ".gguf" in (proc / "maps").read_text():
                        os.kill(int(proc.name), signal.SIGSEGV)
                        killed.append(int(proc.name))
                        return
                    time.sleep(0.002)
            except OSError:  # gone before it mapped a GGUF
                continue
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_a_native_crash_fails_its_run_and_the_next_job_runs(tmp_path):
    # The tiny random model, converted to GGUF by llama.cpp's converter: the crash is the point, not the model.
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_worker, args=(stop, killed), daemon=True)
    watcher.start()
    try:
        out = run_gb10exp("backend=llamacpp", "qformat=bf16,gguf_q4_k_m", *TINY_BENCH, store=tmp_path)
    finally:
        stop.set()
    assert killed, "no llama.cpp child process was seen"
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"], out.stdout[-3000:]
    failed, finished = runs
    assert failed.data.tags["error"].startswith("EngineCrashed: llama.cpp crashed (signal 11) [SIGSEGV]")
    trace = Path(client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))).read_text()
    quoted = trace.split("last lines:\n", 1)[1]
    # The child's own log quoted: llama.cpp's lines, which name the llama.cpp function that wrote them.
    assert re.search(r"^(llama_\w+|load_tensors|create_tensor|print_info): ", quoted, re.MULTILINE), quoted
    assert finished.data.params["qformat.name"] == "gguf_q4_k_m" and finished.data.metrics["decode_tokens_per_s"] > 0
    assert out.returncode == 1 and "FAILED job 0" in out.stdout


@pytest.mark.slow
@pytest.mark.llamacpp
def test_q4_k_m_and_f16_through_llama_cpp(tmp_path_factory):
    by_format = runs_by_format(shared_sweep(tmp_path_factory, *LLAMACPP_SWEEP)[0])
    assert {r.info.status for r in by_format.values()} == {"FINISHED"}

    q4 = by_format["gguf_q4_k_m"]
    m = q4.data.metrics
    assert_sane_speed(m, q4.data.tags)
    assert q4.data.tags["quantization"] == "by the engine (Q4_K_M)"
    assert q4.data.tags["llamacpp.offload"].startswith("none: CPU only")  # and "all N/N layers" on a GPU
    assert q4.data.tags["llamacpp.backend"] == "CPU" and "q4_K" in q4.data.tags["llamacpp.tensor_types"]
    assert "Q4_K_M.gguf" in q4.data.tags["gguf.file"]
    # Its accuracy is llama.cpp's own, over every window, against the unquantized model on the same tokens.
    assert m["perplexity"] > m["source_perplexity"] and 0 < m["kl_mean"] < 1 and m["top1_agreement"] < 1
    assert 0.08 < m["engine_weight_gib"] < 0.11  # the GGUF's tensor bytes, not a 16-bit estimate
    assert q4.data.tags["bench.label"] == "pp64+tg12 @ d0"
    assert q4.data.tags["llamacpp.extra_bufts"] == ("off (auto: this CPU has AMX)" if amx_flags()
                                                    else "on (auto: this CPU has no AMX)")

    f16 = by_format["bf16"].data
    assert_sane_speed(f16.metrics, f16.tags)
    assert "f16" in f16.tags["llamacpp.tensor_types"]
    # The same weights through llama.cpp's F16 kernels and through PyTorch (float32), on the same token ids:
    # F16 weights, activations rounded to F16 in the matrix products and an F16 KV cache, each a relative
    # error of 2^-11 per value; measured here: well under 0.5% on perplexity.
    assert f16.metrics["engine_perplexity"] == pytest.approx(f16.metrics["offline_perplexity_same_windows"], rel=0.005)
    assert f16.tags["engine_ppl_check"].startswith("ok")


@pytest.mark.slow
def test_hf_fast_path_on_the_embedded_default(tmp_path_factory):
    by_format = runs_by_format(shared_sweep(tmp_path_factory, *E2E_SWEEP)[0])
    m, tags = by_format["bf16"].data.metrics, by_format["bf16"].data.tags
    assert_sane_speed(m, tags)
    assert m["generate.decode_tokens_per_s"] > 0 and m["compile_s"] >= 0
    assert tags["bench.method"] == "fast" and tags["speed_valid"] == "true"


@pytest.mark.slow
def test_fake_quantized_formats_are_not_timed_on_hf(tmp_path_factory):
    by_format = runs_by_format(shared_sweep(tmp_path_factory, *E2E_SWEEP)[0])
    m, tags = by_format["fp8"].data.metrics, by_format["fp8"].data.tags
    assert "decode_tokens_per_s" not in m and tags["speed_valid"] == "false"
    assert tags["speed_measured"].startswith("no: fake quantization")


def test_a_tensorrt_llm_pairing_without_tensorrt_llm_is_refused_before_any_job(tmp_path):
    # Preflight checks every job of the sweep: the TensorRT-LLM half cannot run here, so the sweep stops in
    # one line before the llama.cpp half spends anything, and nothing is recorded.
    pytest.importorskip("llama_cpp")
    line = cli_error("audit=llamacpp_q4_k_m,trtllm_nvfp4", *EMBEDDED_SMALL, store=tmp_path)
    assert "backend=trtllm" in line and "tensorrt_llm" in line, line


@pytest.mark.llamacpp
def test_the_efficiency_audit_preset_passes_preflight_on_any_machine():
    # Every job of the preset (16-bit, Q4_K_M, llama.cpp's NVFP4, three modelopt NVFP4 deployments) can run
    # here: llama.cpp only, and every modelopt format in it is one the converter takes.
    from gb10exp.__main__ import bad_input
    from gb10exp.preflight import normalize

    assert bad_input(normalize(["+experiment=efficiency_audit"])) is None
