"""Typed schemas of every config group, registered once with Hydra's ConfigStore.

YAML files under ``conf/`` only fill values; the schema rejects unknown keys and wrong types, and the
``__post_init__`` checks reject values that cannot work, with one line naming the key, the value
received and what is allowed. Configs are pure data: nothing here touches the network, the GPU or the
disk: checks that do (does this model path exist, can this engine serve this format here) live with the
area that knows the answer, and ``gb10exp.preflight`` runs them in one ordered list before any job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING = "???"  # OmegaConf's marker of a required value (omegaconf.MISSING): this module imports nothing


class ConfigError(ValueError):
    """A configuration value that cannot work. The message is one line: key, value, what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


MODEL_SOURCES = ("embedded", "hub", "local", "random")
DATASETS = ("pydoc_topics", "wikitext2", "cnn_dailymail", "text_file")
# How text becomes scored tokens (gb10exp.data.eval_windows; docs/evaluation.md says why the default).
EVAL_PROTOCOLS = ("windows", "llamacpp", "rolling")
DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_CACHE_QFORMATS = ("none", "fp8", "nvfp4")
AUTO_METHODS = ("kl_div", "gradient")
# llama.cpp's quantizer output types (LLAMA_FTYPE_MOSTLY_<name>) a qformat may name as gguf_type.
GGUF_TYPES = ("F16", "BF16", "NVFP4", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_M",
              "Q2_K")


@dataclass
class ModelConfig:
    name: str = MISSING  # short label used in run names and tables
    source: str = MISSING  # embedded | hub | local | random
    id: str | None = None  # hub id (source=hub), or the embedded package's file (source=embedded)
    path: str | None = None  # folder or .gguf file (source=local)
    gguf_file: str | None = None  # file inside `path`/`id` when the model is a GGUF file
    revision: str | None = None  # hub revision (branch, tag or commit); recorded either way
    gated: bool = False  # needs HF_TOKEN (e.g. meta-llama/*)
    trust_remote_code: bool = False  # off unless a model config turns it on
    dtype: str = "auto"  # auto: bfloat16 on GPUs with fast bf16, float32 elsewhere
    arch: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs for source=random
    tokenizer: str | None = None  # tokenizer folder for source=random (default: the embedded SmolLM2's)
    seed: int = 0  # weights seed for source=random

    def __post_init__(self) -> None:
        _require(self.source in MODEL_SOURCES, "model.source", self.source, f"one of {list(MODEL_SOURCES)}")
        _require(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {list(DTYPES)}")
        if self.source == "hub":
            _require(bool(self.id), "model.id", self.id, "a Hugging Face model id, e.g. meta-llama/Llama-3.1-8B-Instruct")
        if self.source == "local":
            _require(bool(self.path), "model.path", self.path, "a local model folder or .gguf file (model=local model.path=/path/to/model)")
        if self.source == "random":
            _require(bool(self.arch), "model.arch", self.arch, "LlamaConfig keyword arguments (hidden_size, num_hidden_layers, ...)")
        _require(bool(str(self.name).strip()), "model.name", self.name, "a non-empty name (it names the runs)")


@dataclass
class AutoConfig:
    """qformat=auto: modelopt's per-layer search (mtq.auto_quantize) under an average bit budget."""

    formats: list[str] = field(default_factory=lambda: ["nvfp4", "fp8"])  # qformat options to choose from
    # Average bits per weight (scales included) over the linear layers the fixed formats quantize (lm_head
    # excluded, as in every other format), so 4.5 = all nvfp4 and 8 = all fp8 on [nvfp4, fp8].
    effective_bits: float = 6.0
    method: str = "kl_div"  # kl_div: KL against the unquantized model (what the issue asks); gradient: faster
    score_samples: int = 1  # calibration samples scored; each costs one forward per layer group and format

    def __post_init__(self) -> None:
        _require(bool(self.formats), "qformat.auto.formats", self.formats, "a non-empty list of qformat options")
        _require(0 < self.effective_bits <= 16, "qformat.auto.effective_bits", self.effective_bits,
                 "average bits per weight in (0, 16], e.g. 4.8")
        _require(self.method in AUTO_METHODS, "qformat.auto.method", self.method, f"one of {list(AUTO_METHODS)}")
        _require(self.score_samples > 0, "qformat.auto.score_samples", self.score_samples, "a positive number")


@dataclass
class QFormatConfig:
    """A quantization format: only what cannot be derived. Everything else (quant_algo, bits per weight,
    block size, whether it reads calibration data...) is derived from the modelopt config it names by
    ``gb10exp.quant.formats.of``."""

    name: str = MISSING  # the value users type: qformat=nvfp4
    modelopt_cfg: str | None = None  # attribute of modelopt.torch.quantization (kind modelopt)
    # Quantized by llama.cpp's own quantizer, not modelopt (e.g. Q4_K_M): only engines that run GGUF files
    # can serve it, and its accuracy comes from the engine itself.
    gguf_type: str | None = None
    description: str = ""
    auto: AutoConfig | None = None  # mtq.auto_quantize's search over other formats (conf/qformat/auto.yaml)

    def __post_init__(self) -> None:
        given = [k for k in ("modelopt_cfg", "gguf_type", "auto") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"qformat.{given[1]}={getattr(self, given[1])!r} is not allowed with "
                              f"qformat.{given[0]}={getattr(self, given[0])!r}: a format is quantized one way "
                              "(modelopt_cfg, gguf_type or auto)")
        if self.gguf_type is not None:
            _require(self.gguf_type in GGUF_TYPES, "qformat.gguf_type", self.gguf_type, f"one of {list(GGUF_TYPES)}")


@dataclass
class DataConfig:
    dataset: str = MISSING  # pydoc_topics | wikitext2 | cnn_dailymail | text_file
    path: str | None = None  # the file for dataset=text_file
    seq_len: int = 512  # tokens per calibration sample / evaluation window

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, f"{self._key}.dataset", self.dataset, f"one of {list(DATASETS)}")
        _require(self.seq_len > 0, f"{self._key}.seq_len", self.seq_len, "a positive number of tokens")
        if self.dataset == "text_file":
            _require(bool(self.path), f"{self._key}.path", self.path, "a text file (dataset=text_file needs path=...)")

    _key = "data"


