"""The int8 dot-product kernels as a kernel hook of the CPU families.

Turned on by a preset's ``features.int8_dot`` (a kernel name or a preference list): before
fusion, realized int8 convolutions go channels-last (``Int8ChannelsLast``, unless
``features.int8_layout`` is ``"NCHW"``) and become packed-weight kernels for the first listed kernel the
target CPU has (``PackInt8Conv``); after fusion they are tiled and tensorized by hand
(``ScheduleInt8Conv``), so tuning leaves them alone. Passes learn the kernel from
``TargetFacts.int8_dot``, the activation dtypes it takes from ``int8_act_dtypes`` and whether
it sums int16 pairs (weights quantized to fit them) from ``int8_pair_sums``.
"""

from __future__ import annotations

from tvm_compress.errors import TargetError

from .base import KernelHook
from .int8_layout import Int8ChannelsLast
from .int8_pack import PackInt8Conv, target_kernel
from .int8_schedule import ScheduleInt8Conv


def int8_layout(features) -> str:
    """``features.int8_layout``: "NHWC" (default: activations channels-last between int8
    layers) or "NCHW" (the imported layout; each kernel packs its input)."""
    value = features.get("int8_layout", "NHWC")
    if not isinstance(value, str) or value.upper() not in ("NHWC", "NCHW"):
        raise TargetError(f"int8_layout {value!r} is not \"NHWC\" or \"NCHW\"")
    return value.upper()


class Int8DotKernels(KernelHook):
    name = "int8_dot"
    feature = "int8_dot"

    def rewrites(self, profile):
        kernel = target_kernel(profile)
        if kernel is None:
            return []
        nhwc = int8_layout(profile.features) == "NHWC"
        return [*([Int8ChannelsLast(kernel.act_dtypes)] if nhwc else []), PackInt8Conv(kernel)]

    def schedules(self, profile):
        return [ScheduleInt8Conv()] if target_kernel(profile) is not None else []

    def facts(self, profile):
        kernel = target_kernel(profile)
        if kernel is None:
            return {}
        return {"int8_dot": kernel.name, "int8_act_dtypes": tuple(kernel.act_dtypes),
                "int8_pair_sums": kernel.int16_pairs}


INT8_DOT = Int8DotKernels()
