"""Run compiled TVM libraries for ARM here, under qemu-user, with a small C++ deploy runner.

The runner (``targets/runner/tvm_runner.cc``) loads a library exported by
``tvm.compile(mod, target).export_library(path, fcompile=...)`` through the tvm-ffi C++ API, runs
the Relax VM function ``main`` on the CPU and writes the outputs as raw files (see
docs/deploy-runner.md). This module builds that runner for an architecture (downloading the TVM
runtime libraries of that architecture from PyPI) and runs libraries with it:

    ensure_runner("aarch64")                      -> Path of the runner binary
    run_library("model.so", "aarch64", [x])       -> RunResult(outputs, times_ms)

Everything that is built or downloaded lies in the cache directory (``$TVM_COMPRESS_CACHE``, or
``~/.cache/tvm-compress``): ``wheels/<arch>/`` (downloaded wheels), ``sdk/<arch>/`` (headers and
runtime libraries taken from them, or built from source for armv7), ``build/armv7/`` (armv7
objects) and ``runners/<arch>/`` (the runner with the .so files it needs; that directory is what
one copies to a board).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from tvm_compress.errors import DataError, TargetError

__all__ = [
    "QEMU_ARCHES",
    "RunResult",
    "default_cache_dir",
    "runner_cache_dir",
    "ensure_runner",
    "build_runner",
    "can_run",
    "run_library",
    "runner_blocker",
]

RUNNER_NAME = "tvm_runner"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")  # required beside the runner
EXTRA_LIB = "libtvm_runtime_extra.so"  # optional: tvm.contrib.sort & co (topk/argsort/NMS)

# Facts per architecture. "target" is the TVM target (JSON dict) we compile test models for;
# "elf_machine" is the e_machine field of the ELF header of a library for that architecture.
QEMU_ARCHES: dict[str, dict] = {
    "aarch64": {
        "qemu": "qemu-aarch64",
        "qemu_package": "qemu-user",
        "sysroot": "/usr/aarch64-linux-gnu",
        "loader": "lib/ld-linux-aarch64.so.1",
        "sysroot_package": "libc6-arm64-cross",
        "cxx": "aarch64-linux-gnu-g++",
        "cxx_package": "g++-aarch64-linux-gnu",
        "mtriple": "aarch64-linux-gnu",
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        "wheel_platform": "manylinux_2_28_aarch64",
        "elf_machine": 183,  # EM_AARCH64
        "elf_class": 2,  # 64-bit
    },
    "armv7": {
        "qemu": "qemu-arm",
        "qemu_package": "qemu-user",
        "sysroot": "/usr/arm-linux-gnueabihf",
        "loader": "lib/ld-linux-armhf.so.3",
        "sysroot_package": "libc6-armhf-cross",
        "cxx": "arm-linux-gnueabihf-g++",
        "cxx_package": "g++-arm-linux-gnueabihf",
        "mtriple": "armv7a-linux-gnueabihf",
        "target": {
            "kind": "llvm",
            "mtriple": "armv7a-linux-gnueabihf",
            "mattr": ["+neon"],
            "mfloat-abi": "hard",
        },
        # No armv7 wheel of apache-tvm / apache-tvm-ffi exists: the runtime is built from source.
        "wheel_platform": None,
        "elf_machine": 40,  # EM_ARM
        "elf_class": 1,  # 32-bit
    },
    "x86_64": {
        "qemu": None,  # runs natively
        "qemu_package": None,
        "sysroot": None,
        "loader": None,
        "sysroot_package": None,
        "cxx": "g++",
        "cxx_package": "g++",
        "mtriple": "x86_64-linux-gnu",
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        "wheel_platform": None,  # uses the installed (host) wheels
        "elf_machine": 62,  # EM_X86_64
        "elf_class": 2,
    },
}

# numpy dtype name -> the dtype string the runner (tvm-ffi) understands; they coincide.
_DTYPES = {
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
}

Log = Callable[[str], None]


@dataclass
class RunResult:
    """Outputs of one runner invocation (leaves of a tuple result, depth first) and the wall time
    of each timed call of ``main`` in milliseconds."""

    outputs: list[np.ndarray]
    times_ms: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# locations and small helpers
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("TVM_COMPRESS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tvm-compress"


def runner_cache_dir(cache_dir=None) -> Path:
    """Where runners are built: ``cache_dir``, else ``$TVM_COMPRESS_RUNNER_CACHE`` (lets test
    sessions with a throw-away ``$TVM_COMPRESS_CACHE`` keep the runners), else the cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TVM_COMPRESS_RUNNER_CACHE")
    if env:
        return Path(env).expanduser()
    return default_cache_dir()


