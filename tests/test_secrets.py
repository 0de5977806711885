"""Tokens, keys and passwords in the environment never reach the MLflow store, even when a config value
pulls one in; trust_remote_code is off unless a model config turns it on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch
from conftest import ROOT, TINY, run_gb10exp

from gb10exp.tracking.environment import environment
from gb10exp.tracking.secrets import redact

PLANTED = {"HF_TOKEN": "hf_plantedSECRET123", "MY_API_KEY": "sk-plantedKEY-4567", "PGPASSWORD": "plantedPW-890"}


def _store_text(store: Path) -> str:
    """Every row of every table of the SQLite store, and every artifact file, as one string."""
    parts = []
    with sqlite3.connect(store / "mlflow.db") as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            parts += [repr(row) for row in db.execute(f'SELECT * FROM "{table}"')]
    parts += [p.read_text(errors="replace") for p in (store / "artifacts").rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_planted_secrets_never_reach_the_store(tmp_path):
    # The run name and the failing model path pull the key in through the config, as a careless user might.
    out = run_gb10exp(*TINY, "qformat=bf16,fp8", "tracking.run_name=run-${oc.env:MY_API_KEY}", store=tmp_path,
                      env=PLANTED | {"SECRET_URI": "postgresql://me:plantedURLpass@db/x"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = _store_text(tmp_path)
    assert "run-***" in text and "FINISHED" in text  # the runs are there, the key masked
    for value in [*PLANTED.values(), "plantedURLpass"]:
        assert value not in text


def test_environment_tags_hold_no_environment_variables(monkeypatch):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    tags = environment(torch.device("cpu"))
    assert not set(PLANTED.values()) & set(tags.values())
    assert not any(name in key for key in tags for name in PLANTED)


def test_redact(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abcdefghij")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to be a secret: ordinary text stays intact
    assert redact("key sk-abcdefghij, 1 run") == "key ***, 1 run"
    assert redact("postgresql://user:pw123456@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert redact("http://host:5000/x") == "http://host:5000/x"


def test_trust_remote_code_is_off_unless_a_model_config_turns_it_on():
    from gb10exp.config import ModelConfig

    assert ModelConfig.__dataclass_fields__["trust_remote_code"].default is False
    for preset in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert "trust_remote_code: true" not in preset.read_text(), preset.name
