"""Model loading through the real transformers code paths, on local files (no hub here)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gb10exp.config import ConfigError, ModelConfig
from gb10exp.models import EMBEDDED, check_model, embedded_file, load_model, load_tokenizer, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama saved as a normal transformers folder, with the embedded model's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-hf")
    tokenizer = load_tokenizer(EMBEDDED)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("source,key", [("local", "path"), ("hub", "id")])
def test_local_folder_loads_through_both_paths(saved_model, source, key):
    path, original = saved_model
    cfg = ModelConfig(name="x", source=source, **{key: str(path)})  # a hub id may be a local folder too
    check_model(cfg)
    model = load_model(cfg, CPU, torch.float32)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, original(tokens).logits)
    assert load_tokenizer(cfg)("hello world")["input_ids"] == load_tokenizer(EMBEDDED)("hello world")["input_ids"]


def test_embedded_gguf_loads_as_a_real_model_also_as_a_local_file():
    gguf = embedded_file(EMBEDDED)
    model = load_model(ModelConfig(name="g", source="local", path=str(gguf)), CPU, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    cached = load_model(EMBEDDED, CPU, torch.float32)  # the embedded path caches the dequantized weights
    assert torch.equal(cached.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_random_models_are_seeded():
    cfg = ModelConfig(name="r", source="random", arch={"hidden_size": 32, "intermediate_size": 64,
                                                       "num_hidden_layers": 1, "num_attention_heads": 2})
    a, b = load_model(cfg, CPU, torch.float32), load_model(cfg, CPU, torch.float32)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert a.config.vocab_size == len(load_tokenizer(cfg))


def test_missing_path_and_auto_dtype():
    with pytest.raises(ConfigError, match="model.path='/no/such' is not allowed: it does not exist"):
        check_model(ModelConfig(name="x", source="local", path="/no/such"))
    assert resolve_dtype("auto", CPU) == torch.float32  # CPUs have no fast bf16 here
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
