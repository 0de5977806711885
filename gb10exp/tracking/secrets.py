"""Keep secrets out of everything that leaves the process: every such text passes through ``redact``.

A secret can arrive indirectly (a config value ``${oc.env:HF_TOKEN}``, a tracking URI with a password, an
exception quoting a header), so ``redact`` covers MLflow params, tags and artifacts, Hydra's output folder
(``RedactHydraFiles`` rewrites ``multirun.yaml`` and ``.hydra/*.yaml`` before the job's code runs), log
records and stdout/stderr (``install``), the sweep summary, error messages and reports. Secrets are: the
values of credential-named environment variables (HF_TOKEN, *_API_KEY, PGPASSWORD, RAY_AUTH_TOKEN, ...;
``MIN_SECRET_LEN`` characters at least), the content of the files such variables name (``*_PATH``, ``*_FILE``)
and of Ray's ``~/.ray/auth_token``, the password of any ``scheme://user:password@host`` URI of any scheme
(also as Hydra escapes it, ``\\:``), ``password=``/``token=``-style query parameters, ``Authorization:``
header values, and every password ``remember``-ed (those of the tracking URIs this process saw).
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

# Environment variable names that hold credentials (HF_TOKEN, OPENAI_API_KEY, PGPASSWORD, AWS_SECRET...).
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would blank ordinary words, and are no real secret
MIN_REMEMBERED_LEN = 4  # a URI's password is known to be one; still, "ab" would blank ordinary text
SECRET_FILE_NAME = re.compile(r"_(PATH|FILE)$", re.IGNORECASE)  # the variable names a file holding the secret
RAY_TOKEN_FILE = Path("~/.ray/auth_token")  # where Ray 2.60 keeps its token when no variable names one
MAX_SECRET_FILE_BYTES = 4096  # a token or a password file, not a config file that happens to match
# scheme://user:password@ — Hydra escapes ':' as '\:' in overrides.yaml, hydra.yaml and multirun.yaml.
URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*\\?://[^:/@\s'\"]*\\?:)(?P<secret>[^@\s'\"/]+)@", re.IGNORECASE
)
QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|token|access_token|api_key|apikey|secret)\\?=)(?P<secret>[^&\s'\"]+)",
    re.IGNORECASE,
)
AUTH_HEADER = re.compile(
    r"(?P<head>authorization\\?:\s*(?:basic|bearer|token)?\s*)(?P<secret>[A-Za-z0-9+/=._~-]{6,})",
    re.IGNORECASE,
)
MASK = "***"
_remembered: set[str] = set()


def remember(secret: str) -> None:
    """Mask ``secret`` (and its URL-encoded form) in every later ``redact`` of this process."""
    if len(secret) >= MIN_REMEMBERED_LEN:
        _remembered.update({secret, urllib.parse.quote(secret, safe=""), urllib.parse.unquote(secret)})


def secret_values() -> list[str]:
    """Secret environment values, secret files' contents and remembered passwords, longest first (so
    prefixes mask cleanly)."""
    named = {k: v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    values = {v for k, v in named.items() if not SECRET_FILE_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    files = [v for k, v in named.items() if SECRET_FILE_NAME.search(k)] + [str(RAY_TOKEN_FILE.expanduser())]
    for path in files:
        values |= _file_secret(path)
    return sorted(values | _remembered, key=len, reverse=True)


def _file_secret(path: str) -> frozenset[str]:
    """The stripped content of a small secret file; read again only when the file changes."""
    try:
        st = os.stat(path)
    except OSError:
        return frozenset()
    if st.st_size > MAX_SECRET_FILE_BYTES:
        return frozenset()
    return _read_secret(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _read_secret(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return frozenset()
    return frozenset({text}) if len(text) >= MIN_SECRET_LEN else frozenset()


def redact(text: str) -> str:
    """``text`` with secret values, URI passwords, secret query parameters and auth headers as ***."""
    for value in secret_values():
        text = text.replace(value, MASK)
    text = URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    text = QUERY_SECRET.sub(rf"\g<head>{MASK}", text)
    return AUTH_HEADER.sub(rf"\g<head>{MASK}", text)


def tracking_uri(uri: str) -> str:
    """The URI MLflow should be given for ``uri``; its password is remembered (masked everywhere).

    An http(s) URI with ``user:password@`` becomes the URI without them, and the credentials go to
    MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (in this process only): MLflow
    sends them as HTTP basic auth, and they never appear in a run, a log line or a URL MLflow prints.
    Database URIs (postgresql://user:pw@...) keep their credentials: SQLAlchemy needs them there.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        remember(parts.password)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return uri


def basic_auth_header() -> dict[str, str]:
    """The Authorization header MLflow itself would send (for our own requests, e.g. /health)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or password is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def redact_file(path: Path) -> bool:
    """Rewrite ``path`` redacted, atomically (parallel jobs may redact the same multirun.yaml)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    clean = redact(text)
    if clean == text:
        return False
    tmp = path.with_name(f".{path.name}.redact-{os.getpid()}")
    tmp.write_text(clean)
    os.replace(tmp, path)
    return True


def redact_hydra_files(sweep_dir: str | Path | None, output_dir: str | Path | None) -> None:
    """Hydra writes the resolved config and the overrides (tracking URI included) before any job code
    runs: multirun.yaml in the sweep folder, config.yaml/hydra.yaml/overrides.yaml under .hydra/."""
    if sweep_dir:
        redact_file(Path(sweep_dir) / "multirun.yaml")
    if output_dir:
        for path in (Path(output_dir) / ".hydra").glob("*.yaml"):
            redact_file(path)


class RedactFilter(logging.Filter):
    """Formats a record's message (and traceback) once, redacted, before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except Exception:  # a malformed record is logging's to report, not ours
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingStream(io.TextIOBase):
    """A text stream that redacts every write (stdout/stderr: print, tracebacks, tqdm, warnings)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer...
        return getattr(self._stream, name)


_FILTER = RedactFilter()


def install() -> None:
    """Redact this process's stdout, stderr and log handlers (idempotent; call again after Hydra
    configures logging, which replaces the root handlers)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def remember_in(text: str) -> None:
    """Remember the password of every URI in ``text`` (e.g. a command-line argument)."""
    for match in URL_PASSWORD.finditer(text):
        remember(match.group("secret").replace("\\", ""))


class RedactHydraFiles(Callback):
    """Hydra callback (conf/config.yaml): Hydra saves multirun.yaml and .hydra/{config,hydra,overrides}.yaml
    just before ``on_job_start``; they are rewritten redacted there, before the job's code runs, in every
    launcher's worker process (whose stdout, stderr and log handlers get redacted too)."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        for override in OmegaConf.select(config, "hydra.overrides.task", default=[]) or []:
            remember_in(str(override))
        install()
        redact_hydra_files(
            OmegaConf.select(config, "hydra.sweep.dir"), OmegaConf.select(config, "hydra.runtime.output_dir")
        )
