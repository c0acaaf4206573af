"""The TVM runtime "sdk" of an architecture: what the deploy runner is compiled and linked against.

An sdk is the tvm-ffi headers (with dlpack's), ``libtvm_ffi.so`` and ``libtvm_runtime.so``, plus
``libtvm_runtime_extra.so`` where the wheel has it, all of the installed TVM versions:

* aarch64: taken from the ``manylinux_2_28_aarch64`` wheels on PyPI (downloaded into
  ``<cache>/wheels/aarch64/``, extracted into ``<cache>/sdk/aarch64/``);
* armv7: no wheel exists, so tvm-ffi and a CPU-only TVM runtime are cross-built from the C++
  sources in the installed wheels (objects in ``<cache>/build/armv7/``, result in
  ``<cache>/sdk/armv7/``; minutes the first time);
* x86_64: the installed wheels themselves.

``runtime_sdk`` gives the include directories and libraries of one architecture, building or
downloading what is missing; ``sdk_blocker`` says cheaply why that cannot work here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from tvm_compress.errors import TargetError

from .arches import QEMU_ARCHES
from .cache_entries import stamp_matches, staged_dir
from .host_tools import Log, host_package_dir, run_tool

__all__ = [
    "ARMV7_RUNTIME_SOURCES",
    "EXTRA_LIB",
    "RUNTIME_LIBS",
    "runtime_sdk",
    "sdk_blocker",
]

RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")  # required beside the runner
EXTRA_LIB = "libtvm_runtime_extra.so"  # optional: tvm.contrib.sort & co (topk/argsort/NMS)

# Bumped when what an sdk directory holds changes, so that older ones are rebuilt.
_SDK_FORMAT = 2


def runtime_sdk(
    arch: str, cache: Path, versions: dict[str, str], cxx: str, shim_dir: Path, log: Log
) -> tuple[list[Path], list[Path]]:
    """(include dirs, runtime libraries) of ``arch`` for the installed TVM ``versions``, made in
    ``cache`` if needed. ``cxx`` and ``shim_dir`` (targets/runner/runtime_shims) serve the armv7
    build from source."""
    if arch == "x86_64":
        return _host_sdk()
    if arch == "armv7":
        sdk = _armv7_sdk(cache, versions, shim_dir, cxx, log)
    else:
        sdk = _wheel_sdk(arch, cache, versions, log)
    return [sdk / "include"], sorted((sdk / "lib").glob("*.so"))


def sdk_blocker(arch: str, shim_dir: Path) -> str | None:
    """Why the sdk of ``arch`` cannot be made here (None when nothing known blocks it). Looks at
    files only: the armv7 build needs the runtime sources of the installed wheel and our shims."""
    if arch != "armv7":
        return None
    tvm_src = host_package_dir("tvm") / "src" / "runtime"
    missing = [rel for rel in ARMV7_RUNTIME_SOURCES if not (tvm_src / rel).is_file()]
    if missing:
        return (f"no armv7 wheel exists and the installed apache-tvm lacks the runtime sources "
                f"{', '.join(missing)} under {tvm_src}")
    missing = [f for f in _SHIM_FILES if not (shim_dir / f).is_file()]
    if missing:
        return f"runtime shim headers missing under {shim_dir}: {', '.join(missing)}"
    return None


# ---------------------------------------------------------------------------------------------
# aarch64 (PyPI wheels) and x86_64 (installed wheels)
# ---------------------------------------------------------------------------------------------


def _wheel_sdk(arch: str, cache: Path, versions: dict[str, str], log: Log) -> Path:
    """Headers and runtime libraries of ``arch`` taken from the PyPI wheels of that platform,
    in ``<cache>/sdk/<arch>/{include,lib}``."""
    facts = QEMU_ARCHES[arch]
    sdk = cache / "sdk" / arch
    want = {"arch": arch, **versions, "format": _SDK_FORMAT}
    if stamp_matches(sdk / "sdk.json", want):
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
            run_tool(
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
    with staged_dir(sdk, "sdk.json", want) as tmp:
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
    return sdk


def _host_sdk() -> tuple[list[Path], list[Path]]:
    """(include dirs, runtime libraries) of the installed (x86_64) wheels."""
    ffi_dir = host_package_dir("tvm_ffi")
    tvm_dir = host_package_dir("tvm")
    libs = [tvm_dir / "lib" / "libtvm_runtime.so", ffi_dir / "lib" / "libtvm_ffi.so"]
    for lib in libs:
        if not lib.is_file():
            raise TargetError(f"{lib} not found in the installed wheel")
    extra = tvm_dir / "lib" / EXTRA_LIB
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
    host = host_package_dir("tvm_ffi")
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
        run_tool(
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
        run_tool([cxx, *flags, "-c", str(src), "-o", str(tmp)], f"compiling {src.name} for armv7",
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
    if stamp_matches(sdk / "sdk.json", want) and all(
        (sdk / "lib" / lib).is_file() for lib in RUNTIME_LIBS
    ):
        built = min((sdk / "lib" / lib).stat().st_mtime for lib in RUNTIME_LIBS)
        if all(s.stat().st_mtime <= built for s in shims):
            return sdk

    tvm_src = host_package_dir("tvm") / "src" / "runtime"
    tvm_inc = host_package_dir("tvm") / "include"
    ffi_root = _ffi_source_root(cache, versions, log)
    build = cache / "build" / "armv7"
    # Fresh object directories when the versions or the compiler changed.
    flags_stamp = build / "build.json"
    obj_key = {k: v for k, v in want.items() if k != "format"}
    if not stamp_matches(flags_stamp, obj_key):
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
    with staged_dir(sdk, "sdk.json", want) as tmp:
        lib = tmp / "lib"
        lib.mkdir()
        run_tool([cxx, "-shared", "-o", str(lib / "libtvm_ffi.so"), *[str(o) for _, o in ffi_objs],
                  "-Wl,-soname,libtvm_ffi.so", "-ldl", "-lpthread"],
                 "linking libtvm_ffi.so for armv7")
        run_tool([cxx, "-shared", "-o", str(lib / "libtvm_runtime.so"),
                  *[str(o) for _, o in rt_objs], "-Wl,-soname,libtvm_runtime.so", f"-L{lib}",
                  "-ltvm_ffi", "-ldl", "-lpthread", "-Wl,-rpath,$ORIGIN", "-Wl,--no-undefined"],
                 "linking libtvm_runtime.so for armv7")
        shutil.copytree(ffi_root / "include" / "tvm", tmp / "include" / "tvm")
        shutil.copytree(ffi_root / "3rdparty" / "dlpack" / "include" / "dlpack",
                        tmp / "include" / "dlpack")
    return sdk

