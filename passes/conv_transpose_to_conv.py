"""ConvTransposeToConv: a transposed convolution whose kernel equals its stride -> 1x1 conv2d
plus depth-to-space.

Needs: Relax ``R.nn.conv2d_transpose`` calls with a constant IOHW weight, NCHW data, kernel size
equal to the stride, no padding or output padding, dilation 1, one group (the upsampling heads of
segmentation and text-detection models, e.g. PP-OCR's DB head). Then every output pixel gets
exactly one input pixel, so the op is a 1x1 convolution to ``OC * KH * KW`` channels followed
by a reshape/transpose that places each channel group on its pixel. Exact, not an approximation.
Per-channel affine ops that follow (bias add, batch norm, scale) fold into the 1x1 weights and
bias, and one element-wise activation moves before the reshape too, so quantization sees the
usual conv + bias + activation.
Runs right after import (on dataflow blocks, as the importer emits them), before the
compression passes: the 1x1 convolution is then quantized
and scheduled like any other (the generic transposed-convolution kernels are slow and have no
int8 path). Other transposed convolutions are left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const_value, is_constant

from ._affine import ChainRewrite, follow_chain

_CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


def _ints(values):
    return [int(v) for v in values]


def _rewritable(call) -> bool:
    attrs = call.attrs
    data, weight = call.args
    if not is_constant(weight) or len(weight.value.shape) != 4:
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
class _Rewriter(PyExprMutator, ChainRewrite):
    def __init__(self, mod):
        super().__init__(mod)
        self.init_chain()

    def visit_dataflow_block_(self, block):
        self.track_block(block)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        if binding.var in self.skip:
            return
        call = binding.value
        if not (self.builder_.current_block_is_dataflow() and isinstance(call, relax.Call)
                and call.op.same_as(_CONV2D_TRANSPOSE) and _rewritable(call)):
            super().visit_var_binding_(binding)
            return
        data, weight = call.args
        w = const_value(weight)  # [IC, OC, KH, KW]
        ic, oc, kh, kw = w.shape
        n, _, h, wd = (int(d) for d in data.ty.shape)
        chain = follow_chain(binding.var, oc, self.bindings, self.users)
        taps = kh * kw
        # Output channel o * KH * KW + i * KW + j holds tap (i, j) of channel o.
        w1x1 = w.reshape(ic, oc * taps).T * np.repeat(chain.scale, taps)[:, None]
        w1x1 = np.ascontiguousarray(w1x1.reshape(oc * taps, ic, 1, 1).astype(w.dtype))
        out_dtype = call.attrs.out_dtype
        bb = self.builder_
        # The 1x1 convolution is the same layer (same name) as the transposed one.
        y = bb.emit(with_layer(relax.op.nn.conv2d(self.visit_expr(data), relax.const(w1x1),
                                                  out_dtype=out_dtype if str(out_dtype) else None), call))
        y = self.emit_chain(y, chain, np.repeat(chain.shift, taps).reshape(1, oc * taps, 1, 1).astype(w.dtype))
        y = bb.emit(relax.op.reshape(y, [n, oc, kh, kw, h, wd]))
        y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
        self.replace_chain(binding, chain, relax.op.reshape(y, [n, oc, h * kh, wd * kw]))


@tvm.transform.module_pass(opt_level=0, name="ConvTransposeToConv")
class ConvTransposeToConv:
    """Rewrite stride-sized transposed convolutions as 1x1 convolutions + depth-to-space."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Rewriter(mod).rewrite(mod)
