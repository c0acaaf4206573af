"""Default schedules that survive a rule failing on one kernel.

dlight's ``ApplyDefaultSchedule`` lets an exception from any rule on any kernel end the whole
build, and a schedule TVM's own lowering rejects ends it later, in ``tvm.compile``. Both happen
with TVM 0.27's ``gpu.Matmul``:

- a convolution fused with a trailing pad (``conv2d + add + relu + pad``, a newer PaddleOCR
  detector): "There are some consumers of the cache-write stage that are not properly inlined"
  (the pad's output is larger than the convolution's, so it cannot be inlined into its write);
- an int8 convolution or matmul with 128 or more input channels on sm_80 and newer (the int8
  tensor-core schedule, the PP-OCRv4 detector's int8 build): the schedule is made, then the
  software-pipeline lowering fails ("Check failed: (it != fragment_info_.end())").

A third shows only when the device code is compiled: ``gpu.GeneralReduction`` on that conv+pad
kernel at 320x320 stages 3.2 MB in shared memory (48 KiB is what a block gets).

Here each kernel tries the rules in order; a rule that raises, or whose schedule does not lower
through the target's TIR pipeline (``tvm.tirx.get_tir_pipeline("default")``, no code generation)
or, on a GPU, exceeds the target's shared memory or threads per block, is skipped for that
kernel and the next one tried (the last is the family's generic fallback).
The kernels that needed this are listed in the module attribute ``FALLBACKS_ATTR`` (JSON) for the
compile report. Runs where the family's default schedule runs: after tuning, on kernels nothing
scheduled yet.
"""

from __future__ import annotations

import json
from typing import List

import tvm
from tvm import tirx
from tvm.s_tir.analysis import verify_gpu_code
from tvm.target import Target

from tvm_compress.specs import json_attr

FALLBACKS_ATTR = "tvm_compress.schedule_fallbacks"
_GPU_LIMITS = ("max_shared_memory_per_block", "max_threads_per_block")


def _one_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


@tvm.transform.module_pass(opt_level=0, name="ResilientDefaultSchedule")
class ResilientDefaultSchedule:
    """Schedule every unscheduled kernel with the first rule that applies without raising."""

    def __init__(self, *rules):
        self.rules = list(rules)
        self.lower, _, _ = tvm.tirx.get_tir_pipeline("default")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fallbacks: List[dict] = list(schedule_fallbacks(mod))
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
                continue
            target = Target(func.attrs["target"]) if func.attrs is not None and "target" in func.attrs \
                else Target.current(allow_none=False)
            failed = []
            for rule in self.rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as err:  # noqa: BLE001  (the rule's bug: try the next one)
                    failed.append({"rule": type(rule).__name__, "error": _one_line(err)})
                    continue
                if space is None:
                    continue
                sch = space if not isinstance(space, list) else space[0]
                scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                try:
                    self._lowers(gvar, scheduled, target)
                except Exception as err:  # noqa: BLE001  (a schedule TVM cannot lower: the next rule)
                    failed.append({"rule": type(rule).__name__, "error": _one_line(err)})
                    continue
                updated[gvar] = scheduled
                if failed:
                    fallbacks.append({"kernel": gvar.name_hint, "failed": failed, "used": type(rule).__name__})
                break
            else:
                if failed:  # no rule could: left as it is (a CPU runs it; a GPU build says so)
                    fallbacks.append({"kernel": gvar.name_hint, "failed": failed, "used": None})
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod.with_attr(FALLBACKS_ATTR, json.dumps(fallbacks)) if fallbacks else mod

    def _lowers(self, gvar, func: tirx.PrimFunc, target: Target) -> None:
        """Raises where ``tvm.compile`` would on this kernel's schedule (TIR passes only)."""
        # The host tvm.compile binds: the target's own, a CPU target itself, else plain LLVM.
        host = target.host if target.host is not None else (
            target if target.kind.name in ("llvm", "c") else Target({"kind": "llvm"}))
        one = tvm.IRModule({gvar: func.with_attr("global_symbol", gvar.name_hint)})
        one = tvm.tirx.transform.BindTarget(target.with_host(host))(one)
        with target:
            lowered = self.lower(one)
        if target.kind.name == "cuda":
            limits = {k: int(target.attrs[k]) for k in _GPU_LIMITS if k in target.attrs}
            for f in lowered.functions.values():
                if isinstance(f, tirx.PrimFunc) and not verify_gpu_code(f, limits):
                    # ptxas would refuse it at build time ("uses too much shared data")
                    raise ValueError(f"the schedule exceeds the GPU's limits {limits}")


def schedule_fallbacks(mod: tvm.IRModule) -> List[dict]:
    """The kernels ``ResilientDefaultSchedule`` scheduled with a later rule (or none)."""
    return json_attr(mod, FALLBACKS_ATTR, [])
