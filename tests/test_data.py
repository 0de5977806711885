"""Calibration and evaluation text: disjoint, deterministic, and sized honestly."""

from __future__ import annotations

import pytest
import torch

from gb10exp import data
from gb10exp.config import CalibConfig, ConfigError, EvalConfig


def test_pydoc_calibration_and_evaluation_never_overlap():
    from pydoc_data.topics import topics

    calib = data.load_text("calib", CalibConfig(dataset="pydoc_topics"))
    evaluation = data.load_text("eval", EvalConfig(dataset="pydoc_topics"))
    in_calib = {k for k, v in topics.items() if v in calib}
    in_eval = {k for k, v in topics.items() if v in evaluation}
    assert in_calib and in_eval and not (in_calib & in_eval)
    assert len(in_eval) * 4 == pytest.approx(len(topics), abs=4)  # every 4th topic


def test_calibration_samples_are_seeded_and_distinct():
    tokens = torch.arange(10_000)
    a = data.calib_samples(tokens, 100, 16, seed=0)
    assert torch.equal(a, data.calib_samples(tokens, 100, 16, seed=0))
    assert not torch.equal(a, data.calib_samples(tokens, 100, 16, seed=1))
    assert a.shape == (16, 100) and len({int(row[0]) for row in a}) == 16
    assert all(int(row[0]) % 100 == 0 for row in a)  # whole windows, never straddling two


def test_eval_windows_are_the_first_n():
    windows = data.eval_windows(torch.arange(1000), 100, 3)
    assert windows.tokens.tolist()[2][:2] == [200, 201] and windows.tokens.shape == (3, 100)
    assert windows.scored == [99, 99, 99] and windows.protocol == "windows"  # every target, no BOS


def test_asking_for_more_than_the_text_holds_fails_clearly():
    with pytest.raises(ConfigError, match=r"calib_size=11 is not allowed: the calibration text holds only 10 samples"):
        data.calib_samples(torch.arange(1000), 100, 11, seed=0)
    with pytest.raises(ConfigError, match=r"eval.num_windows=5 is not allowed: .* only 4 windows"):
        data.eval_windows(torch.arange(400), 100, 5)


def test_text_file_splits_lines_three_to_one(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"line {i}" for i in range(8)))
    assert data.load_text("calib", CalibConfig(dataset="text_file", path=str(path))).splitlines()[-1] == "line 5"
    assert data.load_text("eval", EvalConfig(dataset="text_file", path=str(path))).splitlines() == ["line 6", "line 7"]
    with pytest.raises(ConfigError, match="no such file"):
        data.load_text("eval", EvalConfig(dataset="text_file", path=str(tmp_path / "missing.txt")))
