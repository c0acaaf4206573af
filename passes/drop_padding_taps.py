"""DropPaddingTaps: kernel rows and columns of a conv that read nothing but padding are dropped.

Kernel row ``r`` of a conv (stride ``s``, dilation ``d``, top padding ``p``) reads input rows
``y * s + r * d - p`` for the output rows ``y``; where none of them lies on the map, every
product of that row is a weight times a padding zero. That happens to dilated convs on maps
smaller than their dilation (DeepLabV3's ASPP convs at rates 24 and 36 on a 20x20 map read the
map with their centre tap only: 1x1 convs doing nine times the work) and to large kernels on
tiny maps (a 3x3 conv on a 1x1 map). Such a conv becomes one over the kernel rows and columns
that read the map, with the padding that keeps every output where it was; one left 1x1 and
unpadded then runs as the dense product it is. Exact: the dropped products were ``w * 0``,
and adding zeros changes no sum.

Needs: Relax ``R.nn.conv2d`` calls with a constant OIHW weight, NCHW data and static shapes
(what the ONNX importer emits); any stride, dilation and groups. Runs right after import,
before the compression passes (which then see the smaller kernel). Other convs are left alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const_value, is_constant, static_shape

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def real_taps(size: int, kernel: int, pad: Tuple[int, int], stride: int, dilation: int,
              out: int) -> Optional[Tuple[int, int, int, int]]:
    """Along one axis: (first, last kernel tap that reads the map, the padding before and
    after that keep the output's ``out`` positions) where taps at either end read only
    padding; None where every tap reads the map, or the real taps are not one run."""
    real = [any(0 <= y * stride + r * dilation - pad[0] < size for y in range(out)) for r in range(kernel)]
    if all(real) or not any(real):
        return None
    first, last = real.index(True), kernel - 1 - real[::-1].index(True)
    if not all(real[first:last + 1]):
        return None
    before = pad[0] - first * dilation
    span = dilation * (last - first) + 1
    after = max(0, (out - 1) * stride + span - size - before)
    if before < 0 or (size + before + after - span) // stride + 1 != out:
        return None
    return first, last, before, after


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.dropped = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_CONV2D):
            return call
        attrs = call.attrs
        data, weight = call.args
        dims, out = static_shape(data), static_shape(call)
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout) or "NCHW") \
                != ("NCHW", "OIHW", "NCHW") or dims is None or out is None or not is_constant(weight):
            return call
        w = const_value(weight)
        top, left, bottom, right = (int(v) for v in attrs.padding)
        (sh, sw), (dh, dw) = ((int(v) for v in attrs.strides), (int(v) for v in attrs.dilation))
        rows = real_taps(dims[2], w.shape[2], (top, bottom), sh, dh, out[2])
        cols = real_taps(dims[3], w.shape[3], (left, right), sw, dw, out[3])
        if rows is None and cols is None:
            return call
        r0, r1, top, bottom = rows or (0, w.shape[2] - 1, top, bottom)
        c0, c1, left, right = cols or (0, w.shape[3] - 1, left, right)
        self.dropped += 1
        kept = np.ascontiguousarray(w[:, :, r0:r1 + 1, c0:c1 + 1])
        # One tap left along an axis: its dilation means nothing (int8 packs treat dilated convs apart).
        dh, dw = (1 if kept.shape[2] == 1 else dh), (1 if kept.shape[3] == 1 else dw)
        return with_layer(relax.op.nn.conv2d(
            data, relax.const(kept), strides=[sh, sw], padding=[top, left, bottom, right],
            dilation=[dh, dw], groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW",
            out_dtype=attrs.out_dtype if str(attrs.out_dtype) else None), call)


@tvm.transform.module_pass(opt_level=0, name="DropPaddingTaps")
class DropPaddingTaps:
    """Drop conv kernel rows and columns that only read padding (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get() if rewriter.dropped else mod
