"""RoundToInt: a requantize's round, clamp and cast -> one float-to-int conversion, the clamp on
integers (x86).

Needs: the requantize chains ``Int8ChannelsLast`` spells out (``astype(maximum(minimum(round(x)
[+ 0], hi), lo), int8|uint8)``); runs after it, before legalization and fusion, so the new
element-wise kernel fuses into the int8 convolution's epilogue like the ops it replaces.

TVM lowers ``round`` to ``llvm.nearbyint``: on AVX2 a ``vroundps``, then the float clamp (two
instructions) and a truncating ``vcvttps2dq`` before the saturating packs. ``llvm.lrint`` on a
float32 vector is one ``vcvtps2dq``, which rounds half to even as ``nearbyint`` does (the
default rounding mode; TVM never changes it), and LLVM folds an integer clamp to the int8 or
uint8 range into the packs' saturation: two of the about eight instructions per 8 outputs
between the scaled value and its store. Exact for every finite value: ``x`` is first capped at
``2^31 - 128`` (the largest float32 below 2^31), whose conversion stays positive; values below
``-2^31`` convert to ``INT_MIN`` and clamp to ``lo`` as before. A NaN now gives ``lo``.

Only zero-point 0 (what this tool's calibration produces: symmetric int8, uint8 from 0): an
integer zero point added after ``lrint`` could overflow on huge inputs. Other chains stay.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.relax_utils import scalar_value

from .base import KernelHook

_OP = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("astype", "maximum", "minimum", "add", "round")}
_OUT_DTYPES = ("int8", "uint8")
_CAP = float(np.float32(2**31 - 128))  # float32 below 2^31: lrint of it is a positive int32
_ELEMWISE = 0  # relax.transform's OpPatternKind kElemWise


def _round_to_int32(x: te.Tensor) -> te.Tensor:
    cap = tirx.const(_CAP, "float32")
    return te.compute(x.shape, lambda *i: tirx.call_llvm_pure_intrin("int32", "llvm.lrint", tirx.min(x(*i), cap)),
                      name="round_to_int")


@mutator
class _RoundToInt(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def _bound(self, expr, op):
        """``expr``'s value when it is a call of ``op`` (through its variable binding)."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        return value if isinstance(value, relax.Call) and value.op.same_as(_OP[op]) else None

    @staticmethod
    def _integer(expr, dtype: str):
        """A float32 scalar constant holding an integer of ``dtype``'s range, as an int (or None)."""
        value = scalar_value(expr)
        if value is None or str(expr.ty.dtype) != "float32":
            return None
        value = float(value)
        info = np.iinfo(dtype)
        return int(value) if value.is_integer() and info.min <= value <= info.max else None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        dtype = str(call.attrs.dtype) if call.op.same_as(_OP["astype"]) else None
        if dtype not in _OUT_DTYPES:
            return call
        floor = self._bound(call.args[0], "maximum")  # maximum(., lo)
        ceiling = self._bound(floor.args[0], "minimum") if floor is not None else None
        if ceiling is None:
            return call
        lo, hi = self._integer(floor.args[1], dtype), self._integer(ceiling.args[1], dtype)
        rounded = ceiling.args[0]
        shift = self._bound(rounded, "add")
        if shift is not None and self._integer(shift.args[1], "int32") == 0:
            rounded = shift.args[0]
        rounded = self._bound(rounded, "round")
        if lo is None or hi is None or rounded is None or str(rounded.args[0].ty.dtype) != "float32":
            return call
        bb = self.builder_
        q = bb.emit(bb.call_te(_round_to_int32, rounded.args[0], primfunc_name_hint="round_to_int",
                               primfunc_attrs={"op_pattern": _ELEMWISE}))
        q = bb.emit(relax.op.minimum(q, relax.const(hi, "int32")))
        q = bb.emit(relax.op.maximum(q, relax.const(lo, "int32")))
        self.count += 1
        return relax.op.astype(q, dtype)


@tvm.transform.module_pass(opt_level=0, name="RoundToInt")
class RoundToInt:
    """Rewrite the requantize chains of every Relax function (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _RoundToInt(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                new = rewriter.visit_expr(func)
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return rewriter.builder_.get() if rewriter.count else mod


class RoundToIntHook(KernelHook):
    """``RoundToInt`` as a kernel hook of the x86 family, with the int8 kernels."""

    name = "round_to_int"
    feature = "int8_dot"

    def rewrites(self, profile):
        return [RoundToInt()]


ROUND_TO_INT = RoundToIntHook()
