"""One model per run: a GGUF (or a served model) whose vocabulary is not the run's tokenizer's is refused
in one line before anything is quantized."""

from __future__ import annotations

import pytest
from conftest import mlflow_runs, run_gb10exp

from gb10exp.backends.same_model import check_gguf
from gb10exp.config import ConfigError, ModelConfig
from gb10exp.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny", source="random", arch={"hidden_size": 8}))


def write_gguf(path, tokens: list[str]):
    """A GGUF holding only a vocabulary (and one small tensor): what check_gguf reads."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("probe-model")
    writer.add_token_list(tokens)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vocab(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def test_the_same_vocabulary_passes_and_its_bytes_read_by_the_byte_rule(tmp_path, tokenizer):
    from gb10exp.quant.bytes import from_gguf

    same = write_gguf(tmp_path / "same.gguf", vocab(tokenizer))
    name, tag = check_gguf(same, tokenizer, "key")
    assert name == "probe-model" and tag.startswith("ok: the GGUF's vocabulary (49152")
    assert from_gguf(same).weight_bytes == 4 * 8 * 4  # its one 4 x 8 float32 tensor


def test_another_vocabulary_is_refused_in_one_line(tmp_path, tokenizer):
    tokens = vocab(tokenizer)
    shifted = write_gguf(tmp_path / "other.gguf", tokens[5:] + tokens[:5])
    with pytest.raises(
        ConfigError,
        match=r"^key is not allowed: the GGUF other.gguf names token \d+ '.*' where the "
        r"run's tokenizer has '.*': a different model; [^\n]*$",
    ):
        check_gguf(shifted, tokenizer, "key")
    smaller = write_gguf(tmp_path / "small.gguf", tokens[:32000])
    with pytest.raises(
        ConfigError,
        match=r"the GGUF small.gguf has a vocabulary of 32000 tokens and the run's "
        r"tokenizer 49152",
    ):
        check_gguf(smaller, tokenizer, "key")
    padded = write_gguf(
        tmp_path / "padded.gguf", tokens + [f"[PAD{i}]" for i in range(64)]
    )  # padding is fine
    assert check_gguf(padded, tokenizer, "key")[1].startswith("ok")


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_refuses_a_mismatched_gguf_before_quantizing(tmp_path, tokenizer):
    tokens = vocab(tokenizer)
    bad = write_gguf(tmp_path / "other.gguf", tokens[5:] + tokens[:5])
    out = run_gb10exp(
        "model=tiny_llama",
        "calib_size=4",
        "calib.seq_len=64",
        "eval.seq_len=64",
        "eval.num_windows=4",
        "backend=llamacpp",
        f"backend.options.gguf={bad}",
        "qformat=gguf_q4_k_m",  # a format llama.cpp serves, so only the vocabulary check can refuse it
        store=tmp_path,
    )
    assert out.returncode != 0
    assert (
        "backend.options.gguf=" in out.stdout + out.stderr and "a different model" in out.stdout + out.stderr
    )
    assert mlflow_runs(tmp_path)[1] == []  # no run was started: nothing calibrated, quantized or evaluated