def _arch_facts(arch: str) -> dict:
    try:
        return QEMU_ARCHES[arch]
    except KeyError:
        raise TargetError(
            f"unknown architecture {arch!r}: expected one of {', '.join(QEMU_ARCHES)}"
        ) from None


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


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise TargetError(f"{dist} is not installed in this Python environment") from None
    return out


def _find_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"{name} not found: install the Debian package {package}")
    return path


def _host_package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"Python package {module} not found")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str, timeout: float | None = None, cwd=None) -> str:
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


# ---------------------------------------------------------------------------------------------
# the runtime "sdk" of an architecture: tvm-ffi headers + libtvm_ffi.so + libtvm_runtime.so
# (+ libtvm_runtime_extra.so where the wheel has it)
# ---------------------------------------------------------------------------------------------


# Bumped when what an sdk directory holds changes, so that older ones are rebuilt.
_SDK_FORMAT = 2


def _stamp_matches(stamp: Path, want: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == want
    except (OSError, ValueError):
        return False


def _replace_dir(tmp: Path, final: Path) -> None:
    tmp.chmod(0o755)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _wheel_sdk(arch: str, cache: Path, versions: dict[str, str], log: Log) -> Path:
    """Headers and runtime libraries of ``arch`` taken from the PyPI wheels of that platform,
    in ``<cache>/sdk/<arch>/{include,lib}``."""
    facts = QEMU_ARCHES[arch]
    sdk = cache / "sdk" / arch
    want = {"arch": arch, **versions, "format": _SDK_FORMAT}
    if _stamp_matches(sdk / "sdk.json", want):
        return sdk

    wheel_dir = cache / "wheels" / arch
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = {}
    for dist, version in versions.items():
        stem = dist.replace("-", "_")
        found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
        if not found:
            log(f"downloading {dist}=={version} for {facts['wheel_platform']}")
            _run(
                [
                    sys.executable, "-m", "pip", "download", "--no-deps",
                    "--only-binary=:all:", "--platform", facts["wheel_platform"],
                    "--python-version", pyver, "--disable-pip-version-check",
                    "-d", str(wheel_dir), f"{dist}=={version}",
                ],
                f"download of {dist}=={version} ({facts['wheel_platform']})",
                timeout=1800,
            )
            found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
            if not found:
                raise TargetError(
                    f"download of {dist}=={version} ({facts['wheel_platform']}) gave no wheel"
                )
        wheels[dist] = found[-1]

    log(f"extracting runtime libraries and headers into {sdk}")
    sdk.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=sdk.parent))
    try:
        (tmp / "lib").mkdir()
        files = {
            "apache-tvm": {
                "tvm/lib/libtvm_runtime.so": ("lib/libtvm_runtime.so", True),
                "tvm/lib/libtvm_runtime_extra.so": ("lib/libtvm_runtime_extra.so", False),
            },
            "apache-tvm-ffi": {"tvm_ffi/lib/libtvm_ffi.so": ("lib/libtvm_ffi.so", True)},
        }
        prefixes = {
            "tvm_ffi/include/": "include/",
            "tvm_ffi/3rdparty/dlpack/include/": "include/",
        }
        for dist, members in files.items():
            whl = wheels[dist]
            try:
                with zipfile.ZipFile(whl) as zf:
                    names = set(zf.namelist())
                    for src, (dst, required) in members.items():
                        if src in names:
                            (tmp / dst).write_bytes(zf.read(src))
                        elif required:
                            raise TargetError(f"{whl.name} has no {src}")
                    if dist == "apache-tvm-ffi":
                        for name in names:
                            for pre, dst_pre in prefixes.items():
                                if name.startswith(pre) and not name.endswith("/"):
                                    out = tmp / dst_pre / name[len(pre):]
                                    out.parent.mkdir(parents=True, exist_ok=True)
                                    out.write_bytes(zf.read(name))
            except zipfile.BadZipFile:
                raise TargetError(f"{whl} is not a valid wheel (delete it and retry)") from None
        if not (tmp / "include" / "tvm" / "ffi" / "tvm_ffi.h").is_file():
            raise TargetError(f"{wheels['apache-tvm-ffi'].name} has no tvm_ffi/include headers")
        for lib in (tmp / "lib").iterdir():
            lib.chmod(0o755)
        (tmp / "sdk.json").write_text(json.dumps(want) + "\n")
        _replace_dir(tmp, sdk)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sdk


