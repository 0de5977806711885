"""The hf fast decode path (gb10exp/backends/hf/fast.py) on the CPU: the native Llama-like step decodes
exactly what ``generate`` decodes (and, compiled by layer, with one graph per part), its logits are the
model's, it shares the model's weights instead of copying them and gives them back, falls back to the HF
forward where it must, remembers its PDL decision, and leaves Inductor's global flags as it found them.
The same comparisons on a GPU, compiled and tuned: tests/test_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gb10exp.backends.hf import fast
from gb10exp.backends.hf.fast import PRESETS, FastDecoder, inductor_flags, native_unsupported

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)


def model_of(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen2":  # biases on Q/K/V: the fused bias must line up with the fused weight
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=kind == "tied"))
    model.generation_config.eos_token_id = None
    return model.eval()


def reference(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )[:, prompt.shape[1] :]


PROMPT = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own $GB10EXP_CACHE: a PDL decision one test's trial stores must not decide another's.
    The compile cache folders a compiled decoder exports (fast.use_compile_cache) are removed for the test
    and restored after it: left set by an earlier test, they would read as a folder the user chose."""
    monkeypatch.setenv("GB10EXP_CACHE", str(tmp_path / "cache"))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # remembers the value before the test, restored at its end
        monkeypatch.delenv(name)


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2"])
def test_native_step_decodes_what_generate_decodes(kind):
    model = model_of(kind)
    expected = reference(model, PROMPT, 12)
    with FastDecoder(
        model, batch_size=2, input_len=20, output_len=12, compile_step=False, cuda_graph=True
    ) as d:
        assert d.method == "native Llama step"
        d.warm(PROMPT)
        timing = d.generate(PROMPT)
        assert torch.equal(d.tokens, expected)
        assert len(timing.token_times) == 12 and timing.ttft > 0
        other = PROMPT.flip(1)  # a second request reuses the cache: nothing of the first may leak in
        d.generate(other)
        assert torch.equal(d.tokens, reference(model, other, 12))


def test_recorded_logits_are_the_models_own_at_every_step():
    """The check hook: decode_logits keeps every token's logits (prefill's and each step's), and they are
    what the HF model computes on the same tokens; a decoder without the hook refuses."""
    model = model_of("llama")
    with FastDecoder(model, 2, 20, 12, compile_step=False, cuda_graph=True, record_logits=True) as d:
        d.warm(PROMPT)
        tokens, logits = d.decode_logits(PROMPT)
    assert torch.equal(tokens, reference(model, PROMPT, 12)) and logits.shape == (2, 12, 1000)
    with torch.no_grad():
        expected = model(torch.cat([PROMPT, tokens], 1)).logits[:, 19:-1]
    assert (logits - expected).abs().max() < 1e-5 * expected.abs().max()
    assert (logits[:, 1:] - expected[:, :-1]).abs().max() > 0.1 * expected.abs().max()  # a step off is seen
    with (
        FastDecoder(model, 2, 20, 12, compile_step=False, cuda_graph=True) as d,
        pytest.raises(ValueError, match="record_logits=True"),
    ):
        d.decode_logits(PROMPT)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_matvec_written_as_a_reduction_computes_the_models_logits(kind):
    """The presets without coordinate descent (MATVEC_AS_REDUCTION) write a batch-1 matmul as Inductor's own
    decomposition does (float32 products and sum): the same tokens and, in float32, the same logits; only a
    compiled step of such a preset does it (batch 1 here: a larger batch keeps F.linear)."""
    model = model_of(kind)
    prompt = PROMPT[:1]
    with FastDecoder(model, 1, 20, 12, compile_step=False, cuda_graph=True, record_logits=True) as d:
        assert d.native.matvec_as_reduction is False
        d.native.matvec_as_reduction = True  # eagerly: the compiled step's arithmetic, without the compile
        d.warm(prompt)
        tokens, logits = d.decode_logits(prompt)
    assert torch.equal(tokens, reference(model, prompt, 12))
    with torch.no_grad():
        expected = model(torch.cat([prompt, tokens], 1)).logits[:, 19:-1]
    assert (logits - expected).abs().max() < 1e-5 * expected.abs().max()
    for preset, compiled, expected_flag in [("autotune", True, True), ("untuned", True, True),
                                            ("autotune", False, False), ("default", True, False)]:
        with FastDecoder(model, 1, 20, 12, compile_step=compiled, cuda_graph=True, preset=preset) as d:
            assert d.native.matvec_as_reduction is expected_flag, (preset, compiled)