@dataclass
class CalibConfig(DataConfig):
    # Fake quantization re-quantizes the weights at every forward pass, so few large batches calibrate
    # several times faster than many small ones (max calibration sees the same samples either way).
    batch_size: int = 8
    _key = "calib"


@dataclass
class EvalConfig(DataConfig):
    num_windows: int = 32  # perplexity windows; identical for every format of a model
    enabled: bool = True  # false: speed only, of whatever the engine serves (no model load, no accuracy)
    batch_size: int = 4
    compare_baseline: bool = True  # KL divergence and top-1 agreement against the unquantized model
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (downstream accuracy)
    task_include_path: str | None = None  # folder of local lm-eval task YAMLs
    task_limit: int | None = None  # lm-eval `limit`: examples per task (None = all)
    # llamacpp: llama.cpp's perplexity tool (BOS per window, second half scored); rolling: lm-eval's rolling
    # log-likelihood (every token once); windows: every position of plain windows (before 2026-11-26).
    protocol: str = "llamacpp"
    allow_long_context: bool = False  # true: sequences beyond the model's context only warn (preflight)
    _key = "eval"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.protocol in EVAL_PROTOCOLS, "eval.protocol", self.protocol,
                 f"one of {list(EVAL_PROTOCOLS)} (e.g. eval.protocol=llamacpp)")
        _require(self.num_windows > 0, "eval.num_windows", self.num_windows, "a positive number of windows")
        _require(self.batch_size > 0, "eval.batch_size", self.batch_size, "a positive batch size")


@dataclass
class BenchConfig:
    enabled: bool = True
    input_len: int = 128  # prompt tokens
    output_len: int = 32  # generated tokens, forced (EOS ignored)
    batch_size: int = 1  # concurrent sequences (requests, for servers)
    depth: int = 0  # tokens already in the context before the measured prompt (llama-bench -d), e.g. 0,4096
    model_bytes: float | None = None  # bytes of the weights the engine runs, where it cannot say (a server)
    warmup: int = 2  # runs excluded from the figures
    repeats: int = 5  # runs whose median / p90 are reported
    engine_ppl_windows: int = 4  # eval windows scored by the engine itself where it returns log-probs (0: off)
    ppl_tolerance: float = 0.10  # engine perplexity further than this (relative) from the offline one: flagged
    measure_fake_quant: bool = False  # time fake-quantized (modelopt simulated) models anyway; not their real speed

    def __post_init__(self) -> None:
        for key in ("input_len", "output_len", "batch_size", "repeats"):
            value = getattr(self, key)
            _require(value > 0, f"bench.{key}", value, "a positive integer")
        _require(self.warmup >= 0, "bench.warmup", self.warmup, "zero or more runs")
        _require(self.depth >= 0, "bench.depth", self.depth, "0 or more tokens of context before the prompt")
        _require(self.model_bytes is None or self.model_bytes > 0, "bench.model_bytes", self.model_bytes,
                 "null or the engine's weight bytes, e.g. 4.9e9")
        _require(self.engine_ppl_windows >= 0, "bench.engine_ppl_windows", self.engine_ppl_windows, "0 (off) or more windows")
        _require(self.ppl_tolerance > 0, "bench.ppl_tolerance", self.ppl_tolerance, "a positive fraction, e.g. 0.10")


