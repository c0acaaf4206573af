"""Where tvm-compress keeps what it builds or downloads once: one root, two overrides.

``$TVM_COMPRESS_CACHE`` (default ``~/.cache/tvm-compress``) holds tuning records
(``tuning/``), downloaded wheels, runtime SDKs and deploy runners. ``$TVM_COMPRESS_RUNNER_CACHE``
moves only the runners and their SDKs (minutes to build for armv7), so that a test session with a
throw-away cache keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_root() -> Path:
    env = os.environ.get("TVM_COMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tvm-compress"


def runner_cache_dir(cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """``cache_dir`` if given, else ``$TVM_COMPRESS_RUNNER_CACHE``, else the cache root."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TVM_COMPRESS_RUNNER_CACHE")
    return Path(env).expanduser() if env else cache_root()