def _host_sdk() -> tuple[list[Path], list[Path]]:
    """(include dirs, runtime libraries) of the installed (x86_64) wheels."""
    ffi_dir = _host_package_dir("tvm_ffi")
    tvm_dir = _host_package_dir("tvm")
    libs = [tvm_dir / "lib" / "libtvm_runtime.so", ffi_dir / "lib" / "libtvm_ffi.so"]
    for lib in libs:
        if not lib.is_file():
            raise TargetError(f"{lib} not found in the installed wheel")
    extra = tvm_dir / "lib" / "libtvm_runtime_extra.so"
    if extra.is_file():
        libs.append(extra)
    return [ffi_dir / "include", ffi_dir / "3rdparty" / "dlpack" / "include"], libs


# ---------------------------------------------------------------------------------------------
# armv7: there is no wheel; tvm-ffi and the CPU part of the TVM runtime are built from source
# ---------------------------------------------------------------------------------------------

# TVM runtime sources (under tvm/src/runtime of the installed wheel) that make up a CPU-only
# runtime able to load and run Relax VM libraries: device API + CPU device, tensors, module
# loading, workspace/threading, memory manager, the VM, and contrib sort (topk/argsort/NMS).
ARMV7_RUNTIME_SOURCES = (
    "builtin_fp16.cc",
    "const_loader_module.cc",
    "cpu_device_api.cc",
    "device_api.cc",
    "file_utils.cc",
    "logging.cc",
    "memory/memory_manager.cc",
    "module.cc",
    "static_library.cc",
    "tensor.cc",
    "thread_pool.cc",
    "threading_backend.cc",
    "timer.cc",
    "workspace_pool.cc",
    "vm/builtin.cc",
    "vm/bytecode.cc",
    "vm/executable.cc",
    "vm/vm.cc",
    "extra/contrib/sort/sort.cc",
)
# Headers the runtime sources include but the wheel does not ship; tvm-compress writes its own
# (targets/runner/runtime_shims/).
_SHIM_FILES = (
    "tvm/support/io.h",
    "tvm/support/serializer.h",
    "tvm/support/cuda/nvtx.h",
    "support/bytes_io.h",
    "support/base64.h",
    "support/utils.h",
    "compiler-rt/builtin_fp16.h",
)


