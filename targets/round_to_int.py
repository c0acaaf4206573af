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

The cap is one more instruction per vector in every requantize epilogue, which on AVX2 runs on
the same two ports as the taps (a 3x3 depthwise kernel's epilogue ops cost about half a cycle
per 8 values each). It is left out where the value provably stays below 2^31 in magnitude, by
interval arithmetic over the chain (``_range``): integer casts and kernels bound by their
type's range (an int32 accumulator by 2^31), constants, products, sums, clamps, ReLU,
sigmoid/tanh, and ops whose outputs stay within their inputs' values (pools, means, concats,
reshapes, nearest/linear resizes). A requantize's accumulator times ``in_scale * w_scale /
out_scale`` (well below one) stays far below 2^31: on the PP-OCRv4 detector every chain but
the first layer's (a float input) is bounded, at most 5e8.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.relax_utils import bound_call, clip_bounds, const_value, is_constant, scalar_value

from .base import KernelHook

_OP = {name: tvm.ir.Op.get(f"relax.{name}")
       for name in ("astype", "maximum", "minimum", "add", "round", "multiply", "nn.relu")}
_OP_BOUND = {tvm.ir.Op.get(f"relax.{name}"): name for name in (
    "astype", "multiply", "add", "subtract", "maximum", "minimum", "clip", "call_tir", "nn.relu", "mean",
    "sigmoid", "tanh", "concat", "reshape", "permute_dims", "strided_slice", "nn.max_pool2d",
    "nn.avg_pool2d", "image.resize2d")}
# Ops whose outputs stay within their (first) input's values; resize: only the methods that
# interpolate within their neighbours (a cubic one overshoots).
_WITHIN = ("astype", "mean", "reshape", "permute_dims", "strided_slice", "nn.max_pool2d", "nn.avg_pool2d",
           "image.resize2d")
_OUT_DTYPES = ("int8", "uint8")
_CAP = float(np.float32(2**31 - 128))  # float32 below 2^31: lrint of it is a positive int32
_ELEMWISE = 0  # relax.transform's OpPatternKind kElemWise


def _round_to_int32(x: te.Tensor, capped: bool = True) -> te.Tensor:
    cap = tirx.const(_CAP, "float32")
    return te.compute(x.shape, lambda *i: tirx.call_llvm_pure_intrin(
        "int32", "llvm.lrint", tirx.min(x(*i), cap) if capped else x(*i)),
                      name="round_to_int")


@mutator
class _RoundToInt(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def _bound(self, expr, op):
        return bound_call(self, expr, _OP[op])

    def _range(self, expr, depth: int = 0):
        """(lo, hi) bounds of ``expr``'s values (see the module docstring), else None."""
        if depth > 64:
            return None
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            return None if value is None else self._range(value, depth + 1)
        if is_constant(expr):
            data = const_value(expr)
            ok = data.size and np.isfinite(data).all()
            return (float(data.min()), float(data.max())) if ok else None
        if not isinstance(expr, relax.Call) or expr.op not in _OP_BOUND:
            return None
        op = _OP_BOUND[expr.op]
        dtype = str(expr.ty.dtype) if hasattr(expr.ty, "dtype") else ""
        if op == "call_tir" or (op == "astype" and "int" in str(expr.args[0].ty.dtype)):
            if op == "astype":
                dtype = str(expr.args[0].ty.dtype)
            return (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)) if "int" in dtype else None
        if op == "clip":
            a = self._range(expr.args[0], depth + 1)
            lo, hi = clip_bounds(expr)
            return (min(max(a[0], lo), hi), min(max(a[1], lo), hi)) if a is not None else (lo, hi)
        if op in ("sigmoid", "tanh"):
            return (0.0 if op == "sigmoid" else -1.0), 1.0
        if op == "image.resize2d" and str(expr.attrs.method) not in ("nearest_neighbor", "linear"):
            return None
        if op == "concat":
            if not isinstance(expr.args[0], relax.Tuple):
                return None
            parts = [self._range(a, depth + 1) for a in expr.args[0].fields]
            return None if None in parts else (min(p[0] for p in parts), max(p[1] for p in parts))
        unary = op in _WITHIN or op == "nn.relu"
        parts = [self._range(a, depth + 1) for a in (expr.args[:1] if unary else expr.args[:2])]
        if None in parts:
            return None
        if unary:
            return (max(parts[0][0], 0.0), max(parts[0][1], 0.0)) if op == "nn.relu" else parts[0]
        (a0, a1), (b0, b1) = parts
        if op == "multiply":
            products = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
            return min(products), max(products)
        if op == "add":
            return a0 + b0, a1 + b1
        if op == "subtract":
            return a0 - b1, a1 - b0
        pick = max if op == "maximum" else min
        return pick(a0, b0), pick(a1, b1)

    @staticmethod
    def _integer(expr, dtype: str):
        """A float32 scalar constant holding an integer of ``dtype``'s range, as an int (or None)."""
        value = scalar_value(expr)
        if value is None or str(expr.ty.dtype) != "float32":
            return None
        value = float(value)
        info = np.iinfo(dtype)
        return int(value) if value.is_integer() and info.min <= value <= info.max else None

    def _without_relu(self, scaled):
        """``relu(y) * k`` -> ``y * k`` where ``k > 0``: before a round and a clamp from ``lo >= 0``
        the ReLU changes nothing (``lrint`` is monotone, ``lrint(0) = 0``; a NaN gives ``lo``
        either way), and it cost an instruction per vector in every such epilogue."""
        product = bound_call(self, scaled, _OP["multiply"])
        if product is None or not is_constant(product.args[1]) or not (const_value(product.args[1]) > 0).all():
            return scaled
        relu = bound_call(self, product.args[0], _OP["nn.relu"])
        if relu is None:
            return scaled
        return self.builder_.emit(relax.op.multiply(relu.args[0], product.args[1]))

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
        scaled = self._without_relu(rounded.args[0]) if lo >= 0 else rounded.args[0]
        # a margin for the float32 rounding of the bounded ops themselves
        bounds = self._range(scaled)
        bound = None if bounds is None else max(abs(bounds[0]), abs(bounds[1]))
        capped = bound is None or bound * 1.001 >= _CAP
        q = bb.emit(bb.call_te(_round_to_int32, scaled, capped, primfunc_name_hint="round_to_int",
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
