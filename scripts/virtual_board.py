#!/usr/bin/env python3
"""Start a virtual aarch64 board (TVM RPC server under qemu-user) that registers with a tracker.

    python scripts/virtual_board.py --tracker 127.0.0.1:9190 [--key virtual-aarch64] [--port P]
                                    [--cache-dir DIR] [--prepare-only] [--force]

The first run prepares the board in <cache>/boards/aarch64/ (arm64 python3.11 from Debian,
aarch64 TVM wheels from PyPI; ~20 s); later runs reuse it. Then the server runs until Ctrl-C /
SIGTERM. Use it with

    tvm-compress compile model.onnx -o m.so --target aarch64 \\
        --rpc-tracker 127.0.0.1:9190 --rpc-key virtual-aarch64

The board behaves like a Raspberry Pi that registered with an RPC tracker (``python -m
tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` on the board), so ``--rpc-tracker`` /
``--rpc-key`` (verification, latency, MetaSchedule's RPC runner) can be exercised without
hardware. See docs/virtual-board.md. This file holds the whole board (a test tool, not part of
the installed package): its preparation, its server and the command line; tests import it with
``scripts/`` on ``sys.path`` (``prepare``, ``start_server``, ``wait_registered``,
``stop_server``).

What ``prepare()`` puts in ``<cache>/boards/aarch64/`` (cache: ``$TVM_COMPRESS_RUNNER_CACHE``,
``$TVM_COMPRESS_CACHE`` or ``~/.cache/tvm-compress``), without touching the system:

* ``sysroot/``: Debian's arm64 ``python3.11`` and the arm64 libraries it needs (libc6,
  libstdc++6, libssl3, ...), ``.deb`` files fetched with ``apt-get download`` through a private
  apt configuration (``apt/``: the host's sources, arm64 only, own lists; no ``dpkg
  --add-architecture``, nothing installed) and unpacked with ``dpkg-deb -x``;
* ``site/``: the aarch64 cp311 wheels of apache-tvm / apache-tvm-ffi (the installed versions)
  and of what ``tvm.exec.rpc_server`` imports (numpy, ml_dtypes, typing_extensions, psutil,
  cloudpickle, tornado), downloaded with ``pip download --platform manylinux_2_28_aarch64``;
* ``bin/python3``: a shell wrapper ``qemu-aarch64 -L sysroot -0 bin/python3
  sysroot/usr/bin/python3.11`` with the environment of the board. ``-0`` makes the wrapper the
  board's ``sys.executable``: TVM's RPC server starts its worker as ``sys.executable -m
  tvm.exec.popen_worker``, and the kernel cannot exec an aarch64 binary itself here (no
  binfmt_misc), but it can exec the wrapper.

The board's environment: ``TVM_USE_RUNTIME_LIB=1`` (load libtvm_runtime only, not the 240 MB
compiler library: ``import tvm`` takes about 8 s under qemu instead of 20 s; a board runs the
runtime only anyway) and ``CXX=aarch64-linux-gnu-g++``: MetaSchedule's runner uploads candidates
as a .tar of object files that the board links with its C++ compiler; under qemu-user the
emulated Python execs host binaries natively, so the host's cross compiler plays the board's
g++. In runtime-only mode ``libtvm_runtime_extra.so`` (``tvm.contrib.random``, which the RPC
runner uses to fill its arguments) is not loaded by ``import tvm``: ``start_server`` passes it
with ``--load-library``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence

from tvm_compress.cache import runner_cache_dir
from tvm_compress.errors import RemoteError, TargetError, TvmCompressError
from tvm_compress.targets.cache_entries import locked
from tvm_compress.targets.host_tools import Log, run_tool

__all__ = [
    "ARCH",
    "board_dir",
    "blocker",
    "prepare",
    "start_server",
    "stop_server",
    "wait_registered",
    "registered_keys",
    "is_prepared",
]

ARCH = "aarch64"
QEMU = "qemu-aarch64"
BOARD_CXX = "aarch64-linux-gnu-g++"
BOARD_PYTHON = "3.11"  # Debian 12's python3.11 (arm64); wheels are cp311
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64")

# arm64 .debs: python3.11 and the shared libraries its interpreter, its stdlib extension modules
# (ssl, ctypes, sqlite3, readline, ...) and the wheels' native code (libstdc++) need. The
# dependency closure of python3.11-minimal + libpython3.11-stdlib on Debian 12, less what only
# dpkg maintainer scripts use (perl, dpkg, tar, install-info, mailcap).
DEBS = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6",
    "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libcrypt1",
    "libdb5.3", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1",
    "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libk5crypto3", "libkrb5-3", "libkrb5support0",
    "libkeyutils1", "libcom-err2", "media-types",
)
# Python distributions the board imports; versions follow the host's where installed.
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions",
          "psutil", "cloudpickle", "tornado")
_PINNED = ("apache-tvm", "apache-tvm-ffi")  # must match the host exactly

# Bumped when what a board directory holds changes, so that older ones are rebuilt.
_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# locations
# ---------------------------------------------------------------------------------------------


def board_dir(cache_dir=None) -> Path:
    return runner_cache_dir(cache_dir) / "boards" / ARCH


def _wrapper(board: Path) -> Path:
    return board / "bin" / "python3"


def _extra_lib(board: Path) -> Path:
    return board / "site" / "tvm" / "lib" / "libtvm_runtime_extra.so"


def blocker() -> Optional[str]:
    """Why no virtual board can be made here (a one-line reason), or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: install the Debian package qemu-user"
    for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"{tool} not found (package {pkg}): the board's Python comes from Debian's arm64 packages"
    return None


