"""Keep secrets out of the MLflow store.

Nothing copies the environment into a run, but a secret can still arrive indirectly: a config value
written as ``${oc.env:HF_TOKEN}``, a tracking URI with a password in it, an exception message that
quotes a header. So every string a run records passes through ``redact`` first.
"""

from __future__ import annotations

import os
import re

# Environment variable names that hold credentials (HF_TOKEN, OPENAI_API_KEY, PGPASSWORD, AWS_SECRET...).
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would blank ordinary words, and are no real secret
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.IGNORECASE)
MASK = "***"


def secret_values() -> list[str]:
    """Values of the secret-looking environment variables, longest first (so prefixes mask cleanly)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with secret environment values and URL passwords replaced by ***."""
    for value in secret_values():
        text = text.replace(value, MASK)
    return URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