@pytest.mark.slow  # Inductor's C++ compile of the three parts: about a minute on 2 busy cores
def test_the_compiled_step_has_one_graph_per_part_and_decodes_what_generate_decodes():
    """Regional compilation: one compiled layer serves every layer (no recompile per layer: 3 graphs in
    all, embed + layer + head), and the compiled step computes the model's logits (float32, CPU)."""
    from torch._dynamo.utils import counters

    model = model_of("llama")
    graphs = counters["stats"]["unique_graphs"]
    with FastDecoder(
        model,
        2,
        20,
        12,
        compile_step=True,
        cuda_graph=True,
        preset="plain",
        record_logits=True,
        regional=True,
    ) as d:
        d.warm(PROMPT)
        assert "compiled step (plain, by layer)" in d.describe()
        assert d.compile_stats["fxgraph_cache_miss"] == 3 and d.compile_stats["cache_dir"].startswith(
            os.environ["GB10EXP_CACHE"]
        )
        d.generate(PROMPT)
        assert torch.equal(d.tokens, reference(model, PROMPT, 12))
        tokens, logits = d.decode_logits(PROMPT)
    assert counters["stats"]["unique_graphs"] - graphs == 3
    with torch.no_grad():
        expected = model(torch.cat([PROMPT, tokens], 1)).logits[:, 19:-1]
    assert (logits - expected).abs().max() < 1e-5 * expected.abs().max()


