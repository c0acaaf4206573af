"""ConvTransposeToConv: a transposed convolution whose kernel equals its stride -> 1x1 conv2d
plus depth-to-space.

Needs: Relax ``R.nn.conv2d_transpose`` calls with a constant IOHW weight, NCHW data, kernel size
equal to the stride, no padding or output padding, dilation 1, one group (the upsampling heads of
segmentation and text-detection models, e.g. PP-OCR's DB head). Then every output pixel gets
exactly one input pixel, so the op is a 1x1 convolution to ``OC * KH * KW`` channels followed
by a reshape/transpose that places each channel group on its pixel. Exact, not an approximation.
Runs right after import, before the compression passes: the 1x1 convolution is then quantized
and scheduled like any other (the generic transposed-convolution kernels are slow and have no
int8 path). Other transposed convolutions are left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const
from tvm.relax.expr_functor import PyExprMutator, mutator

_CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")
_CONST = is_const()


def _ints(values):
    return [int(v) for v in values]


def _rewritable(call) -> bool:
    attrs = call.attrs
    data, weight = call.args
    if not _CONST.match(weight) or len(weight.value.shape) != 4:
        return False
    kh, kw = weight.value.shape[2:]
    return (
        (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "IOHW", "NCHW")
        and int(attrs.groups) == 1
        and _ints(attrs.strides) == [kh, kw]
        and not any(_ints(attrs.padding))
        and not any(_ints(attrs.output_padding))
        and _ints(attrs.dilation) == [1, 1]
        and all(isinstance(d, tvm.tirx.IntImm) for d in data.ty.shape)
    )


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_CONV2D_TRANSPOSE) or not _rewritable(call):
            return call
        data, weight = call.args
        w = weight.value.numpy()  # [IC, OC, KH, KW]
        ic, oc, kh, kw = w.shape
        n, _, h, wd = (int(d) for d in data.ty.shape)
        # Output channel o * KH * KW + i * KW + j holds tap (i, j) of channel o.
        w1x1 = np.ascontiguousarray(w.reshape(ic, oc * kh * kw).T.reshape(oc * kh * kw, ic, 1, 1))
        out_dtype = call.attrs.out_dtype
        y = self.builder_.emit(relax.op.nn.conv2d(
            data, relax.const(w1x1), out_dtype=out_dtype if str(out_dtype) else None))
        y = self.builder_.emit(relax.op.reshape(y, [n, oc, kh, kw, h, wd]))
        y = self.builder_.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
        self.count += 1
        return relax.op.reshape(y, [n, oc, h * kh, wd * kw])


@tvm.transform.module_pass(opt_level=0, name="ConvTransposeToConv")
class ConvTransposeToConv:
    """Rewrite stride-sized transposed convolutions as 1x1 convolutions + depth-to-space."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get() if rewriter.count else mod