def _want(versions: dict) -> dict:
    return {"arch": ARCH, "python": BOARD_PYTHON, "wheels": versions, "debs": list(DEBS),
            "format": _FORMAT}


def _host_versions() -> dict:
    out = {}
    for dist in WHEELS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist in _PINNED:
                raise TargetError(f"{dist} is not installed in this Python environment") from None
            out[dist] = None  # newest available
    return out


def _read_stamp(board: Path) -> Optional[dict]:
    try:
        return json.loads((board / "board.json").read_text())
    except (OSError, ValueError):
        return None


def is_prepared(cache_dir=None) -> bool:
    board = board_dir(cache_dir)
    stamp = _read_stamp(board)
    return bool(stamp) and stamp.get("want") == _want(_host_versions()) and _wrapper(board).is_file()


# ---------------------------------------------------------------------------------------------
# preparation
# ---------------------------------------------------------------------------------------------


def _apt_options(apt: Path) -> list[str]:
    return [
        "-o", "APT::Architecture=arm64",
        "-o", "APT::Architectures::=arm64",
        "-o", f"Dir::State={apt / 'state'}",
        "-o", f"Dir::State::status={apt / 'state' / 'status'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        "-o", "Debug::NoLocking=1",
        "-q",
    ]


def _private_apt(apt: Path) -> None:
    """An apt configuration of our own: the host's package sources, architecture arm64 only."""
    for sub in ("state/lists/partial", "cache/archives/partial", "sources.list.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").touch()
    parts = apt / "sources.list.d"
    for old in parts.iterdir():
        old.unlink()
    sources = []
    main = Path("/etc/apt/sources.list")
    if main.is_file() and main.read_text().strip():
        sources.append(main)
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        sources += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    if not sources:
        raise TargetError("no apt package sources (/etc/apt/sources.list[.d]) to fetch arm64 Python from")
    for i, src in enumerate(sources):
        name = src.name if src.name != "sources.list" else "00-sources.list"
        shutil.copyfile(src, parts / f"{i:02d}-{name}")


