"""x86-64 host family: LLVM with the CPU named explicitly (``mcpu = "auto"`` detects it)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms

from tvm_compress import _fast_inspect
from tvm_compress._threads import physical_cores
from tvm_compress.errors import TargetError

from .base import RunResult, TargetFamily, TargetProfile, register_family
from .cpu_schedule import cpu_default_schedule
from .int8_hook import INT8_DOT
from .round_to_int import ROUND_TO_INT
from .binary_hook import BINARY
from .sparse_hook import BLOCK_SPARSE
from .channels_last import CHANNELS_LAST
from .dense_columns import DENSE_COLUMNS
from .float_depthwise import FLOAT_DEPTHWISE
from .separable_resize import SEPARABLE_RESIZE
from .packed_dense import PACKED_DENSE
from .pooled_conv import POOLED_CONV
from .softmax_rows import SOFTMAX_ROWS
from .local import run_in_process


def host_cpu() -> str:
    """LLVM's name for this CPU ("native" is ignored by TVM's LLVM, so name it)."""
    return tvm.target.codegen.llvm_get_system_cpu()


# LLVM's names of the ISA extensions kernels here may use -> the Linux /proc/cpuinfo flag. A
# preset for another CPU (x86-avxvnni, an AVX-512 board) builds anywhere, but its code must not
# run on a CPU without them: an illegal instruction kills the process.
_CPUINFO_FLAGS = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
    "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni", "avx512vbmi": "avx512vbmi", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bf16": "avx512_bf16", "amx-int8": "amx_int8",
}


def host_flags():
    """This CPU's flags from /proc/cpuinfo (None where there is no such file). LLVM's name for
    the CPU can miss some: a VM's CPU named ``rocketlake`` also had AVX-VNNI."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def missing_features(target: tvm.target.Target, flags) -> list:
    """The ISA extensions ``target``'s code may use that a CPU with ``flags`` lacks."""
    return [f for f, flag in _CPUINFO_FLAGS.items()
            if flag not in flags and tvm.target.codegen.target_has_features([f], target)]


@register_family
class X86Family(TargetFamily):
    name = "x86"
    kernel_hooks = (POOLED_CONV, INT8_DOT, ROUND_TO_INT, BLOCK_SPARSE, BINARY,
                    CHANNELS_LAST, FLOAT_DEPTHWISE, SEPARABLE_RESIZE, DENSE_COLUMNS, PACKED_DENSE, SOFTMAX_ROWS)

    def tvm_target(self, profile: TargetProfile) -> tvm.target.Target:
        spec = dict(profile.target)
        if spec.get("mcpu") in (None, "auto", "native"):
            spec["mcpu"] = host_cpu()
        spec.setdefault("num-cores", physical_cores())
        return super().tvm_target(profile.with_target(spec))

    def can_run(self, profile: TargetProfile):
        if platform.machine() not in ("x86_64", "AMD64"):
            return False, f"not run: this machine is {platform.machine()}, not x86-64"
        flags = host_flags()
        missing = missing_features(self.tvm_target(profile), flags) if flags is not None else []
        if missing:
            return False, f"not run: this CPU lacks {', '.join(missing)}, which {profile.name}'s code may use"
        return True, ""

    def run(self, profile, lib_path: Path, inputs: Sequence[np.ndarray], repeat=0, warmup=0, function="main"):
        ok, why = self.can_run(profile)
        if not ok:
            raise TargetError(why)
        outputs, times = run_in_process(lib_path, self.local_device(profile), inputs, repeat, warmup, function)
        return RunResult(outputs, times, "native")

    def default_schedule(self, profile: TargetProfile):
        return cpu_default_schedule(self.vector_lanes(profile))

    def vector_lanes(self, profile: TargetProfile) -> int:
        target = self.tvm_target(profile)
        for feature, lanes in (("avx512f", 16), ("avx", 8)):
            if tvm.target.codegen.target_has_features([feature], target):
                return lanes
        return 4

    def vector_popcount(self, profile: TargetProfile) -> bool:
        return bool(tvm.target.codegen.target_has_features(["avx512vpopcntdq"], self.tvm_target(profile)))

    def tuning_runner(self, profile: TargetProfile):
        if not self.can_run(profile)[0]:
            return None  # code for a CPU this one is not: cached records only
        return ms.runner.LocalRunner(initializer=_fast_inspect.install)
