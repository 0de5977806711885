"""``backend=openai`` options (``backend.options.*``): any OpenAI-compatible server, already running."""

from __future__ import annotations

from dataclasses import dataclass, field

from gb10exp.config import BackendConfig, _require

PROMPT_FORMATS = ("text", "tokens")


@dataclass
class OpenAIOptions:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # the served model's name (null: the first of GET /models)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key, if the server wants one (never logged)
    prompt_format: str = "text"  # text: prompts as text (every server) | tokens: token ids (vLLM, trtllm-serve)
    # request fields that make the server ignore EOS; drop those it rejects
    force_length: list[str] = field(default_factory=lambda: ["min_tokens", "ignore_eos"])
    gguf: str | None = None  # the GGUF file the server runs: exact bytes per decode step for the roofline
    device: str = "auto"  # where the server's weights are, for the roofline: auto (this machine's GPU if any) | cpu | cuda
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _require(self.prompt_format in PROMPT_FORMATS, "backend.options.prompt_format", self.prompt_format,
                 f"one of {list(PROMPT_FORMATS)}")
        _require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "backend.options.device",
                 self.device, "auto, cpu, cuda or cuda:N")
        _require(self.base_url.startswith(("http://", "https://")), "backend.options.base_url", self.base_url,
                 "an http(s):// URL of the server's OpenAI API, e.g. http://127.0.0.1:8000/v1")
        _require(self.timeout_s > 0, "backend.options.timeout_s", self.timeout_s, "a positive number of seconds")


@dataclass
class OpenAIBackendConfig(BackendConfig):
    name: str = "openai"
    options: OpenAIOptions = field(default_factory=OpenAIOptions)