def _build_jobs() -> int:
    env = os.environ.get("TVM_COMPRESS_BUILD_JOBS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, os.cpu_count() or 1)


def _ffi_source_root(cache: Path, versions: dict[str, str], log: Log) -> Path:
    """A directory with tvm-ffi's src/ffi, include and 3rdparty/dlpack: the installed wheel
    (which ships them), else the PyPI source distribution."""
    host = _host_package_dir("tvm_ffi")
    if (host / "src" / "ffi" / "object.cc").is_file() and (host / "include").is_dir():
        return host
    version = versions["apache-tvm-ffi"]
    root = cache / "build" / "armv7" / f"apache_tvm_ffi-{version}"
    if (root / "src" / "ffi" / "object.cc").is_file():
        return root
    dl = cache / "wheels" / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    found = sorted(dl.glob(f"apache_tvm_ffi-{version}.tar.gz"))
    if not found:
        log(f"downloading the apache-tvm-ffi=={version} source distribution (slow)")
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-d", str(dl), f"apache-tvm-ffi=={version}"],
            f"download of the apache-tvm-ffi=={version} source distribution",
            timeout=1800,
        )
        found = sorted(dl.glob(f"apache_tvm_ffi-{version}.tar.gz"))
        if not found:
            raise TargetError(f"download of apache-tvm-ffi=={version} sources gave no .tar.gz")
    import tarfile

    with tarfile.open(found[-1]) as tf:
        tmp = Path(tempfile.mkdtemp(prefix=".ffi-src-", dir=root.parent))
        tf.extractall(tmp, filter="data")
        inner = next(tmp.iterdir())
        if root.exists():
            shutil.rmtree(root)
        os.replace(inner, root)
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _compile_objects(
    cxx: str, flags: list[str], jobs_list: list[tuple[Path, Path]], what: str, log: Log
) -> None:
    """Compile (source, object) pairs in parallel; objects newer than their source are kept."""
    todo = [
        (src, obj) for src, obj in jobs_list
        if not (obj.is_file() and obj.stat().st_mtime >= src.stat().st_mtime)
    ]
    if not todo:
        return
    jobs = _build_jobs()
    log(f"compiling {len(todo)} {what} sources with {Path(cxx).name} ({jobs} jobs, minutes)")

    def one(pair: tuple[Path, Path]) -> None:
        src, obj = pair
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_suffix(".o.tmp")
        _run([cxx, *flags, "-c", str(src), "-o", str(tmp)], f"compiling {src.name} for armv7",
             timeout=1800)
        os.replace(tmp, obj)

    from concurrent.futures import ThreadPoolExecutor

    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(one, todo):
            done += 1
            if done % 5 == 0 or done == len(todo):
                log(f"  {what}: {done}/{len(todo)}")


