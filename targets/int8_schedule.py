"""ScheduleInt8Conv: hand schedule for the kernels ``PackInt8Conv`` created.

Needs: fused TIR (after ``FuseOps``/``FuseTIR``) holding ``int8_conv.packed_conv2d`` blocks.
Runs before tuning and before the default schedules: a scheduled kernel is marked
``tirx.is_scheduled``, so MetaSchedule extracts no task for it and dlight leaves it alone. Its
fixed register tile is what the dot intrinsic needs; the generic tuner cannot tensorize it.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from .int8_conv import KERNEL_ATTR, schedule_packed_conv

_log = logging.getLogger("tvm_compress")


def _marked_block(sch: s_tir.Schedule):
    # The root block is "root", except in a function that is one extern op (named after it).
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    for block in sch.get_child_blocks(root):
        if KERNEL_ATTR in sch.get(block).annotations:
            return block
    return None


@tvm.transform.module_pass(opt_level=0, name="ScheduleInt8Conv")
class ScheduleInt8Conv:
    """Tensorize and tile every packed int8 convolution kernel in the module."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch = s_tir.Schedule(func)
            block = _marked_block(sch)
            if block is None:
                continue
            try:
                schedule_packed_conv(sch, block)
            except Exception as err:  # noqa: BLE001  (kernel stays correct, just untensorized)
                _log.warning("int8: %s not tensorized (%s)", gv.name_hint, str(err).splitlines()[0])
                continue
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return mod
