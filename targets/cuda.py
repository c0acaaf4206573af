"""CUDA family: NVIDIA GPUs by compute capability, optionally with an aarch64 host (Jetson).

Without tuning records, GPU kernels get dlight's default schedules (untuned GPU code without
them does not even bind threads). Building needs only nvcc; running needs a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import tvm
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