def _armv7_sdk(cache: Path, versions: dict[str, str], shim_dir: Path, cxx: str, log: Log) -> Path:
    """Build libtvm_ffi.so and a CPU-only libtvm_runtime.so for armv7 (hard-float) from the
    sources in the installed wheels, into ``<cache>/sdk/armv7/{include,lib}``."""
    sdk = cache / "sdk" / "armv7"
    shims = [shim_dir / f for f in _SHIM_FILES]
    want = {"arch": "armv7", **versions, "cxx": Path(cxx).name, "format": _SDK_FORMAT}
    if _stamp_matches(sdk / "sdk.json", want) and all(
        (sdk / "lib" / lib).is_file() for lib in RUNTIME_LIBS
    ):
        built = min((sdk / "lib" / lib).stat().st_mtime for lib in RUNTIME_LIBS)
        if all(s.stat().st_mtime <= built for s in shims):
            return sdk

    tvm_src = _host_package_dir("tvm") / "src" / "runtime"
    tvm_inc = _host_package_dir("tvm") / "include"
    ffi_root = _ffi_source_root(cache, versions, log)
    build = cache / "build" / "armv7"
    # Fresh object directories when the versions or the compiler changed.
    flags_stamp = build / "build.json"
    obj_key = {k: v for k, v in want.items() if k != "format"}
    if not _stamp_matches(flags_stamp, obj_key):
        for sub in ("obj", "src", "3rdparty"):
            shutil.rmtree(build / sub, ignore_errors=True)
        build.mkdir(parents=True, exist_ok=True)
        flags_stamp.write_text(json.dumps(obj_key) + "\n")

    # tvm-ffi
    ffi_inc = [f"-I{ffi_root / 'include'}", f"-I{ffi_root / '3rdparty' / 'dlpack' / 'include'}"]
    ffi_sources = sorted((ffi_root / "src" / "ffi").glob("*.cc")) + sorted(
        (ffi_root / "src" / "ffi" / "extra").glob("*.cc")
    )
    ffi_sources = [s for s in ffi_sources if s.name != "backtrace_win.cc"]
    common = ["-std=c++17", "-O2", "-fPIC", "-DNDEBUG", "-DTVM_FFI_USE_LIBBACKTRACE=0",
              "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0"]
    ffi_objs = [(s, build / "obj" / "ffi" / f"{s.parent.name}_{s.stem}.o") for s in ffi_sources]
    _compile_objects(cxx, common + ["-fvisibility=hidden"] + ffi_inc, ffi_objs, "tvm-ffi", log)

    # TVM runtime: the sources are copied beside the shim headers so that their relative
    # includes ("../support/bytes_io.h", "../../../../../3rdparty/compiler-rt/builtin_fp16.h")
    # resolve. copy2 keeps modification times, so unchanged objects stay valid.
    src_root = build / "src"
    missing = [rel for rel in ARMV7_RUNTIME_SOURCES if not (tvm_src / rel).is_file()]
    if missing:
        raise TargetError(
            f"cannot build the armv7 runtime: {tvm_src} lacks {', '.join(missing)}"
        )
    shutil.copytree(tvm_src, src_root / "runtime", dirs_exist_ok=True)
    shutil.copytree(shim_dir / "support", src_root / "support", dirs_exist_ok=True)
    (build / "3rdparty" / "compiler-rt").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shim_dir / "compiler-rt" / "builtin_fp16.h",
                 build / "3rdparty" / "compiler-rt" / "builtin_fp16.h")
    rt_flags = common + [
        f"-I{tvm_inc}", f"-I{shim_dir}", f"-I{shim_dir / 'compiler-rt'}", *ffi_inc,
    ]
    rt_objs = [
        (src_root / "runtime" / rel, build / "obj" / "runtime" / (rel.replace("/", "_")[:-3] + ".o"))
        for rel in ARMV7_RUNTIME_SOURCES
    ]
    # objects depend on the shim headers too
    newest_shim = max(s.stat().st_mtime for s in shims)
    for _, obj in rt_objs:
        if obj.is_file() and obj.stat().st_mtime < newest_shim:
            obj.unlink()
    _compile_objects(cxx, rt_flags, rt_objs, "TVM runtime", log)

    log("linking libtvm_ffi.so and libtvm_runtime.so for armv7")
    sdk.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".armv7-", dir=sdk.parent))
    try:
        lib = tmp / "lib"
        lib.mkdir()
        _run([cxx, "-shared", "-o", str(lib / "libtvm_ffi.so"), *[str(o) for _, o in ffi_objs],
              "-Wl,-soname,libtvm_ffi.so", "-ldl", "-lpthread"],
             "linking libtvm_ffi.so for armv7")
        _run([cxx, "-shared", "-o", str(lib / "libtvm_runtime.so"),
              *[str(o) for _, o in rt_objs], "-Wl,-soname,libtvm_runtime.so", f"-L{lib}",
              "-ltvm_ffi", "-ldl", "-lpthread", "-Wl,-rpath,$ORIGIN", "-Wl,--no-undefined"],
             "linking libtvm_runtime.so for armv7")
        shutil.copytree(ffi_root / "include" / "tvm", tmp / "include" / "tvm")
        shutil.copytree(ffi_root / "3rdparty" / "dlpack" / "include" / "dlpack",
                        tmp / "include" / "dlpack")
        (tmp / "sdk.json").write_text(json.dumps(want) + "\n")
        _replace_dir(tmp, sdk)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sdk


def runner_blocker(arch: str) -> str | None:
    """Why a runner for ``arch`` cannot be built here (None when nothing known blocks it).
    Cheap: looks at files only, builds nothing."""
    facts = _arch_facts(arch)
    if shutil.which(facts["cxx"]) is None:
        return f"{facts['cxx']} not found: install the Debian package {facts['cxx_package']}"
    src = runner_source_dir()
    if src is None:
        return (f"runner source {RUNNER_NAME}.cc not found: set TVM_COMPRESS_RUNNER_SRC to the "
                "targets/runner directory of a tvm-compress checkout")
    if arch == "armv7":
        tvm_src = _host_package_dir("tvm") / "src" / "runtime"
        missing = [rel for rel in ARMV7_RUNTIME_SOURCES if not (tvm_src / rel).is_file()]
        if missing:
            return (f"no armv7 wheel exists and the installed apache-tvm lacks the runtime sources "
                    f"{', '.join(missing)} under {tvm_src}")
        missing = [f for f in _SHIM_FILES if not (src / "runtime_shims" / f).is_file()]
        if missing:
            return f"runtime shim headers missing under {src / 'runtime_shims'}: {', '.join(missing)}"
    return None


