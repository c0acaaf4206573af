"""Directories in the cache that are built once and then reused (runtime sdks, runners, boards).

An entry is guarded by a lock file while it is checked or built, carries a JSON stamp of what it
was built from (versions, compiler, format), and is built in a temporary directory beside it that
replaces it in one rename, so that a failed or interrupted build never leaves half an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["locked", "stamp_matches", "staged_dir"]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def stamp_matches(stamp: Path, want: dict) -> bool:
    """True when the JSON file ``stamp`` holds exactly ``want``."""
    try:
        return json.loads(stamp.read_text()) == want
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def staged_dir(final: Path, stamp_name: str, stamp: dict) -> Iterator[Path]:
    """Yield an empty directory beside ``final`` to fill. When the block succeeds the directory
    gets the stamp file ``stamp_name`` and replaces ``final``; when it fails it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        (tmp / stamp_name).write_text(json.dumps(stamp) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