def test_fused_weights_are_shared_then_given_back():
    model = model_of("llama")
    attn = model.model.layers[0].self_attn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    d = FastDecoder(model, batch_size=1, input_len=8, output_len=4, compile_step=False, cuda_graph=False)
    # Q, K and V now view one fused matrix: the model's own modules still compute the same thing.
    storage = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == storage
    assert attn.v_proj.weight.untyped_storage().data_ptr() == storage
    d.close()
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # every weight its own storage again (none tied in this model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_models_it_cannot_run_natively_fall_back_to_the_hf_forward():
    class WrappedLinear(torch.nn.Linear):  # as modelopt's quantized linears are: an nn.Linear subclass
        pass

    model = model_of("llama")
    old = model.model.layers[1].mlp.down_proj
    new = WrappedLinear(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    model.model.layers[1].mlp.down_proj = new
    assert "WrappedLinear" in native_unsupported(model, 32)
    expected = reference(model, PROMPT, 6)
    with FastDecoder(
        model, batch_size=2, input_len=20, output_len=6, compile_step=False, cuda_graph=True
    ) as d:
        assert d.method.startswith("HF forward") and "WrappedLinear" in d.method
        d.warm(PROMPT)
        d.generate(PROMPT)
        assert torch.equal(d.tokens, expected)
    config = LlamaConfig(**SHAPE)
    config.model_type = "gemma"
    assert "gemma" in native_unsupported(LlamaForCausalLM(config), 32)


def test_inductor_flags_are_restored_after_the_block_and_after_an_error():
    original = inductor.coordinate_descent_tuning, inductor.max_autotune
    with inductor_flags({"coordinate_descent_tuning": not original[0], "max_autotune": not original[1]}):
        assert (inductor.coordinate_descent_tuning, inductor.max_autotune) == (
            not original[0],
            not original[1],
        )
    assert (inductor.coordinate_descent_tuning, inductor.max_autotune) == original
    with pytest.raises(RuntimeError), inductor_flags({"coordinate_descent_tuning": not original[0]}):
        raise RuntimeError("a compile that fails")
    assert (inductor.coordinate_descent_tuning, inductor.max_autotune) == original


def test_a_tuned_decoder_leaves_the_global_flags_as_they_were():
    """A tuned compile on the CPU takes minutes here (max-autotune benchmarks C++ GEMM templates), so the
    compiled step is created (torch.compile passes the flags as per-compile options) but run eagerly;
    warm() enters the same flag scope a CUDA compile runs in."""
    assert PRESETS["tuned"]["coordinate_descent_tuning"] is True
    original = inductor.coordinate_descent_tuning, inductor.max_autotune
    model = model_of("llama")
    compiled = FastDecoder(
        model, batch_size=1, input_len=8, output_len=4, compile_step=True, cuda_graph=True, tuned=True
    )
    compiled.close()
    with FastDecoder(
        model, batch_size=1, input_len=8, output_len=4, compile_step=False, cuda_graph=True, tuned=True
    ) as d:
        d.warm(PROMPT[:1, :8])
        d.generate(PROMPT[:1, :8])
    assert (inductor.coordinate_descent_tuning, inductor.max_autotune) == original


def test_pdl_is_off_where_it_cannot_act_and_a_bad_value_is_refused():
    with FastDecoder(
        model_of("llama"), batch_size=1, input_len=8, output_len=4, compile_step=False, cuda_graph=True
    ) as d:
        assert d.candidates == {False: PRESETS["default"]} and d.pdl is False
        d.warm(PROMPT[:1, :8])
        assert "PDL n/a: no tuned compile" in d.describe() and not d.trials
    for bad in ("yes", 0, 1):
        with pytest.raises(ValueError, match=f"pdl={bad!r} is not one of auto, true, false"):
            FastDecoder(model_of("llama"), 1, 8, 4, compile_step=False, cuda_graph=True, pdl=bad)


@pytest.mark.parametrize("forced", [None, True, False])
def test_pdl_auto_times_both_compiles_and_keeps_the_faster(monkeypatch, forced):
    """As on a Hopper GPU: PDL can act (here the step runs eagerly, so both candidates run the same
    kernels, but each is prepared, timed and weighed exactly as on the GPU). pdl=true/false time nothing."""
    monkeypatch.setattr(FastDecoder, "_pdl_unusable", lambda self: None)
    model = model_of("llama")
    expected = reference(model, PROMPT, 6)
    pdl = "auto" if forced is None else forced
    original = inductor.triton.enable_pdl
    with FastDecoder(
        model, batch_size=2, input_len=20, output_len=6, compile_step=False, cuda_graph=True, pdl=pdl
    ) as d:
        d.warm(PROMPT)
        if forced is None:
            assert set(d.trials) == {False, True} and all(t > 0 for t in d.trials.values())
            assert d.pdl == min(d.trials, key=d.trials.get)  # the faster one runs
            assert d.flags.get("triton.enable_pdl", False) is d.pdl
            assert f"PDL {'on' if d.pdl else 'off'} (faster of off " in d.describe()
        else:
            assert not d.trials and d.pdl is forced and f"PDL {'on' if forced else 'off'}," in d.describe()
        d.generate(PROMPT)
        assert torch.equal(d.tokens, expected)  # the timing trials left nothing behind in the cache
        d.warm(PROMPT)  # a second warm reuses each candidate's step and still labels what runs
        assert d.step_fn is d._step_fns[d.pdl] and d.flags == d.candidates[d.pdl]
        d.generate(PROMPT)
        assert torch.equal(d.tokens, expected)
    assert inductor.triton.enable_pdl == original


def test_pdl_auto_keeps_pdl_off_when_the_pdl_compile_fails(monkeypatch):
    monkeypatch.setattr(FastDecoder, "_pdl_unusable", lambda self: None)
    build = FastDecoder._compile_and_capture

    def failing(self, prompt):
        if self.pdl:
            raise RuntimeError("ptxas: unsupported launch attribute")
        build(self, prompt)

    monkeypatch.setattr(FastDecoder, "_compile_and_capture", failing)
    with FastDecoder(model_of("llama"), 2, 20, 6, compile_step=False, cuda_graph=True) as d:
        d.warm(PROMPT)
        assert d.pdl is False and not d.trials and d.flags == PRESETS["default"]
        assert "PDL off (the PDL compile failed: RuntimeError: ptxas: unsupported" in d.describe()
        d.generate(PROMPT)
        assert torch.equal(d.tokens, reference(model_of("llama"), PROMPT, 6))
    monkeypatch.setattr(FastDecoder, "_compile_and_capture", lambda self, prompt: 1 / 0)
    decoder = FastDecoder(model_of("llama"), 2, 20, 6, compile_step=False, cuda_graph=True)
    with decoder as d, pytest.raises(ZeroDivisionError):  # PDL off failing is a real failure, never hidden
        d.warm(PROMPT)


def test_pdl_auto_remembers_a_trial_and_the_next_decoder_compiles_once(monkeypatch):
    """The trial's outcome is stored under $GB10EXP_CACHE/pdl per GPU and software; a later decoder (a
    later process) reads it and compiles only the remembered candidate."""
    monkeypatch.setattr(FastDecoder, "_pdl_unusable", lambda self: None)
    model = model_of("llama")
    with FastDecoder(model, 2, 20, 6, compile_step=False, cuda_graph=True) as d:
        d.warm(PROMPT)
        assert set(d.trials) == {False, True}
        kept = d.pdl
    assert fast.remembered_pdl(torch.device("cpu"))[0] is kept
    with FastDecoder(model, 2, 20, 6, compile_step=False, cuda_graph=True) as d:
        assert list(d.candidates) == [kept]
        d.warm(PROMPT)
        assert not d.trials and f"PDL {'on' if kept else 'off'} (remembered: trial of " in d.describe()
        d.generate(PROMPT)
        assert torch.equal(d.tokens, reference(model, PROMPT, 6))
    fast._pdl_memory(torch.device("cpu")).write_text("{not json")  # damaged: as good as none, trial again
    assert fast.remembered_pdl(torch.device("cpu")) is None


def test_pdl_measured_table_decides_by_gpu_name_and_torch_version(monkeypatch):
    version = ".".join(torch.__version__.split(".")[:2])
    monkeypatch.setattr(fast.hardware, "name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(fast, "PDL_MEASURED", {("H200", version): True, ("H100", version): False})
    assert fast.remembered_pdl(torch.device("cpu")) == (True, f"PDL_MEASURED[H200, torch {version}]")
    monkeypatch.setattr(fast, "PDL_MEASURED", {("H200", "1.0"): True})  # other software: not known
    assert fast.remembered_pdl(torch.device("cpu")) is None
    assert fast.software_key(torch.device("cpu")).startswith(f"NVIDIA_H200-torch{torch.__version__}")


def test_the_compile_cache_goes_under_gb10exp_cache_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(
        "TORCHINDUCTOR_CACHE_DIR", default_cache_dir()
    )  # as Inductor leaves it after a compile
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = fast.use_compile_cache(torch.device("cpu"))
    assert folder == str(tmp_path / "cache" / "compile" / fast.software_key(torch.device("cpu")))
    assert (
        os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
        and os.environ["TRITON_CACHE_DIR"] == folder + "/triton"
    )
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fast.use_compile_cache(torch.device("cpu")) == str(tmp_path / "mine")


def test_pdl_auto_has_nothing_to_time_in_a_one_token_request(monkeypatch):
    monkeypatch.setattr(FastDecoder, "_pdl_unusable", lambda self: None)
    with FastDecoder(model_of("llama"), 1, 15, 1, compile_step=False, cuda_graph=True) as d:
        assert list(d.candidates) == [False]
        d.warm(PROMPT[:1, :15])
        assert "one-token request" in d.describe()


@pytest.mark.parametrize(("input_len", "output_len"), [(15, 1), (14, 2), (13, 3), (16, 1)])
def test_the_warm_up_steps_stay_inside_the_cache_of_a_short_request(input_len, output_len):
    model = model_of("llama")
    prompt = PROMPT[:1, :input_len]
    for graph in (False, True):  # 2 warm-up steps without a graph, 3 before a capture
        with FastDecoder(model, 1, input_len, output_len, compile_step=False, cuda_graph=graph) as d:
            d.warm(prompt)
            d.generate(prompt)
            assert torch.equal(d.tokens, reference(model, prompt, output_len))


def test_each_decoder_compiles_its_own_copy_of_the_step():
    """Dynamo's cache (8 entries, an error under fullgraph=True) lives on the code object: one shared by
    every decoder ran out after a few models in a sweep."""
    model = model_of("llama")
    codes = []
    for regional, native in ((True, True), (True, True), (False, True)):
        with FastDecoder(
            model, 1, 8, 4, compile_step=True, cuda_graph=True, native=native, regional=regional
        ) as d:
            step = d._step_fns[d.pdl]
            parts = step.parts if regional else (step,)  # by region: embed, layer, head; whole: one
            codes.append([part._torchdynamo_orig_callable.__func__.__code__ for part in parts])
    originals = {
        fast._NativeLlama.embed_step.__code__,
        fast._NativeLlama.layer_step.__code__,
        FastDecoder._finish.__code__,
        FastDecoder._step.__code__,
    }
    flat = [code for decoder in codes for code in decoder]
    ids = {id(c) for c in flat}  # code objects compare equal by content: identity is what counts here
    assert len(ids) == 7 and not ids & {id(c) for c in originals}


@pytest.mark.slow  # three Python processes that each import torch and transformers: minutes on 2 busy cores
def test_hf_decode_reports_medians_and_ranges_over_separate_processes(tmp_path):
    out = tmp_path / "hf_decode_{gpu}.json"
    command = [
        sys.executable,
        "benchmarks/hf_decode.py",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--runs",
        "2",
        "--modes",
        "generate,fast",
        "--baseline-runs",
        "1",
        "--out",
        str(out),
    ]
    got = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "GB10EXP_COMMIT": "abc123"},
    )
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    report = json.loads((tmp_path / "hf_decode_cpu.json").read_text())
    assert report["runs_done"] == 2 and len(report["per_run"]) == 2 and report["commit"] == "abc123"
    assert "--runs 2" in report["command"] and report["machine"]["device"] == "cpu"
    fast = report["modes"]["fast"]
    tps = fast["over_runs"]["decode_tokens_per_s"]
    assert tps["min"] <= fast["decode_tokens_per_s"] == tps["median"] <= tps["max"] and len(tps["runs"]) == 2
    assert sorted(tps["runs"]) == sorted(r["modes"]["fast"]["decode_tokens_per_s"] for r in report["per_run"])
    assert fast["detail"].startswith("native Llama step")
    # --baseline-runs 1: the slow transformers reference only in the first process, the fast path in both
    assert [sorted(r["modes"]) for r in report["per_run"]] == [["fast", "generate"], ["fast"]]
    assert report["modes"]["generate"]["over_runs"]["decode_tokens_per_s"]["runs"] == [
        report["per_run"][0]["modes"]["generate"]["decode_tokens_per_s"]
    ]
    log = (tmp_path / "hf_decode_cpu.log").read_text()
    assert "run 2/2 (separate process)" in log and "median over 2 run(s)" in log
