"""Run identity: what makes two runs the same run (resume), its parts, and calibration-free formats."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from inprocess import all_runs, client, compose, new_store, run_job

from gb10exp import hardware
from gb10exp.backends import support
from gb10exp.data import EvalWindows
from gb10exp.quant import formats
from gb10exp.tracking import environment, identity


def test_other_hardware_is_a_new_run_and_the_same_identity_is_skipped(tmp_path, monkeypatch, caplog):
    store = new_store(tmp_path)
    real = hardware.describe(torch.device("cpu"))
    here = run_job(["qformat=bf16"], store)
    monkeypatch.setattr(hardware, "describe", lambda device: "NVIDIA GB10 sm_121")
    there = run_job(["qformat=bf16"], store)
    assert not there.get("skipped") and there["run_id"] != here["run_id"]
    with caplog.at_level(logging.INFO, logger="gb10exp.runner"):
        again = run_job(["qformat=bf16"], store)
    assert again == {"skipped": True, "run_id": there["run_id"]}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping"))
    assert f"identical run {there['run_id']} ('tiny_llama-bf16-hf', sweep inprocess" in line

    runs = all_runs(store)
    assert [r.data.tags["hardware"] for r in runs] == [real, "NVIDIA GB10 sm_121"]
    assert real.startswith("cpu ") and real.endswith(f" x{torch.get_num_threads()}")
    assert runs[0].data.tags["run_identity"] != runs[1].data.tags["run_identity"]
    assert runs[0].data.tags["config_hash"] == runs[1].data.tags["config_hash"]  # same config, other machine
    # What the MLflow UI shows: a one-line description, and a saved runs-table view on the experiment.
    ppl = runs[0].data.metrics["perplexity"]
    assert (
        runs[0]
        .data.tags["mlflow.note.content"]
        .startswith(f"tiny_llama bf16 (none) on hf · ppl {ppl:.3f} · KL 0.0000")
    )
    experiment = client(store).get_experiment(runs[0].info.experiment_id)
    view = json.loads(experiment.tags["mlflow.sharedViewState.gb10exp"])
    assert view["selectedColumns"][:2] == ["metrics.`rounded/perplexity`", "metrics.`rounded/kl_mean`"]
    assert view["searchFilter"] == "tags.kind IS NULL" and "mlflow.experimentKind" not in experiment.tags
    assert runs[0].data.metrics["rounded/perplexity"] == float(f"{ppl:.4g}")


def test_calibration_free_format_runs_once_across_calib_sizes_with_the_calibrated_numbers(tmp_path, caplog):
    store = new_store(tmp_path)
    once = run_job(["qformat=int4", "calib_size=4"], store)
    assert run_job(["qformat=int4", "calib_size=8", "seed=3"], store) == {
        "skipped": True,
        "run_id": once["run_id"],
    }
    # What skipping calibration skips could not change a number: int4's quantized weights with and without
    # a forward pass over 8 calibration samples are bit-identical.
    from gb10exp.models import random_llama
    from gb10exp.quant import calibration_loop, quantize

    samples = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    calibrated, skipped = (quantize(random_llama(), formats.load_qformat("int4"), loop)
                           for loop in (calibration_loop(samples, 4, torch.device("cpu")), None))
    weights = [{n: m.weight_quantizer(m.weight) for n, m in model.named_modules() if hasattr(m, "weight_quantizer")}
               for model in (calibrated, skipped)]
    assert len(weights[0]) == 16 and all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    calibrated = run_job(["qformat=int4", "calib_size=8", "kv_cache_qformat=fp8", "cache=false"], store)
    runs = all_runs(store)
    assert [r.data.tags["calibration"] for r in runs] == [
        "skipped: weight-only round-to-nearest, max calibration reads the weights alone",
        "8 samples of 64 tokens",  # KV-cache scales come from activations: the same int4 now calibrates
    ]
    assert runs[0].data.tags["calib_digest"] == "none" and len(runs[1].data.tags["calib_digest"]) == 16
    # The data as MLflow dataset inputs, digested like the tags; no calibration input where none ran.
    for run, kinds in zip(runs, (["eval"], ["calibration", "eval"]), strict=True):
        inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
        assert sorted(inputs) == [f"pydoc_topics-{k}" for k in kinds]
        assert inputs["pydoc_topics-eval"].digest == run.data.tags["eval_digest"]
        assert '"tokens": 256' in inputs["pydoc_topics-eval"].profile  # 4 windows x 64 tokens
    assert {d.dataset.name: d.dataset.digest for d in runs[1].inputs.dataset_inputs}[
        "pydoc_topics-calibration"
    ] == (runs[1].data.tags["calib_digest"])


# What each format reads, by hand from modelopt's configs: weight-only round-to-nearest reads no data.
CALIBRATION_FREE = {"bf16", "gguf_nvfp4", "gguf_q4_k_m", "int4", "nvfp4_wo"}


@pytest.mark.parametrize("name", formats.options())
def test_calibration_need_is_derived_from_what_the_modelopt_config_reads(name):
    fmt = formats.of(formats.load_qformat(name))
    assert (fmt.needs_data is None) == (name in CALIBRATION_FREE), fmt.needs_data


def test_a_format_that_reads_activations_says_why_and_kv_cache_scales_need_data():
    assert formats.of(formats.load_qformat("fp8")).needs_data.startswith("it enables activation quantizers (input")
    assert formats.of(formats.load_qformat("int4_awq")).needs_data == "its algorithm 'awq_lite' reads activations"
    int4 = formats.load_qformat("int4")
    assert not formats.of(int4).calibrates and formats.of(int4, "fp8").calibrates  # KV scales: activations
    assert "bmm_quantizer" in formats.of(int4, "fp8").needs_data


def test_digests_follow_the_data():
    tokens = torch.arange(256)
    windows = tokens.reshape(4, 64)
    assert identity.tensor_digest(windows) == identity.tensor_digest(windows.clone())
    assert identity.tensor_digest(windows) != identity.tensor_digest(tokens.reshape(2, 128))  # same bytes
    other = windows.clone()
    other[3, 63] += 1
    assert identity.tensor_digest(windows) != identity.tensor_digest(other)
    cfg, _ = compose([])

    def scored(t, start=32, protocol="llamacpp"):
        return EvalWindows(t, torch.full((t.shape[0],), start), protocol)

    assert identity.eval_digest(scored(windows), cfg) != identity.eval_digest(scored(other), cfg)
    # The same tokens scored from other positions, or under another protocol, are other data.
    assert identity.eval_digest(scored(windows), cfg) != identity.eval_digest(scored(windows, start=1), cfg)
    assert identity.eval_digest(scored(windows), cfg) != identity.eval_digest(scored(windows, protocol="rolling"), cfg)
    # Settings that do not change the scored tokens (batch size, data file name) do not change the digest.
    batched, _ = compose(["eval.batch_size=1"])
    assert identity.eval_digest(scored(windows), cfg) == identity.eval_digest(scored(windows), batched)


def test_tokenizer_digest_sees_a_changed_vocabulary():
    from gb10exp.models import load_tokenizer

    cfg, _ = compose([])
    tok = load_tokenizer(cfg.model)
    before = identity.tokenizer_digest(tok)
    assert before == identity.tokenizer_digest(load_tokenizer(cfg.model))
    tok.add_tokens(["<gb10exp-new-token>"])
    assert identity.tokenizer_digest(tok) != before


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_code_version_is_dirty_for_untracked_code_but_not_for_other_files(tmp_path):
    root = tmp_path / "checkout"
    (root / "gb10exp").mkdir(parents=True)
    (root / "conf").mkdir()
    (root / "gb10exp" / "a.py").write_text("x = 1\n")
    (root / "conf" / "c.yaml").write_text("k: 1\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    commit = _git(root, "rev-parse", "HEAD")
    clean = environment.code_digest(root)
    assert environment.code_version(root) == commit

    (root / "README.md").write_text("docs change nothing\n")  # outside gb10exp/ and conf/
    (root / "gb10exp" / "__pycache__").mkdir()
    (root / "gb10exp" / "__pycache__" / "a.pyc").write_bytes(b"ignored")
    assert environment.code_version(root) == commit and environment.code_digest(root) == clean

    (root / "gb10exp" / "new.py").write_text("y = 2\n")  # untracked code
    assert environment.code_version(root) == f"{commit}-dirty"
    first_dirty = environment.code_digest(root)
    (root / "gb10exp" / "new.py").write_text("y = 3\n")  # another dirty state: same version, other digest
    assert environment.code_version(root) == f"{commit}-dirty"
    assert len({clean, first_dirty, environment.code_digest(root)}) == 3

    (root / "gb10exp" / "new.py").unlink()
    (root / "conf" / "c.yaml").write_text("k: 2\n")  # tracked config edited
    assert environment.code_version(root) == f"{commit}-dirty"
    assert environment.code_version(tmp_path / "not-a-checkout") == "unknown"


def test_nvfp4_is_simulated_on_the_hf_backend_even_with_fp4_tensor_cores(monkeypatch):
    monkeypatch.setattr(hardware, "fp4_tensor_cores", lambda device: True)  # as on a Blackwell GPU
    cpu = torch.device("cpu")

    def tags(*args):
        cfg, _ = compose(list(args))
        return support.quantization_tags("hf", formats.of(cfg.qformat, cfg.kv_cache_qformat), cpu)

    assert tags("qformat=nvfp4") == {"quantization": "simulated (modelopt fake quantization)", "nvfp4": "simulated"}
    assert tags("qformat=nvfp4_wo")["nvfp4"] == "simulated"
    assert "nvfp4" not in tags("qformat=fp8")  # no FP4 anywhere
    assert tags("qformat=fp8", "kv_cache_qformat=nvfp4")["nvfp4"] == "simulated"
    assert tags("qformat=bf16") == {"quantization": "none"}
