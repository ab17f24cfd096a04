"""Atomic file writes: a temporary file in the target's folder, fsync, rename.

Files and folders get the permissions the umask gives (0644/0755 under the usual umask), not
the 0600/0700 of `tempfile`: adapters on a shared cluster must be readable by the group that
serves them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask."""
    return 0o777 & ~current_umask()


def apply_umask_mode(path: Path | str) -> None:
    """Give a file written by a library that creates it 0600 (safetensors does) the mode
    the umask gives new files."""
    os.chmod(path, file_mode())


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    readers see the old file or the new one, never a part. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new hidden folder in ``parent`` (created if needed) with the umask's permissions,
    to be filled and then renamed into place."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, dir_mode())
    return path
