"""Running exported libraries here with the deploy runner: under qemu-user for ARM, natively for x86_64.

``run_library`` checks the library (its ELF header must be of the architecture) and the inputs,
builds the runner if needed (``runner_build``), runs the Relax function under
``qemu-<arch> -L <sysroot>`` and reads the outputs back:

    run_library("model.so", "aarch64", [x])   -> RunResult(outputs, times_ms, where)
    can_run("armv7")                          -> (True, "") or (False, why)

qemu proves that a library loads and computes correctly on its architecture; its timings say
nothing about a board's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tvm_compress.errors import DataError, TargetError

from .arches import QEMU_ARCHES, arch_facts
from .base import RunResult
from .host_tools import find_tool
from .runner_build import ensure_runner, runner_unavailable

__all__ = ["can_run", "run_library"]

# numpy dtype name -> the dtype string the runner (tvm-ffi) understands; they coincide.
_DTYPES = {
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
}


def can_run(arch: str, cache_dir=None) -> tuple[bool, str]:
    """(True, "") when libraries for ``arch`` can be run here (the runner is built, or can be
    built, and qemu-user with the target's sysroot is present); else (False, why). Builds
    nothing."""
    try:
        arch_facts(arch)
        _emulator_prefix(arch)
    except TargetError as err:
        return False, str(err)
    why = runner_unavailable(arch, cache_dir)
    return (False, why) if why else (True, "")


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
    qemu = find_tool(facts["qemu"], facts["qemu_package"])
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
    arch_facts(arch)
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
        where = f"qemu-{arch} (emulated)" if prefix else "native"
        return RunResult(outputs, [float(t) for t in report["times_ms"]], where=where)
