"""CUDA family: NVIDIA GPUs by compute capability, optionally with an aarch64 host (Jetson).

Without tuning records, GPU kernels get dlight's default schedules (untuned GPU code without
them does not even bind threads). Building needs only nvcc; running needs a GPU.

The device code is compiled at build time (nvcc: machine code for the target's arch plus its PTX,
which newer GPUs' drivers compile), so the library runs where only the TVM runtime is installed.
TVM makes such a module only when its CUDA runtime library loads; on a build host without the
NVIDIA driver it would ship CUDA source, compiled at load time by a full TVM and a CUDA
compiler. There, a stand-in for the driver library (every entry point answers "no device") is
linked at build time so that the runtime library loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm.s_tir import dlight as dl
from tvm.s_tir import meta_schedule as ms

from tvm_compress import _fast_inspect
from tvm_compress.errors import TargetError

from .base import RunResult, TargetFamily, TargetProfile, register_family
from .default_schedule import ResilientDefaultSchedule
from .local import run_in_process
from .x86 import host_cpu

_DEFAULT_ARCH = "sm_80"


def _gpu_here() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no driver / no runtime: treat as no GPU
        return False


_DRIVER_STUB: list = []  # True once the stand-in is loaded (once per process)


def _load_driver_stub(sidecar: Path) -> bool:
    """Link a stand-in libcuda.so.1 exporting the driver entry points ``sidecar`` needs, each
    answering CUDA_ERROR_NO_DEVICE (100): a host without the driver can then make CUDA modules."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which("nm") is None:
        return False
    listed = subprocess.run(["nm", "-D", "--undefined-only", str(sidecar)], capture_output=True, text=True)
    names = sorted({ln.split()[-1].split("@")[0] for ln in listed.stdout.splitlines() if ln.strip()})
    names = [n for n in names if n.startswith("cu") and n[2:3].isupper()]
    with tempfile.TemporaryDirectory(prefix="tvmc-cuda-stub-") as tmp:  # loaded, the file may go
        folder = Path(tmp)
        (folder / "stub.c").write_text("".join(f"int {n}(void) {{ return 100; }}\n" for n in names))
        built = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                                str(folder / "libcuda.so.1"), str(folder / "stub.c")], capture_output=True, text=True)
        if built.returncode != 0:
            return False
        ctypes.CDLL(str(folder / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    _DRIVER_STUB.append(True)
    return True


def _cuda_modules_here() -> bool:
    """Whether TVM's CUDA runtime is loaded, so that codegen makes compiled CUDA modules."""
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return True
    sidecar = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not sidecar.exists():
        return False
    try:
        ctypes.CDLL(str(sidecar), mode=ctypes.RTLD_GLOBAL)
    except OSError:  # libcuda.so.1 missing: no driver on this host
        if _DRIVER_STUB or not _load_driver_stub(sidecar):
            return False
        try:
            ctypes.CDLL(str(sidecar), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            return False
    return tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


@contextlib.contextmanager
def _device_code_compiler(target: tvm.target.Target):
    """During ``tvm.compile``: CUDA kernels compiled by nvcc to a fat binary holding the target
    arch's machine code and its PTX (TVM's default asks NVRTC, which needs cuda-bindings, for
    machine code of one arch alone)."""
    from tvm.support import nvcc

    arch = str(target.attrs.get("arch", _DEFAULT_ARCH)).split("_", 1)[1]
    gencode = ["-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]"]
    name = "tvm_callback_cuda_compile"
    original = tvm.get_global_func(name, allow_missing=True)

    def compile_kernels(code):
        return nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc")

    tvm_ffi.register_global_func(name, compile_kernels, override=True)
    try:
        with target:
            yield
    finally:
        if original is not None:
            tvm_ffi.register_global_func(name, original, override=True)


def cuda_graph(features) -> bool:
    """``features.cuda_graph`` (default false): replay the kernels between allocations as CUDA graphs."""
    value = features.get("cuda_graph", False)
    if not isinstance(value, bool):
        raise TargetError(f"cuda_graph {value!r} is not true or false")
    return value


# Limits every GPU since sm_50 has (48 KiB is the static shared memory a block gets without
# opting in): the GPU schedules ask for them, and warn on every build when they are missing.
_DEVICE_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                  "thread_warp_size": 32, "registers_per_block": 65536}


@register_family
class CudaFamily(TargetFamily):
    name = "cuda"

    def _host_is_cross(self, profile: TargetProfile) -> bool:
        host = profile.target.get("host") or {}
        return "aarch64" in str(host.get("mtriple", ""))

    def tvm_target(self, profile: TargetProfile) -> tvm.target.Target:
        spec = dict(profile.target)
        if spec.get("arch") in (None, "auto"):
            spec["arch"] = (
                "sm_" + tvm.cuda(0).compute_version.replace(".", "") if _gpu_here() else _DEFAULT_ARCH
            )
        for key, value in _DEVICE_LIMITS.items():  # a preset may set its own
            spec.setdefault(key, value)
        host = dict(spec.get("host") or {"kind": "llvm"})
        if host.get("kind") == "llvm" and "mtriple" not in host and host.get("mcpu") in (None, "auto"):
            host["mcpu"] = host_cpu()
        spec["host"] = host
        return super().tvm_target(profile.with_target(spec))

    def check_toolchain(self, profile: TargetProfile) -> None:
        if shutil.which("nvcc") is None:
            raise TargetError(
                f"target {profile.name!r} needs nvcc (the CUDA toolkit) on PATH to build GPU code"
            )
        if self._host_is_cross(profile) and shutil.which("aarch64-linux-gnu-g++") is None:
            raise TargetError(
                f"target {profile.name!r} needs the cross compiler aarch64-linux-gnu-g++: "
                "apt-get install g++-aarch64-linux-gnu"
            )

    def fcompile(self, profile: TargetProfile):
        if self._host_is_cross(profile):
            return tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++")
        return None

    def compile(self, mod, profile: TargetProfile):
        target = profile.tvm_target()
        if not _cuda_modules_here():
            raise TargetError(
                f"target {profile.name!r}: TVM's CUDA runtime library (libtvm_runtime_cuda.so) does not "
                "load here, so the GPU code cannot be compiled into the library"
            )
        # features.cuda_graph: the kernels between allocations are captured into CUDA graphs on
        # the first call and replayed after (one launch for many; batch-1 models are launch-bound)
        graphs = {"relax.backend.use_cuda_graph": True} if cuda_graph(profile.features) else {}
        with _device_code_compiler(target), tvm.transform.PassContext(config=graphs):
            return tvm.compile(mod, target)

    def default_schedule(self, profile: TargetProfile):
        return [
            ResilientDefaultSchedule(
                dl.gpu.Matmul(),
                dl.gpu.GEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )
        ]

    def can_run(self, profile: TargetProfile):
        if self._host_is_cross(profile):
            return False, "not run: needs the board (aarch64 host with a GPU); use --rpc-tracker"
        if not _gpu_here():
            return False, "not run: no GPU"
        return True, ""

    def run(self, profile, lib_path: Path, inputs: Sequence[np.ndarray], repeat=0, warmup=0, function="main"):
        ok, why = self.can_run(profile)
        if not ok:
            raise TargetError(why)
        outputs, times = run_in_process(lib_path, self.local_device(profile), inputs, repeat, warmup, function)
        return RunResult(outputs, times, f"cuda:{tvm.cuda(0).device_name}")

    def local_device(self, profile: TargetProfile):
        return tvm.cuda(0)

    def remote_device(self, session):
        return session.cuda(0)

    def vector_lanes(self, profile: TargetProfile) -> int:
        return 32  # the threads of a warp: channel counts in multiples of it keep warps whole

    def vector_popcount(self, profile: TargetProfile) -> bool:
        return True  # __popc per thread

    def tuning_runner(self, profile: TargetProfile):
        if not self.can_run(profile)[0]:
            return None
        return ms.runner.LocalRunner(initializer=_fast_inspect.install)