def _fetch_debs(board: Path, log: Log) -> list[Path]:
    apt = board / "apt"
    debs = board / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in debs.glob("*_arm64.deb")}
    have.update({p.name.split("_")[0]: p for p in debs.glob("*_all.deb")})
    missing = [d for d in DEBS if d not in have]
    if missing:
        _private_apt(apt)
        log("apt-get update (private arm64 package lists)")
        run_tool(["apt-get", *_apt_options(apt), "update"], "apt-get update for arm64", timeout=900)
        log(f"apt-get download {len(missing)} arm64 packages")
        run_tool(
            ["apt-get", *_apt_options(apt), "download", *[f"{d}:arm64" if d != "media-types" else d for d in missing]],
            "apt-get download of the arm64 Python packages", timeout=1800, cwd=debs,
        )
        have = {p.name.split("_")[0]: p for p in debs.glob("*.deb")}
        still = [d for d in DEBS if d not in have]
        if still:
            raise TargetError(f"apt-get download gave no .deb for: {', '.join(still)}")
    return [have[d] for d in DEBS]


def _fetch_wheels(board: Path, versions: dict, log: Log) -> list[Path]:
    wheels = board / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    shared = runner_cache_dir(None) / "wheels" / ARCH  # the deploy runner's downloads
    found: dict[str, Path] = {}
    todo = []
    for dist, version in versions.items():
        stem = dist.replace("-", "_").lower()
        pattern = f"{stem}-{version}-*.whl" if version else f"{stem}-*.whl"
        hits = [p for p in sorted(wheels.glob(pattern)) if _wheel_fits(p)]
        if not hits and version and shared.is_dir():
            for p in sorted(shared.glob(pattern)):
                if _wheel_fits(p):
                    shutil.copyfile(p, wheels / p.name)
                    hits = [wheels / p.name]
        if hits:
            found[dist] = hits[-1]
        else:
            todo.append(f"{dist}=={version}" if version else dist)
    if todo:
        log(f"pip download (aarch64, cp311): {' '.join(todo)}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", BOARD_PYTHON, "--implementation", "cp",
               "--disable-pip-version-check", "-d", str(wheels)]
        for plat in WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        run_tool(cmd + todo, "download of the aarch64 wheels", timeout=1800)
        for dist, version in versions.items():
            if dist in found:
                continue
            stem = dist.replace("-", "_").lower()
            pattern = f"{stem}-{version}-*.whl" if version else f"{stem}-*.whl"
            hits = [p for p in sorted(wheels.glob(pattern)) if _wheel_fits(p)]
            if not hits:
                raise TargetError(f"download of {dist} (aarch64, cp311) gave no wheel")
            found[dist] = hits[-1]
    return [found[d] for d in versions]


def _wheel_fits(path: Path) -> bool:
    tags = path.name[:-4].split("-")[-3:]  # python, abi, platform
    py, _abi, plat = tags
    pys = py.split(".")
    return ("py3" in pys or "cp311" in pys or (py.startswith("cp3") and _abi == "abi3")) and (
        plat == "any" or "aarch64" in plat
    )


def _write_wrapper(board: Path) -> Path:
    sysroot = board / "sysroot"
    env = {
        "PYTHONHOME": str(sysroot / "usr"),
        "PYTHONPATH": str(board / "site"),
        "PYTHONNOUSERSITE": "1",
        "TVM_USE_RUNTIME_LIB": "1",
        "CXX": shutil.which(BOARD_CXX) or BOARD_CXX,
    }
    wrapper = _wrapper(board)
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh", "# The virtual aarch64 board's python3 (written by scripts/virtual_board.py)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(
        f"exec {shlex.quote(shutil.which(QEMU) or QEMU)} -L {shlex.quote(str(sysroot))} "
        f"-0 {shlex.quote(str(wrapper))} {shlex.quote(str(sysroot / 'usr' / 'bin' / 'python3.11'))} \"$@\""
    )
    wrapper.write_text("\n".join(lines) + "\n")
    wrapper.chmod(0o755)
    return wrapper


def _precompile(board: Path, log: Log) -> None:
    """Write the .pyc files once (Debian's stdlib packages ship none; compiling them under qemu at
    every server start would cost seconds). The host's CPython 3.11 writes the same files."""
    dirs = [str(board / "sysroot" / "usr" / "lib" / "python3.11"), str(board / "site")]
    if sys.version_info[:2] == (3, 11):
        cmd = [sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs]
    else:
        cmd = [str(_wrapper(board)), "-m", "compileall", "-q", *dirs]
    log("compiling .pyc files")
    # compileall exits 1 on files that do not compile (test data, py2 leftovers): not fatal.
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)


