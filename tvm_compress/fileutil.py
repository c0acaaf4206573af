"""Atomic writes: outputs appear complete under their final name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any long work) when ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")
    # Access bits are not the whole story (root, /proc, read-only mounts): create a file there.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.stem}.probe-", dir=parent)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = check_writable(path)
    # Keep the suffix: exporters pick the output kind from it (.so vs .tar).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    IN_PROGRESS.add(tmp_path)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes 0600; give the file the mode a plain open() would (+x for libraries).
        mode = 0o777 if path.suffix in (".so", ".dylib", ".dll") else 0o666
        os.chmod(tmp_path, mode & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    finally:
        IN_PROGRESS.discard(tmp_path)


# Temporary outputs being written now: what an abrupt exit (Ctrl-C) must remove.
IN_PROGRESS: set = set()


def remove_in_progress() -> None:
    for path in list(IN_PROGRESS):
        with contextlib.suppress(OSError):
            path.unlink()
    IN_PROGRESS.clear()


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
