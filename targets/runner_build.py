"""Building the C++ deploy runner (``targets/runner/tvm_runner.cc``) for an architecture.

The runner loads a library exported by ``tvm.compile(mod, target).export_library(path,
fcompile=...)`` through the tvm-ffi C++ API, runs a Relax VM function on the CPU and writes the
outputs as raw files (see docs/deploy-runner.md). It is compiled against the runtime sdk of its
architecture (``runner_sdk``) into ``<cache>/runners/<arch>/``: the runner with the .so files it
needs, the directory one copies to a board. ``<cache>`` is ``tvm_compress.cache.runner_cache_dir``.

    ensure_runner("aarch64")    -> Path of the runner binary (built if needed)
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tvm_compress.cache import runner_cache_dir
from tvm_compress.errors import TargetError

from .arches import arch_facts
from .cache_entries import locked, stamp_matches, staged_dir
from .host_tools import Log, find_tool, run_tool, tvm_versions
from .runner_sdk import RUNTIME_LIBS, runtime_sdk, sdk_blocker

__all__ = [
    "RUNNER_NAME",
    "build_runner",
    "ensure_runner",
    "runner_blocker",
    "runner_source_dir",
    "runner_unavailable",
]

RUNNER_NAME = "tvm_runner"


def runner_source_dir() -> Path | None:
    """Directory holding tvm_runner.cc: $TVM_COMPRESS_RUNNER_SRC, else the ``runner`` folder
    installed beside this module (package data, so installed copies can build it too)."""
    env = os.environ.get("TVM_COMPRESS_RUNNER_SRC")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent / "runner")
    for cand in candidates:
        if (cand / f"{RUNNER_NAME}.cc").is_file():
            return cand
    return None


def runner_blocker(arch: str) -> str | None:
    """Why a runner for ``arch`` cannot be built here (None when nothing known blocks it).
    Cheap: looks at files only, builds nothing."""
    facts = arch_facts(arch)
    if shutil.which(facts["cxx"]) is None:
        return f"{facts['cxx']} not found: install the Debian package {facts['cxx_package']}"
    src = runner_source_dir()
    if src is None:
        return (f"runner source {RUNNER_NAME}.cc not found: set TVM_COMPRESS_RUNNER_SRC to the "
                "targets/runner directory of a tvm-compress checkout")
    return sdk_blocker(arch, src / "runtime_shims")


def runner_unavailable(arch: str, cache_dir=None) -> str | None:
    """Why no runner for ``arch`` can be had here: None when it is built, or can be built.
    Builds nothing."""
    if _runner_complete(runner_cache_dir(cache_dir) / "runners" / arch):
        return None
    blocker = runner_blocker(arch)
    if blocker is not None:
        return f"cannot build the {arch} runner: {blocker}"
    return None


def _runner_complete(out_dir: Path) -> bool:
    return (out_dir / RUNNER_NAME).is_file() and all(
        (out_dir / lib).is_file() for lib in RUNTIME_LIBS
    )


def _up_to_date(out_dir: Path, info: dict, inputs: list[Path]) -> bool:
    if not _runner_complete(out_dir) or not stamp_matches(out_dir / "build-info.json", info):
        return False
    built = (out_dir / RUNNER_NAME).stat().st_mtime
    return all(p.stat().st_mtime <= built for p in inputs)


def build_runner(arch: str, cache_dir=None, *, force: bool = False, log: Log | None = None) -> Path:
    """Build (if needed) the runner for ``arch`` into ``<cache>/runners/<arch>/`` and return the
    path of the runner binary.

    Skips all work when the runner and its libraries exist, were built for the installed TVM
    versions and are newer than the runner sources. aarch64 takes the TVM runtime from the
    aarch64 wheels on PyPI; x86_64 from the installed wheels; armv7 builds tvm-ffi and a CPU-only
    TVM runtime from the sources in the installed wheels (several minutes the first time).
    """
    facts = arch_facts(arch)
    log = log or (lambda msg: None)
    cache = runner_cache_dir(cache_dir)
    out_dir = cache / "runners" / arch
    runner = out_dir / RUNNER_NAME

    src_dir = runner_source_dir()
    if src_dir is None:
        if _runner_complete(out_dir):
            return runner  # installed package without scripts/: use what was built before
        raise TargetError(
            f"runner source {RUNNER_NAME}.cc not found (targets/runner is not installed with the "
            "package): set TVM_COMPRESS_RUNNER_SRC to the targets/runner directory of a checkout"
        )
    blocker = runner_blocker(arch)
    if blocker is not None:
        raise TargetError(f"cannot build the {arch} runner: {blocker}")
    cxx = find_tool(facts["cxx"], facts["cxx_package"])
    versions = tvm_versions()
    info = {"arch": arch, **versions, "cxx": facts["cxx"]}
    sources = [src_dir / f"{RUNNER_NAME}.cc"]

    with locked(cache / "runners" / f".{arch}.lock"):
        t0 = time.monotonic()
        includes, libs = runtime_sdk(arch, cache, versions, cxx, src_dir / "runtime_shims", log)
        if not force and _up_to_date(out_dir, info, sources + libs):
            log(f"{arch} runner up to date: {runner}")
            return runner

        with staged_dir(out_dir, "build-info.json", info) as tmp:
            for lib in libs:
                shutil.copy2(lib, tmp / lib.name)
            log(f"compiling {RUNNER_NAME} with {facts['cxx']}")
            cmd = [cxx, "-std=c++17", "-O2", "-Wall"]
            cmd += [f"-I{d}" for d in includes]
            cmd += [
                str(src_dir / f"{RUNNER_NAME}.cc"),
                "-o", str(tmp / RUNNER_NAME),
                f"-L{tmp}",
                # the runner calls nothing in libtvm_runtime directly, but the runtime must be
                # loaded: it registers the Relax VM executable loader the library needs
                "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime", "-Wl,--as-needed",
                "-ldl", "-Wl,-rpath,$ORIGIN",
            ]
            run_tool(cmd, f"compiling the {arch} runner", timeout=900)
        log(f"built {runner} in {time.monotonic() - t0:.1f} s")
    return runner


def ensure_runner(arch: str, cache_dir=None, *, log: Log | None = None) -> Path:
    """Return the path of the runner binary for ``arch``, building it first if needed."""
    return build_runner(arch, cache_dir, log=log)
