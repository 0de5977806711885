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
    assert redact("http://host:5000/a/b@c") == "http://host:5000/a/b@c"  # a port and a path, no password
    # Hydra escapes ':' in overrides.yaml, hydra.yaml and multirun.yaml; every scheme is covered.
    assert redact(r"- tracking.uri=postgresql+psycopg2\://mlflow\:s3cr3t-pw@127.0.0.1\:5432/mlflow") == (
        r"- tracking.uri=postgresql+psycopg2\://mlflow\:***@127.0.0.1\:5432/mlflow")
    for uri in ("mysql://u:s3cr3t-pw@h/db", "https://u:s3cr3t-pw@h:443", "mssql+pyodbc://u:s3cr3t-pw@h/db"):
        assert "s3cr3t-pw" not in redact(uri) and "***@h" in redact(uri)
    assert redact("https://h/x?user=a&password=s3cr3t-pw&x=1") == "https://h/x?user=a&password=***&x=1"
    assert redact("Authorization: Bearer abcdef123456") == "Authorization: Bearer ***"


def test_remembered_password_is_masked_everywhere():
    from gb10exp.tracking.secrets import remember_in

    remember_in(r"tracking.uri=postgresql\://u\:Zq9-remembered@h/db")
    assert redact("driver said: password 'Zq9-remembered' rejected") == "driver said: password '***' rejected"


def test_hydra_files_and_logs_are_redacted(tmp_path, monkeypatch, capsys):
    import logging

    from gb10exp.tracking.secrets import RedactFilter, redact_hydra_files

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    (tmp_path / "job" / ".hydra").mkdir(parents=True)
    (tmp_path / "multirun.yaml").write_text("uri: postgresql://u:pw-secret1@h/db\ntoken: hf_abcdefghijkl\n")
    (tmp_path / "job" / ".hydra" / "overrides.yaml").write_text("- tracking.uri=http\\://u\\:pw-secret1@h\n")
    redact_hydra_files(tmp_path, tmp_path / "job")
    assert (tmp_path / "multirun.yaml").read_text() == "uri: postgresql://u:***@h/db\ntoken: ***\n"
    assert (tmp_path / "job" / ".hydra" / "overrides.yaml").read_text() == "- tracking.uri=http\\://u\\:***@h\n"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "uri %s failed", ("mysql://u:pw-secret1@h",), None)
    RedactFilter().filter(record)
    assert record.getMessage() == "uri mysql://u:***@h failed"


def test_trust_remote_code_is_off_unless_a_model_config_turns_it_on():
    from gb10exp.config import ModelConfig

    assert ModelConfig.__dataclass_fields__["trust_remote_code"].default is False
    for preset in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert "trust_remote_code: true" not in preset.read_text(), preset.name
