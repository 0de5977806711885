"""Downstream accuracy through lm-evaluation-harness on a local 12-question task (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gb10exp.config import ConfigError, EvalConfig, ModelConfig
from gb10exp.evaluate.tasks import _resolve_files, check_tasks, run_tasks, task_metrics

TASKS = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
TASK = "gb10exp_mini_mc"


def eval_cfg(**kw) -> EvalConfig:
    return EvalConfig(dataset="pydoc_topics", **{"tasks": [TASK], "task_include_path": str(TASKS), **kw})


def test_task_metrics_are_flat_and_numeric():
    results = {"results": {"mini": {"alias": "mini", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                    "exact_match,strict-match": 0.25, "acc_norm_stderr,none": "N/A",
                                    "sample_len": 12}}}
    assert task_metrics(results) == {"task/mini/acc": 0.5, "task/mini/acc_stderr": 0.1,
                                     "task/mini/exact_match_strict-match": 0.25, "task/mini/sample_len": 12.0}


def test_relative_data_files_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    files = {"test": "a.jsonl", "train": ["a.jsonl", "missing.jsonl"], "hub": "hf://datasets/x/*.json"}
    assert _resolve_files(files, tmp_path) == {
        "test": str(tmp_path / "a.jsonl"), "train": [str(tmp_path / "a.jsonl"), "missing.jsonl"],
        "hub": "hf://datasets/x/*.json"}


def test_missing_task_folder_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.task_include_path='.*nope' is not allowed: no such folder"):
        check_tasks(eval_cfg(task_include_path=str(tmp_path / "nope")))
    check_tasks(EvalConfig(dataset="pydoc_topics"))  # no tasks: nothing to check, nothing imported


@pytest.mark.slow  # indexing lm-eval's task YAMLs alone takes ~10 s on 2 cores
def test_unknown_task_name_lists_where_it_looked():
    with pytest.raises(ConfigError, match=r"eval.tasks='no_such_task' is not allowed: .* or in .*lm_eval_tasks"):
        check_tasks(eval_cfg(tasks=["no_such_task"]))


@pytest.mark.slow
def test_run_tasks_on_a_tiny_model_from_any_directory(tmp_path, monkeypatch):
    from gb10exp.models import load_model, load_tokenizer

    model_cfg = ModelConfig(name="tiny", source="random", arch={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 256})
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, torch.device("cpu"), torch.float32)
    monkeypatch.chdir(tmp_path)  # the task's data file is found next to its YAML, not in the working dir
    check_tasks(eval_cfg())
    metrics = run_tasks(model, tokenizer, eval_cfg(), torch.device("cpu"))
    assert metrics[f"task/{TASK}/sample_len"] == 12
    assert 0.0 <= metrics[f"task/{TASK}/acc"] <= 1.0
    assert f"task/{TASK}/acc_stderr" in metrics
    limited = run_tasks(model, tokenizer, eval_cfg(task_limit=4), torch.device("cpu"))
    assert limited[f"task/{TASK}/sample_len"] == 4
    assert run_tasks(model, tokenizer, eval_cfg(tasks=[]), torch.device("cpu")) == {}
