"""Conv1dToConv2d: 1-D convolutions as 2-D ones of height 1.

Needs: Relax ``R.nn.conv1d`` calls with a constant OIW weight and NCW data (what the ONNX
importer emits for a 1-D ``Conv``). Each becomes ``expand_dims`` -> ``conv2d`` (a ``1 x K``
kernel; stride, padding, dilation and groups along the width) -> ``squeeze``. The per-channel
affine ops (bias add, batch norm, scale) and one element-wise activation that follow move before
the ``squeeze``, folded into the weights and a bias as ``ConvTransposeToConv`` does, and a
conv1d that reads such a result takes the 4-D value itself, so a chain of 1-D layers runs as a
chain of 2-D ones with no reshape between them. Exact, not an approximation.

Runs right after import (on dataflow blocks, as the importer emits them), before the
compression passes: the CPU families' conv2d schedules, channels-last layouts, int8 kernels,
pruning and low-rank splits then apply to 1-D models too (a conv1d had no tiled schedule).
Other conv1d calls (a non-constant weight, another layout) are left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const_value, is_constant

from ._affine import ChainRewrite, follow_chain

_CONV1D = tvm.ir.Op.get("relax.nn.conv1d")


def _rewritable(call) -> bool:
    attrs = call.attrs
    weight = call.args[1]
    return (
        is_constant(weight)
        and len(weight.value.shape) == 3
        and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCW", "OIW", "NCW")
    )


@mutator
class _Rewriter(PyExprMutator, ChainRewrite):
    def __init__(self, mod):
        super().__init__(mod)
        self.init_chain()
        self.lifted = {}  # a rewritten layer's 3-D result -> its 4-D value

    def visit_dataflow_block_(self, block):
        self.lifted = {}  # its 4-D values are this block's dataflow vars
        self.track_block(block)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        if binding.var in self.skip:
            return
        call = binding.value
        if not (self.builder_.current_block_is_dataflow() and isinstance(call, relax.Call)
                and call.op.same_as(_CONV1D) and _rewritable(call)):
            super().visit_var_binding_(binding)
            return
        data, weight = call.args
        attrs = call.attrs
        w = const_value(weight)  # [O, C / groups, K]
        chain = follow_chain(binding.var, w.shape[0], self.bindings, self.users)
        w4 = np.ascontiguousarray((w * chain.scale[:, None, None])[:, :, None, :].astype(w.dtype))
        bb = self.builder_
        x4 = self.lifted.get(data)
        if x4 is None:
            x4 = bb.emit(relax.op.expand_dims(self.visit_expr(data), axis=2))
        out_dtype = attrs.out_dtype
        pad_left, pad_right = (int(v) for v in attrs.padding)
        # The 2-D convolution is the same layer (same name) as the 1-D one.
        y = bb.emit(with_layer(relax.op.nn.conv2d(
            x4, relax.const(w4), strides=[1, int(attrs.strides[0])], padding=[0, pad_left, 0, pad_right],
            dilation=[1, int(attrs.dilation[0])], groups=int(attrs.groups),
            out_dtype=out_dtype if str(out_dtype) else None), call))
        y = self.emit_chain(y, chain, chain.shift.reshape(1, -1, 1, 1).astype(w.dtype))
        result = self.replace_chain(binding, chain, relax.op.squeeze(y, axis=[2]))
        self.lifted[result] = y


def _has_conv1d(mod: tvm.IRModule) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(_CONV1D):
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="Conv1dToConv2d")
class Conv1dToConv2d:
    """Rewrite 1-D convolutions as 2-D convolutions of height 1 (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not _has_conv1d(mod):
            return mod
        # The importer reshapes each bias at run time; folded, it is a constant the chain takes.
        mod = relax.transform.FoldConstant()(mod)
        return _Rewriter(mod).rewrite(mod)