# ---------------------------------------------------------------------------------------------
# building the runner
# ---------------------------------------------------------------------------------------------


def _runner_complete(out_dir: Path) -> bool:
    return (out_dir / RUNNER_NAME).is_file() and all(
        (out_dir / lib).is_file() for lib in RUNTIME_LIBS
    )


def _up_to_date(out_dir: Path, info: dict, inputs: list[Path]) -> bool:
    if not _runner_complete(out_dir) or not _stamp_matches(out_dir / "build-info.json", info):
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
    facts = _arch_facts(arch)
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
    cxx = _find_tool(facts["cxx"], facts["cxx_package"])
    versions = _versions()
    info = {"arch": arch, **versions, "cxx": facts["cxx"]}
    sources = [src_dir / f"{RUNNER_NAME}.cc"]

    with _locked(cache / "runners" / f".{arch}.lock"):
        t0 = time.monotonic()
        if arch == "x86_64":
            includes, libs = _host_sdk()
        else:
            if arch == "armv7":
                sdk = _armv7_sdk(cache, versions, src_dir / "runtime_shims", cxx, log)
            else:
                sdk = _wheel_sdk(arch, cache, versions, log)
            includes = [sdk / "include"]
            libs = sorted((sdk / "lib").glob("*.so"))
        if not force and _up_to_date(out_dir, info, sources + libs):
            log(f"{arch} runner up to date: {runner}")
            return runner

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=out_dir.parent))
        try:
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
            _run(cmd, f"compiling the {arch} runner", timeout=900)
            (tmp / "build-info.json").write_text(json.dumps(info) + "\n")
            _replace_dir(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"built {runner} in {time.monotonic() - t0:.1f} s")
    return runner


def ensure_runner(arch: str, cache_dir=None, *, log: Log | None = None) -> Path:
    """Return the path of the runner binary for ``arch``, building it first if needed."""
    return build_runner(arch, cache_dir, log=log)


def can_run(arch: str, cache_dir=None) -> tuple[bool, str]:
    """(True, "") when libraries for ``arch`` can be run here (the runner is built, or can be
    built, and qemu-user with the target's sysroot is present); else (False, why). Builds
    nothing."""
    try:
        _arch_facts(arch)
        _emulator_prefix(arch)
    except TargetError as err:
        return False, str(err)
    out_dir = runner_cache_dir(cache_dir) / "runners" / arch
    if _runner_complete(out_dir):
        return True, ""
    blocker = runner_blocker(arch)
    if blocker is not None:
        return False, f"cannot build the {arch} runner: {blocker}"
    return True, ""


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def _check_elf(lib: Path, arch: str) -> None:
    facts = QEMU_ARCHES[arch]
    try:
        with open(lib, "rb") as fh:
            head = fh.read(20)
    except OSError as err:
        raise DataError(f"cannot read library {lib}: {err.strerror}") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise DataError(f"{lib} is not a shared library (no ELF header)")
    elf_class = head[4]
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    if machine != facts["elf_machine"] or elf_class != facts["elf_class"]:
        names = {v["elf_machine"]: k for k, v in QEMU_ARCHES.items() if v["elf_class"] == elf_class}
        found = names.get(machine, f"machine {machine}")
        raise DataError(
            f"{lib} is built for {found}, not {arch} "
            f"(export it with tvm.support.cc.cross_compiler({facts['cxx']!r}))"
        )


