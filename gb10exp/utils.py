"""Small shared helpers: the cache folder and atomic publication of files and folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """A folder under ``$GB10EXP_CACHE`` (default ``~/.cache/gb10exp``), created on demand."""
    root = Path(os.environ.get("GB10EXP_CACHE", Path.home() / ".cache" / "gb10exp")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success rename it to ``final`` in one step.

    Two processes filling the same entry both succeed (the loser's copy is discarded) and a crash
    leaves only a ``.tmp-*`` folder, never a half-written entry under the final name.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:  # another process published first; theirs is as good as ours
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path, key: str, value: str | None = None) -> None:
    """Raise a one-line ConfigError unless ``path`` can be created and written (checked by writing a
    probe file into its nearest existing ancestor, so nothing is left behind; os.access lies for root)."""
    from gb10exp.config import ConfigError

    ancestor = Path(path).expanduser().absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    probe = ancestor / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        shown = value if value is not None else str(path)
        raise ConfigError(f"{key}={shown!r} is not writable ({exc.strerror}: {ancestor}); choose a writable folder") from exc
