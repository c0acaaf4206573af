"""ConvTransposeToConv: a transposed convolution -> a stride-1 convolution that computes every
output phase, then depth-to-space.

Needs: Relax ``R.nn.conv1d_transpose`` / ``conv2d_transpose`` / ``conv3d_transpose`` calls with a
constant IOW / IOHW / IODHW weight and NCW / NCHW / NCDHW data of static shape; any stride,
kernel size, padding, output padding, dilation and groups (the upsampling layers of
segmentation and detection heads, 3-D U-Nets, GAN generators, speech decoders and vocoders). With stride ``s``, output pixel ``t = q * s + r``
(shifted by the padding) sums input pixels ``q - m`` against taps ``m * s + r``: phase ``r`` is a
plain stride-1 convolution with ``ceil(K / s)`` taps. One convolution to ``OC * s^d`` channels
computes all phases; a reshape/transpose places each phase's channel group on its pixels and a
slice drops what the padding crops. A kernel equal to the stride gives a 1x1 convolution and no
slice. Exact, not an approximation (dilated kernels get zero taps).
Per-channel affine ops that follow (bias add, batch norm, scale) fold into the new weights and
bias, and one element-wise activation moves before the reshape too, so quantization sees the
usual conv + bias + activation.
Runs right after import (on dataflow blocks, as the importer emits them), before the
compression passes and before ``Conv1dToConv2d`` (which takes the 1-D convolutions on): the
convolution is then quantized and scheduled like any other (the generic transposed-convolution
kernels are slow and have no int8 path). A transposed convolution whose padding crops more than
a whole kernel's reach, or of another layout, is left alone.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const_value, is_constant, static_shape

from ._affine import ChainRewrite, follow_chain

_TRANSPOSED = {
    tvm.ir.Op.get("relax.nn.conv1d_transpose"): (("NCW", "IOW", "NCW"), relax.op.nn.conv1d),
    tvm.ir.Op.get("relax.nn.conv2d_transpose"): (("NCHW", "IOHW", "NCHW"), relax.op.nn.conv2d),
    tvm.ir.Op.get("relax.nn.conv3d_transpose"): (("NCDHW", "IODHW", "NCDHW"), relax.op.nn.conv3d),
}


def _ints(values):
    return [int(v) for v in values]


class _Plan:
    """Per spatial axis: stride, taps per phase, conv padding, output crop."""

    def __init__(self, call):
        attrs = call.attrs
        data, weight = call.args
        self.d = len(weight.value.shape) - 2
        self.strides = _ints(attrs.strides)
        self.dilation = _ints(attrs.dilation)
        self.kernel = [(k - 1) * dl + 1 for k, dl in zip(weight.value.shape[2:], self.dilation)]
        self.taps = [-(-k // s) for k, s in zip(self.kernel, self.strides)]
        self.n = static_shape(data)[2:]
        self.out = static_shape(call)[2:]
        pad_begin = _ints(attrs.padding)[: self.d]
        # Conv output position j is phase row q = j + skip; rows before skip are all cropped.
        skip = [p // s for p, s in zip(pad_begin, self.strides)]
        self.crop = [p - k * s for p, k, s in zip(pad_begin, skip, self.strides)]
        self.pad_left = [m - 1 - k for m, k in zip(self.taps, skip)]
        rows = [-(-(c + t) // s) for c, t, s in zip(self.crop, self.out, self.strides)]
        # Rows of whole vectors where a crop is sliced off anyway: an NCHW conv's default
        # schedule vectorizes along the row, and an odd length (4097 after a 2x upsampling's
        # extra row) got no vector loop at all (12x slower on HiFi-GAN).
        cropped = any(self.crop) or [r * s for r, s in zip(rows, self.strides)] != self.out
        if cropped and rows[-1] >= 32 and rows[-1] % 8:
            rows[-1] = -(-rows[-1] // 8) * 8
        self.pad_right = [max(r - n - pl + m - 1, 0)
                          for r, n, pl, m in zip(rows, self.n, self.pad_left, self.taps)]

    @property
    def ok(self) -> bool:
        return min(self.pad_left) >= 0

    def conv_rows(self) -> List[int]:
        return [n + pl + pr - m + 1 for n, pl, pr, m in zip(self.n, self.pad_left, self.pad_right, self.taps)]

    def weight(self, w: np.ndarray, groups: int) -> np.ndarray:
        """IO[taps] transposed weight -> OI[taps] weight of the phase convolution, output
        channel ``o * P + r`` (``r`` the phase, row-major over the axes)."""
        ic, ocg = w.shape[:2]
        d = self.d
        dense = np.zeros((ic, ocg, *(m * s for m, s in zip(self.taps, self.strides))), w.dtype)
        dense[(slice(None), slice(None), *(slice(0, k, dl) for k, dl in zip(self.kernel, self.dilation)))] = w
        # [g, ICg, OCg, M0, s0, M1, s1 ...]: tap m * s + r; flip m (a transposed conv runs it backwards)
        split = dense.reshape(groups, ic // groups, ocg, *(v for m, s in zip(self.taps, self.strides) for v in (m, s)))
        split = np.flip(split, axis=tuple(3 + 2 * a for a in range(d)))
        order = [0, 2, *(4 + 2 * a for a in range(d)), 1, *(3 + 2 * a for a in range(d))]
        phases = int(np.prod(self.strides))
        return np.ascontiguousarray(split.transpose(order).reshape(groups * ocg * phases, ic // groups, *self.taps))


def _rewritable(call) -> Optional[_Plan]:
    layouts, _ = _TRANSPOSED[call.op]
    attrs = call.attrs
    data, weight = call.args
    if not (is_constant(weight) and len(weight.value.shape) == len(layouts[0])
            and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == layouts
            and static_shape(data) is not None and static_shape(call) is not None):
        return None
    plan = _Plan(call)
    return plan if plan.ok else None


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
        plan = None
        if (self.builder_.current_block_is_dataflow() and isinstance(call, relax.Call)
                and isinstance(call.op, tvm.ir.Op) and call.op in _TRANSPOSED):
            plan = _rewritable(call)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        data, weight = call.args
        attrs = call.attrs
        w = const_value(weight)  # [IC, OC / groups, taps...]
        groups = int(attrs.groups)
        oc = w.shape[1] * groups
        phases = int(np.prod(plan.strides))
        chain = follow_chain(binding.var, oc, self.bindings, self.users)
        spatial = (1,) * plan.d
        w_conv = plan.weight(w, groups) * np.repeat(chain.scale, phases).reshape(-1, 1, *spatial)
        out_dtype = attrs.out_dtype
        padding = plan.pad_left + plan.pad_right
        bb = self.builder_
        conv = _TRANSPOSED[call.op][1]
        kwargs = {"padding": padding} if any(padding) else {}
        # The convolution is the same layer (same name) as the transposed one.
        y = bb.emit(with_layer(conv(self.visit_expr(data), relax.const(w_conv.astype(w.dtype)), groups=groups,
                                    out_dtype=out_dtype if str(out_dtype) else None, **kwargs), call))
        y = self.emit_chain(y, chain, np.repeat(chain.shift, phases).reshape(1, oc * phases, *spatial).astype(w.dtype))
        n = int(data.ty.shape[0])
        rows = plan.conv_rows()
        # [N, OC, s0, s1, Q0, Q1] -> [N, OC, Q0, s0, Q1, s1]: phase r of row q is pixel q * s + r.
        y = bb.emit(relax.op.reshape(y, [n, oc, *plan.strides, *rows]))
        y = relax.op.reshape(bb.emit(relax.op.permute_dims(
            y, [0, 1, *(v for a in range(plan.d) for v in (2 + plan.d + a, 2 + a))])),
            [n, oc, *(q * s for q, s in zip(rows, plan.strides))])
        if any(plan.crop) or [q * s for q, s in zip(rows, plan.strides)] != plan.out:
            y = relax.op.strided_slice(bb.emit(y), axes=list(range(2, 2 + plan.d)), begin=plan.crop,
                                       end=[c + t for c, t in zip(plan.crop, plan.out)])
        self.replace_chain(binding, chain, y)


@tvm.transform.module_pass(opt_level=0, name="ConvTransposeToConv")
class ConvTransposeToConv:
    """Rewrite transposed convolutions as stride-1 phase convolutions + depth-to-space."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Rewriter(mod).rewrite(mod)
