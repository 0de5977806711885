"""lm-eval has no public task-YAML loader: gb10exp uses its private one where it exists and its own
fallback elsewhere; both must read a task the same way (include merged, !function resolved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gb10exp.evaluate.tasks import _load_yaml, load_task_yaml

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_tasks" / "gb10exp_mini_mc.yaml"


def _task_folder(tmp_path: Path) -> Path:
    (tmp_path / "utils.py").write_text("def process(docs):\n    return docs\n")
    (tmp_path / "base.yaml").write_text(
        "output_type: multiple_choice\ntest_split: test\nmetadata: {version: 1}\n"
    )
    (tmp_path / "task.yaml").write_text(
        "include: base.yaml\ntask: t\ntest_split: validation\nprocess_docs: !function utils.process\n"
    )
    return tmp_path / "task.yaml"


def test_fallback_reads_tasks_as_lm_eval_does(tmp_path):
    pytest.importorskip(
        "lm_eval.tasks._yaml_loader", reason="the installed lm-eval has no loader to compare with"
    )
    for path in (FIXTURE, _task_folder(tmp_path)):
        ours, theirs = _load_yaml(path), load_task_yaml(path)
        assert ours.keys() == theirs.keys()
        for key in ours:
            if callable(ours[key]):
                assert ours[key].__name__ == theirs[key].__name__ and ours[key]([1]) == theirs[key]([1]) == [
                    1
                ]
            else:
                assert ours[key] == theirs[key]


def test_fallback_merges_includes_and_resolves_functions(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval.tasks._yaml_loader", None)  # as in an lm-eval without it
    cfg = load_task_yaml(_task_folder(tmp_path))
    assert cfg["task"] == "t" and cfg["output_type"] == "multiple_choice"
    assert cfg["test_split"] == "validation"  # the including file's keys win
    assert cfg["process_docs"](["d"]) == ["d"]
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\ntask: x\n")
    with pytest.raises(ValueError, match="include cycle"):
        load_task_yaml(tmp_path / "loop.yaml")
