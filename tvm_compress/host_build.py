"""Building a Relax module for this machine's CPU, for the passes' own measurements.

Calibration, sensitivity and recovery statistics run the model (with extra outputs) on the host.
Small modules compile as LegalizeOps leaves them; from ``SCHEDULE_FROM_MACS`` they are lowered and
given the default CPU schedule of this CPU's vector width first. In the driver, not in
``passes/``, because it needs the target families (``passes/`` imports nothing from ``targets/``).
"""

from __future__ import annotations

import platform

import tvm

HOST = {"kind": "llvm"}

# LegalizeOps' naive loops (one thread, no vectors) took seconds per calibration sample of a
# 4.5 GMAC model (ConvNeXt-Tiny: 490 s to quantize); from this many MACs the module is
# scheduled by the default CPU schedule first, whose compile costs more than small models run.
SCHEDULE_FROM_MACS = 100_000_000


def host_lanes() -> int:
    """float32 lanes of this CPU's vectors: the x86 family's count for its detected CPU, 4
    (128-bit NEON) on others."""
    from tvm_compress.targets import get_family, get_target

    if platform.machine().lower() in ("x86_64", "amd64"):
        profile = get_target("x86")
        return get_family(profile.family).vector_lanes(profile)
    return 4


def host_executable(mod: tvm.IRModule, schedule_from_macs: int = SCHEDULE_FROM_MACS):
    """``tvm.compile`` of ``mod`` for this CPU (scheduled first when it is large)."""
    from tvm_compress.layers import layer_stats, totals

    if totals(layer_stats(mod))[1] < schedule_from_macs:
        return tvm.compile(mod, tvm.target.Target(HOST))
    from tvm_compress._threads import physical_cores
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets.cpu_schedule import cpu_default_schedule

    target = tvm.target.Target({**HOST, "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": physical_cores()})
    with target:
        mod = tvm.transform.Sequential([*lowering_passes(), *cpu_default_schedule(lanes=host_lanes())])(mod)
    return tvm.compile(mod, target)
