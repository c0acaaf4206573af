"""ARM families: aarch64 and armv7 (hard-float), cross-compiled, run here under qemu-user.

Libraries are exported with the Debian cross compilers and executed by the deploy runner
(``targets/runner``) under qemu: that proves the artifact runs on the architecture, but qemu
timings say nothing about a board's speed, so latency is only reported from real boards (RPC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import RunResult, TargetFamily, TargetProfile, register_family
from .cpu_schedule import cpu_default_schedule
from .int8_hook import INT8_DOT
from .binary_hook import BINARY
from .sparse_hook import BLOCK_SPARSE
from .channels_last import CHANNELS_LAST
from .dense_columns import DENSE_COLUMNS
from .float_depthwise import FLOAT_DEPTHWISE
from .separable_resize import SEPARABLE_RESIZE
from .packed_dense import PACKED_DENSE
from .pooled_conv import POOLED_CONV
from .softmax_rows import SOFTMAX_ROWS


class _ArmFamily(TargetFamily):
    arch = ""
    kernel_hooks = (POOLED_CONV, INT8_DOT, BLOCK_SPARSE, BINARY,
                    CHANNELS_LAST, FLOAT_DEPTHWISE, SEPARABLE_RESIZE, DENSE_COLUMNS, PACKED_DENSE, SOFTMAX_ROWS)

    def tvm_target(self, profile: TargetProfile):
        spec = dict(profile.target)
        # MetaSchedule needs the core count of CPU targets; presets give the board's, user
        # presets may not: most ARM Linux boards have four.
        spec.setdefault("num-cores", 4)
        return super().tvm_target(profile.with_target(spec))

    def can_run(self, profile: TargetProfile):
        from . import qemu

        return qemu.can_run(self.arch)

    def run(self, profile, lib_path: Path, inputs: Sequence[np.ndarray], repeat=0, warmup=0, function="main"):
        from . import qemu

        res = qemu.run_library(lib_path, self.arch, list(inputs), repeat=max(repeat, 1), warmup=warmup,
                               function=function)
        return RunResult(list(res.outputs), list(res.times_ms), f"qemu-{self.arch} (emulated)")

    def latency_is_meaningful(self, profile: TargetProfile) -> bool:
        return False

    def default_schedule(self, profile: TargetProfile):
        return cpu_default_schedule(self.vector_lanes(profile))

    def vector_lanes(self, profile: TargetProfile) -> int:
        return 4  # NEON: 128-bit registers

    def vector_popcount(self, profile: TargetProfile) -> bool:
        return True  # NEON cnt counts the bits of 16 bytes at once


@register_family
class Aarch64Family(_ArmFamily):
    name = "aarch64"
    arch = "aarch64"
    cross_cc = "aarch64-linux-gnu-g++"
    cross_package = "g++-aarch64-linux-gnu"


@register_family
class Armv7Family(_ArmFamily):
    name = "armv7"
    arch = "armv7"
    cross_cc = "arm-linux-gnueabihf-g++"
    cross_package = "g++-arm-linux-gnueabihf"