@dataclass
class BackendConfig:
    """A backend: its name and its typed options, each backend's own schema (gb10exp/backends/<name>/config.py,
    registered as ``backend_schema/<name>``, which conf/backend/<name>.yaml names in its defaults list)."""

    name: str = MISSING  # hf | llamacpp | openai | trtllm
    options: Any = None


@dataclass
class QuantConfig:
    """How modelopt calibrates, whatever the format: for models larger than memory (docs/large_models.md)."""

    # Calibrate one decoder layer at a time (modelopt's layerwise calibration). With max calibration the result
    # is bit-identical to calibrating the whole model at once; it re-runs the calibration data once per layer.
    layerwise: bool = False
    # With layerwise=true: keep the decoder layers' weights on disk in this folder (accelerate's per-tensor
    # .dat files, written once per model and dtype), loading one module's weights at a time; the embedding,
    # final norm and lm_head stay in memory. null: the whole model in memory.
    offload_dir: str | None = None

    def __post_init__(self) -> None:
        if self.offload_dir is not None:
            _require(self.layerwise and bool(self.offload_dir.strip()), "quant.offload_dir", self.offload_dir,
                     "a folder, together with quant.layerwise=true (ordinary calibration would pull every "
                     "offloaded weight back into memory)")


@dataclass
class TrackingConfig:
    uri: str = MISSING  # sqlite:///... (default), http://host:5000, postgresql://...
    experiment: str = MISSING
    artifact_root: str | None = None  # where a new experiment keeps its artifacts (local stores)
    run_name: str | None = None

    def __post_init__(self) -> None:
        _require(bool(str(self.uri).strip()), "tracking.uri", self.uri, "sqlite:///path/mlflow.db, http(s)://host:port or a database URI")
        _require(bool(str(self.experiment).strip()), "tracking.experiment", self.experiment, "a non-empty experiment name")
        _require(self.run_name is None or bool(str(self.run_name).strip()), "tracking.run_name", self.run_name,
                 "a non-empty name, or null for gb10exp's own (<model>-<qformat>-...)")


@dataclass
class Config:
    model: ModelConfig = MISSING
    qformat: QFormatConfig = MISSING
    calib: CalibConfig = MISSING
    eval: EvalConfig = MISSING
    backend: BackendConfig = MISSING
    tracking: TrackingConfig = MISSING
    bench: BenchConfig = field(default_factory=BenchConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib_size: int = 128  # calibration samples of calib.seq_len tokens
    kv_cache_qformat: str = "none"  # KV-cache quantization; off so that it never confounds a comparison
    seed: int = 0  # picks the calibration samples (the same for every format)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    force: bool = False  # rerun even if an identical finished run exists
    cache: bool = True  # reuse quantized models and evaluation results from $GB10EXP_CACHE
    # Hydra cannot take `export=true` for a config group, hence two flat keys. (--help prints these comments.)
    export: bool = False  # write the quantized model as modelopt's unified HF checkpoint (trtllm-serve, vllm)
    export_dir: str | None = None  # where (with export=true); default <job output dir>/checkpoint

    def __post_init__(self) -> None:
        _require(self.calib_size > 0, "calib_size", self.calib_size, "a positive number of calibration samples")
        _require(self.kv_cache_qformat in KV_CACHE_QFORMATS, "kv_cache_qformat", self.kv_cache_qformat,
                 f"one of {list(KV_CACHE_QFORMATS)}")
        _require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", self.device,
                 "auto, cpu, cuda or cuda:N")
        if self.export_dir is not None:
            _require(self.export and bool(self.export_dir.strip()), "export_dir", self.export_dir,
                     "a folder, together with export=true (export=true export_dir=PATH)")