def _emulator_prefix(arch: str) -> list[str]:
    """``[qemu-<arch>, -L, <sysroot>]`` for ARM, ``[]`` for x86_64; TargetError when qemu-user or
    the target's sysroot is missing."""
    facts = QEMU_ARCHES[arch]
    if facts["qemu"] is None:
        return []
    qemu = _find_tool(facts["qemu"], facts["qemu_package"])
    sysroot = Path(facts["sysroot"])
    if not (sysroot / facts["loader"]).exists():
        raise TargetError(
            f"{sysroot / facts['loader']} not found: install the Debian package "
            f"{facts['sysroot_package']} (comes with {facts['cxx_package']})"
        )
    return [qemu, "-L", str(sysroot)]


def _to_array(i: int, value) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise DataError(f"input {i} is a {type(value).__name__}, not a numpy.ndarray")
    if value.dtype.name not in _DTYPES:
        raise DataError(
            f"input {i} has dtype {value.dtype}, the runner takes {', '.join(sorted(_DTYPES))}"
        )
    return np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")


def run_library(
    lib_path,
    arch: str,
    inputs: list[np.ndarray],
    repeat: int = 1,
    warmup: int = 0,
    cache_dir=None,
    timeout: float = 600,
    function: str = "main",
) -> RunResult:
    """Run the Relax VM function ``function`` of an exported library for ``arch`` with the C++
    runner (under qemu-user for ARM, natively for x86_64).

    ``inputs`` are the arguments of the function in order. Raises DataError for a missing or wrong
    library file or inputs that do not fit the model, TargetError for toolchain, qemu or runtime
    failures.
    """
    _arch_facts(arch)
    lib = Path(lib_path)
    if not lib.is_file():
        raise DataError(f"library file {lib} not found")
    _check_elf(lib, arch)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise DataError(f"repeat must be an integer >= 1, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise DataError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    arrays = [_to_array(i, x) for i, x in enumerate(inputs)]

    prefix = _emulator_prefix(arch)  # before building: fail fast without qemu
    runner = ensure_runner(arch, cache_dir)
    cmd = prefix + [str(runner)]

    with tempfile.TemporaryDirectory(prefix="tvm-runner-") as tmpdir:
        tmp = Path(tmpdir)
        out_dir = tmp / "out"
        out_dir.mkdir()
        args = [str(lib.resolve())]
        for i, arr in enumerate(arrays):
            path = tmp / f"in_{i}.bin"
            arr.tofile(path)
            shape = "x".join(str(d) for d in arr.shape)
            args += ["--input", f"{arr.dtype.name}:{shape}:{path}"]
        args += ["--out-dir", str(out_dir), "--repeat", str(repeat), "--warmup", str(warmup),
                 "--function", function]

        env = dict(os.environ)
        # the runner has rpath $ORIGIN; LD_LIBRARY_PATH is a second way to its libraries
        # (qemu-user hands the environment to the guest's dynamic loader)
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = str(runner.parent) + (f":{old}" if old else "")
        try:
            proc = subprocess.run(
                cmd + args, capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            raise TargetError(
                f"{arch} runner timed out after {timeout:g} s on {lib.name}"
            ) from None
        except OSError as err:
            raise TargetError(f"cannot start the {arch} runner: {err.strerror}") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            msg = next((ln for ln in lines if ln.startswith("tvm_runner:")), None)
            msg = msg[len("tvm_runner:"):].strip() if msg else (lines[-1] if lines else "")
            detail = f"{lib.name} on {arch}: {msg or f'exit code {proc.returncode}'}"
            if proc.returncode == 3:
                raise DataError(detail)
            if proc.returncode < 0:
                detail += f" (killed by signal {-proc.returncode})"
            raise TargetError(f"runner failed: {detail}")
        try:
            report = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TargetError(f"runner printed no JSON result for {lib.name}") from None

        outputs = []
        for spec in report["outputs"]:
            dtype = spec["dtype"]
            if dtype not in _DTYPES:
                raise TargetError(f"output dtype {dtype} of {lib.name} has no numpy equivalent")
            data = np.fromfile(out_dir / spec["file"], dtype=np.dtype(dtype).newbyteorder("<"))
            outputs.append(data.astype(np.dtype(dtype), copy=False).reshape(spec["shape"]))
        return RunResult(outputs=outputs, times_ms=[float(t) for t in report["times_ms"]])
