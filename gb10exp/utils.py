"""Small shared helpers: the cache folder, content keys, and atomic publication of files and folders."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from gb10exp.config import ConfigError

log = logging.getLogger(__name__)

FULL_HASH_MAX_BYTES = 256 * 2**20  # hash whole files up to this; larger ones: size, mtime and samples
SAMPLES, SAMPLE_BYTES = 16, 2**20
STALE_TMP_S = 24 * 3600  # a writer's temporary folder older than this, whose writer is gone, is removed
OWNER_FILE = ".owner.json"
_swept: set[Path] = set()


def cache_dir(*parts: str) -> Path:
    """A folder under ``$GB10EXP_CACHE`` (default ``~/.cache/gb10exp``), created on demand. The first
    use in a process removes stale ``.tmp-*`` entries (writers killed mid-save) under the root."""
    root = Path(os.environ.get("GB10EXP_CACHE", Path.home() / ".cache" / "gb10exp")).expanduser()
    if root not in _swept:
        _swept.add(root)
        remove_stale_tmp(root)
    path = root.joinpath(*(safe_name(p) for p in parts))
    path.mkdir(parents=True, exist_ok=True)
    return path


def safe_name(text: str) -> str:
    """``text`` as one path component: config values (model.name) never climb out of the cache or hide."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", str(text)).lstrip(".") or "_"
    return cleaned[:120]


def content_key(path: Path) -> str:
    """A digest of the file's content: the whole file up to FULL_HASH_MAX_BYTES; beyond that its size,
    mtime and SAMPLES evenly spread 1 MiB samples (a full hash of a 16 GB file would take minutes)."""
    stat = Path(path).stat()
    return _content_key(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _content_key(path: str, size: int, mtime_ns: int) -> str:  # cached per file state: jobs ask often
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= FULL_HASH_MAX_BYTES:
            for block in iter(lambda: f.read(2**22), b""):
                digest.update(block)
        else:
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
            step = (stat.st_size - SAMPLE_BYTES) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(i * step)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so a rename never publishes empty files
    after a power loss or a node crash."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- who owns a temporary entry or a run: a pid means one process only within one boot and pid namespace --
def _machine() -> str:
    """This kernel boot and pid namespace: pids mean the same process only within one of these."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: no way to know, so the pid is never trusted
        return ""
    return hashlib.sha256(f"{boot} {pidns}".encode()).hexdigest()[:16]


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ')' may hold spaces


def process_identity() -> dict[str, str]:
    """This process, as another process can later tell whether it still runs (``owner_alive``, ``owner_gone``):
    host, pid, kernel boot and pid namespace, start time."""
    return {
        "owner_host": socket.gethostname(),
        "owner_pid": str(os.getpid()),
        "owner_machine": _machine(),
        "owner_start": _start_ticks(os.getpid()) or "",
    }


def _recorded_start(tags: dict[str, str]) -> str | None:
    """The owner's recorded start time when the tags name a process of this machine (same host, boot and pid
    namespace); None otherwise: then nothing about it can be known from here."""
    machine = _machine()
    if not machine or tags.get("owner_machine") != machine or tags.get("owner_host") != socket.gethostname():
        return None
    pid, started = tags.get("owner_pid", ""), tags.get("owner_start", "")
    return started if pid.isdigit() and started else None


def owner_gone(tags: dict[str, str]) -> bool:
    """True only when the recorded pid provably no longer names the owner: gone, or another process now."""
    started = _recorded_start(tags)
    return started is not None and _start_ticks(int(tags["owner_pid"])) != started


def owner_alive(tags: dict[str, str]) -> bool:
    """True when ``tags`` (from ``process_identity``) name a process that provably still runs here."""
    started = _recorded_start(tags)
    return started is not None and _start_ticks(int(tags["owner_pid"])) == started


def remove_stale_tmp(root: Path, max_age_s: float = STALE_TMP_S) -> list[Path]:
    """Remove ``.tmp-*`` entries under ``root`` older than ``max_age_s`` whose writer is not alive."""
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for path in root.rglob(".tmp-*"):
        try:
            if now - path.stat().st_mtime < max_age_s:
                continue
            owner = json.loads((path / OWNER_FILE).read_text()) if (path / OWNER_FILE).is_file() else {}
        except (OSError, ValueError):
            continue
        if owner and owner_alive(owner):
            continue
        log.info(
            "removing %s: a writer's temporary entry, older than %d h, writer gone", path, max_age_s // 3600
        )
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success rename it to ``final`` in one step.

    Two processes filling the same entry both succeed (the loser's copy is discarded) and a crash
    leaves only a ``.tmp-*`` folder, never a half-written entry under the final name.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    (tmp / OWNER_FILE).write_text(json.dumps(process_identity()))
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink()
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError:  # another process published first; theirs is as good as ours
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path, key: str, value: str | None = None) -> None:
    """Raise a one-line ConfigError unless ``path`` can be created and written (checked by writing a
    probe file into its nearest existing ancestor, so nothing is left behind; os.access lies for root)."""
    ancestor = Path(path).expanduser().absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    probe = ancestor / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        shown = value if value is not None else str(path)
        raise ConfigError(
            f"{key}={shown!r} is not writable ({exc.strerror}: {ancestor}); choose a writable folder"
        ) from exc