def prepare(cache_dir=None, *, force: bool = False, log: Log = lambda msg: None) -> Path:
    """Make the virtual board (idempotent, cached); return its directory.

    Raises TargetError (one line) when qemu-aarch64 is missing or a download fails."""
    why = blocker()
    if why:
        raise TargetError(why)
    versions = _host_versions()
    want = _want(versions)
    board = board_dir(cache_dir)
    with locked(board.parent / f".{ARCH}.lock"):
        stamp = _read_stamp(board)
        if not force and stamp and stamp.get("want") == want and _wrapper(board).is_file():
            return board
        t0 = time.monotonic()
        board.mkdir(parents=True, exist_ok=True)
        debs = _fetch_debs(board, log)
        wheels = _fetch_wheels(board, versions, log)
        t_fetch = time.monotonic() - t0

        log(f"unpacking {len(debs)} .debs and {len(wheels)} wheels into {board}")
        for name in ("sysroot", "site"):
            if (board / name).exists():
                shutil.rmtree(board / name)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=board))
        try:
            for deb in debs:
                run_tool(["dpkg-deb", "-x", str(deb), str(tmp / "sysroot")], f"dpkg-deb -x {deb.name}")
            for whl in wheels:
                try:
                    with zipfile.ZipFile(whl) as zf:
                        zf.extractall(tmp / "site")
                except zipfile.BadZipFile:
                    whl.unlink(missing_ok=True)
                    raise TargetError(f"{whl} is not a valid wheel (deleted; retry)") from None
            if not (tmp / "sysroot" / "usr" / "bin" / "python3.11").is_file():
                raise TargetError("the arm64 python3.11-minimal package has no usr/bin/python3.11")
            os.replace(tmp / "sysroot", board / "sysroot")
            os.replace(tmp / "site", board / "site")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        wrapper = _write_wrapper(board)
        t_unpack = time.monotonic() - t0 - t_fetch
        _precompile(board, log)

        log("checking the board's python: import tvm under qemu")
        t1 = time.monotonic()
        proc = subprocess.run(
            [str(wrapper), "-c", "import platform, tvm, tvm.rpc; print(platform.machine(), tvm.__version__)"],
            capture_output=True, text=True, timeout=900,
        )
        t_import = time.monotonic() - t1
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise TargetError(f"the board's python fails to import tvm: {(lines or ['no output'])[-1].strip()}")
        machine = proc.stdout.split()[0] if proc.stdout.split() else "?"
        if machine != "aarch64":
            raise TargetError(f"the board's python reports machine {machine!r}, expected aarch64")
        info = {
            "want": want,
            "seconds": {"download": round(t_fetch, 1), "unpack": round(t_unpack, 1),
                        "import_tvm": round(t_import, 1),
                        "total": round(time.monotonic() - t0, 1)},
            "board_python": str(wrapper),
        }
        (board / "board.json").write_text(json.dumps(info, indent=1) + "\n")
        log(f"virtual {ARCH} board ready in {info['seconds']['total']} s ({board})")
        return board


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(
    tracker_host: str,
    tracker_port: int,
    key: str = "virtual-aarch64",
    port: Optional[int] = None,
    *,
    host: str = "127.0.0.1",
    cache_dir=None,
    log_path: Optional[os.PathLike] = None,
    extra_args: Sequence[str] = (),
    log: Log = lambda msg: None,
) -> subprocess.Popen:
    """Start ``python -m tvm.exec.rpc_server --tracker ... --key KEY`` on the virtual board.

    The server runs in its own session (process group): stop it with ``stop_server`` (it has a
    worker process besides the one returned). Output goes to ``log_path`` (default:
    ``<board>/logs/server-<port>.log``). Registration takes about half a minute (``import tvm``
    twice under qemu): see ``wait_registered``."""
    board = prepare(cache_dir, log=log)
    port = port or _free_port(host)
    cmd = [
        str(_wrapper(board)), "-m", "tvm.exec.rpc_server",
        "--tracker", f"{tracker_host}:{tracker_port}", "--key", key,
        "--host", host, "--port", str(port), "--port-end", str(port + 1),
    ]
    if _extra_lib(board).is_file():
        cmd += ["--load-library", str(_extra_lib(board))]
    cmd += list(extra_args)
    if log_path is None:
        (board / "logs").mkdir(exist_ok=True)
        log_path = board / "logs" / f"server-{port}.log"
    out = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(board))
    finally:
        out.close()
    proc.log_path = Path(log_path)  # type: ignore[attr-defined]
    proc.server_port = port  # type: ignore[attr-defined]
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the server and its workers (its whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # workers and session children left behind
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=timeout)


