"""The int8 dot-product kernels as a kernel hook of the CPU families.

Turned on by a preset's ``features.int8_dot`` (a kernel name or a preference list): before
fusion, realized int8 convolutions become packed-weight kernels for the first listed kernel the
target CPU has (``PackInt8Conv``); after fusion they are tiled and tensorized by hand
(``ScheduleInt8Conv``), so tuning leaves them alone. Passes learn the kernel from
``TargetFacts.int8_dot`` and the activation dtypes it takes from ``int8_act_dtypes``.
"""

from __future__ import annotations

from .base import KernelHook
from .int8_pack import PackInt8Conv, target_kernel
from .int8_schedule import ScheduleInt8Conv


class Int8DotKernels(KernelHook):
    name = "int8_dot"
    feature = "int8_dot"

    def rewrites(self, profile):
        kernel = target_kernel(profile)
        return [PackInt8Conv(kernel)] if kernel is not None else []

    def schedules(self, profile):
        return [ScheduleInt8Conv()] if target_kernel(profile) is not None else []

    def facts(self, profile):
        kernel = target_kernel(profile)
        if kernel is None:
            return {}
        return {"int8_dot": kernel.name, "int8_act_dtypes": tuple(kernel.act_dtypes)}


INT8_DOT = Int8DotKernels()
