"""This machine's tools and installed TVM, as the runner and virtual-board builds use them.

Finding a tool on PATH (the error names its Debian package), running one (a failure is one line:
its first error line), and the installed apache-tvm / apache-tvm-ffi: their versions (what
downloads and builds must match) and package directories (headers, libraries, C++ sources).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from tvm_compress.errors import TargetError

__all__ = ["Log", "find_tool", "host_package_dir", "run_tool", "tvm_versions"]

# Progress messages of long builds and downloads go to a callback (print, or nothing).
Log = Callable[[str], None]


def find_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"{name} not found: install the Debian package {package}")
    return path


def run_tool(cmd: Sequence[str], what: str, timeout: float | None = None, cwd=None) -> str:
    """Run ``cmd`` and return its stdout; TargetError "<what> failed ..." with one line of its
    output (the first that mentions an error, else the last) when it fails."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd
        )
    except FileNotFoundError:
        raise TargetError(f"{what} failed: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise TargetError(f"{what} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        detail = (errs or lines or ["no output"])[0 if errs else -1]
        raise TargetError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def tvm_versions() -> dict[str, str]:
    """Installed versions of apache-tvm and apache-tvm-ffi: runtimes for other architectures
    must be of exactly these."""
    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise TargetError(f"{dist} is not installed in this Python environment") from None
    return out


def host_package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"Python package {module} not found")
    return Path(list(spec.submodule_search_locations)[0])