def registered_keys(tracker_host: str, tracker_port: int) -> list[str]:
    from tvm import rpc

    summary = rpc.connect_tracker(tracker_host, tracker_port).summary()
    return [str(s.get("key", "")).split(":")[-1] for s in summary.get("server_info", [])]


def _log_tail(proc) -> str:
    try:
        lines = [ln for ln in Path(proc.log_path).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, AttributeError):
        return "no log"
    return lines[-1].strip() if lines else "no output"


def wait_registered(
    tracker_host: str, tracker_port: int, key: str, proc: Optional[subprocess.Popen] = None,
    timeout: float = 300.0,
) -> float:
    """Wait until a server with ``key`` is registered; return the seconds waited.

    RemoteError (one line) when ``proc`` dies first or the timeout passes."""
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RemoteError(
                f"virtual board server exited with code {proc.returncode} before registering: {_log_tail(proc)}"
            )
        try:
            # connect first: rpc.connect_tracker retries (and logs) for a minute on a closed port
            socket.create_connection((tracker_host, tracker_port), timeout=2).close()
            if key in registered_keys(tracker_host, tracker_port):
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001  tracker not up yet
            pass
        if time.monotonic() - t0 > timeout:
            raise RemoteError(
                f"virtual board {key!r} did not register with {tracker_host}:{tracker_port} "
                f"within {timeout:.0f} s"
            )
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", metavar="HOST:PORT", help="RPC tracker to register with")
    parser.add_argument("--key", default="virtual-aarch64", help="device key (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address the server binds (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    parser.add_argument("--cache-dir", default=None,
                        help="default: $TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or ~/.cache/tvm-compress")
    parser.add_argument("--prepare-only", action="store_true", help="prepare the board and exit")
    parser.add_argument("--force", action="store_true", help="prepare again even when up to date")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the registration (default: %(default)s)")
    args = parser.parse_args(argv)
    say = lambda msg: print(f"virtual_board: {msg}", flush=True)  # noqa: E731

    tracker_host = tracker_port = None
    if not args.prepare_only:
        host, sep, port = (args.tracker or "").rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error("--tracker HOST:PORT is required (e.g. 127.0.0.1:9190) unless --prepare-only")
        tracker_host, tracker_port = host, int(port)

    proc = None
    stopping = False

    def _stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        t0 = time.monotonic()
        board = prepare(args.cache_dir, force=args.force, log=say)
        if args.prepare_only:
            say(f"prepared {board} ({time.monotonic() - t0:.1f} s)")
            return 0
        proc = start_server(tracker_host, tracker_port, args.key, args.port, host=args.host,
                            cache_dir=args.cache_dir)
        say(f"starting the aarch64 RPC server on {args.host}:{proc.server_port} (log {proc.log_path})")
        waited = wait_registered(tracker_host, tracker_port, args.key, proc, timeout=args.timeout)
        say(f"registered with tracker {tracker_host}:{tracker_port} as {args.key!r} "
            f"after {waited:.1f} s; Ctrl-C to stop")
        while proc.poll() is None:
            time.sleep(1)
        print(f"virtual_board: error: the server exited with code {proc.returncode}", file=sys.stderr)
        return 1
    except TvmCompressError as err:
        print(f"virtual_board: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        say("stopping")
        return 0 if stopping or proc is not None else 130
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
