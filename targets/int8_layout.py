"""Int8ChannelsLast: realized int8 convolutions (and the requantize chains between them) -> NHWC.

Needs: realized int8 convolutions (``QuantizeRealize``), before ``PackInt8Conv``, which takes
them in either layout. Runs as the first rewrite of the int8 kernel hook.

In NCHW every packed int8 convolution starts by gathering its input's channel planes into
pixels of contiguous channels (the dot instructions reduce over channels), and its epilogue
scatters vectors of output channels back into planes. In NHWC a layer's output already is
the next layer's pixels: the pack is a contiguous copy (zero borders, int16 on ``pmaddwd``),
the epilogue stores whole channel vectors, and depthwise convolutions vectorize along
channels at any map size. Relax's ``ConvertLayout`` moves the element-wise requantize ops
with the convolutions; ``R.quantize`` has no layout rule, so per-tensor quantizations are
first spelled as the element-wise ops it legalizes to (same expression, same values), and
the weights' transposes are folded into constants for the packer. A flatten into a dense
layer reads the NHWC tensor with the dense weight's rows reordered (``_FlattenIntoWeights``),
and a transpose back to NCHW after an upsampling resize moves before it, as in ``ChannelsLast``.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.relax_utils import (
    bound_call, clip_bounds, const_value, copy_module, is_constant, scalar_value, static_shape, use_counts,
)

from .channels_last import (LAYOUT_ATTR, LAYOUTS, _BeforeConvertLayout, _calls, _CancelMoves, _FlattenIntoWeights,
                            _TransposeBeforeUpsample)

_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_OP_QUANTIZE = tvm.ir.Op.get("relax.quantize")
_OP_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
_OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def int8_convs(func: relax.Function, act_dtypes) -> list:
    """The NCHW conv2d calls with ``act_dtypes`` data, a constant int8 weight and int32 output."""
    return [c for c in _calls(func, _OP_CONV2D)
            if str(c.args[0].ty.dtype) in act_dtypes and is_constant(c.args[1])
            and str(c.args[1].ty.dtype) == "int8" and str(c.attrs.out_dtype) == "int32"
            and c.attrs.data_layout == "NCHW"]


_OP_GATE = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("multiply", "add", "clip", "minimum", "maximum")}


@mutator
class _SpellQuantize(PyExprMutator):
    """Per-tensor ``quantize(x, s, zp)`` -> ``astype(maximum(minimum(round(x * (1 / s)) + zp,
    max), min))`` and ``dequantize(q, s, zp)`` -> ``astype(astype(q, int32) - zp, float32) * s``: the
    expressions ``LegalizeOps`` gives them (but for the reciprocal), in ops ``ConvertLayout`` can
    move. A quantized hard-swish ``x * clip(x * a + b, 0, 1)`` (``HardSwishAsHardSigmoid``'s form)
    takes the reciprocal into its gate: ``x * clip(x * a/s + b/s, 0, 1/s)``, one multiply less per
    value in the epilogue; a feature map scaled by a per-channel gate (squeeze-excite) takes it
    into the gate: ``x * (g * (1/s))``, a multiply per channel instead of per value."""

    def __init__(self, uses=None):
        super().__init__()
        self.uses = uses or {}

    def _bound(self, expr, op):
        return bound_call(self, expr, _OP_GATE[op])

    def _gate(self, expr):
        """(z, lo, hi) of ``clip(z, lo, hi)`` in any of its spellings, else None."""
        clip = self._bound(expr, "clip")
        if clip is not None:
            return (clip.args[0], *clip_bounds(clip))
        for outer, inner in (("minimum", "maximum"), ("maximum", "minimum")):
            top = self._bound(expr, outer)
            low = self._bound(top.args[0], inner) if top is not None else None
            bounds = [scalar_value(v) for v in (low.args[1], top.args[1])] if low is not None else [None]
            if None not in bounds:
                lo, hi = sorted(float(v) for v in bounds)
                return low.args[0], lo, hi
        return None

    def _hard_swish(self, y):
        """(x, a, b) when ``y`` is ``x * clip(x * a + b, 0, 1)`` read by nothing else, else None."""
        product = self._bound(y, "multiply")
        if product is None or self.uses.get(y, 0) != 1:
            return None
        for x, gate in (product.args, product.args[::-1]):
            parts = self._gate(gate)
            if parts is None or parts[1:] != (0.0, 1.0):
                continue
            shift = self._bound(parts[0], "add")
            scale = self._bound(shift.args[0], "multiply") if shift is not None else None
            if scale is not None and scale.args[0].same_as(x):
                a, b = scalar_value(scale.args[1]), scalar_value(shift.args[1])
                if a is not None and b is not None:
                    return x, float(a), float(b)
        return None

    def _broadcast_product(self, y):
        """(large, small) factors of ``y = large * small`` read by nothing else, where ``small``
        has at most a quarter of ``y``'s elements (a squeeze-excite gate scaling a feature
        map), else None."""
        product = self._bound(y, "multiply")
        if product is None or self.uses.get(y, 0) != 1:
            return None
        sizes = [static_shape(a) for a in product.args]
        if None in sizes:
            return None
        large, small = sorted(zip(product.args, sizes), key=lambda a: -int(np.prod(a[1])))
        return (large[0], small[0]) if 4 * int(np.prod(small[1])) <= int(np.prod(large[1])) else None

    def _times(self, y, k: float, dtype: str):
        """``y * k``: through a hard-swish's gate (``k > 0``) or into the smaller factor of a
        broadcast product (``gate * k`` per channel instead of per pixel) where ``y`` is one."""
        bb = self.builder_
        hs = self._hard_swish(y) if k > 0 else None
        if hs is None:
            factors = self._broadcast_product(y)
            if factors is not None:
                large, small = factors
                return bb.emit(relax.op.multiply(large, bb.emit(relax.op.multiply(small, relax.const(k, dtype)))))
            return bb.emit(relax.op.multiply(y, relax.const(k, dtype)))
        x, a, b = hs
        z = bb.emit(relax.op.add(bb.emit(relax.op.multiply(x, relax.const(float(np.float32(a) * np.float32(k)), dtype))),
                                 relax.const(float(np.float32(b) * np.float32(k)), dtype)))
        return bb.emit(relax.op.multiply(x, bb.emit(relax.op.clip(z, 0.0, float(np.float32(k))))))

    def visit_call_(self, call):
        call = super().visit_call_(call)
        is_q, is_dq = call.op.same_as(_OP_QUANTIZE), call.op.same_as(_OP_DEQUANTIZE)
        if not (is_q or is_dq):
            return call
        scale, zero = scalar_value(call.args[1]), scalar_value(call.args[2])
        dtype, src = str(call.attrs.out_dtype), str(call.args[0].ty.dtype)
        bb = self.builder_
        if is_dq:
            if scale is None or zero is None or dtype != "float32" or "int" not in src:
                return call
            x = bb.emit(relax.op.subtract(bb.emit(relax.op.astype(call.args[0], "int32")),
                                          relax.const(int(zero), "int32")))
            return relax.op.multiply(bb.emit(relax.op.astype(x, "float32")), relax.const(float(scale), "float32"))
        if scale is None or zero is None or "int" not in dtype or src != "float32":
            return call
        # times the reciprocal: a vector divide costs as much as a 3x3 depthwise conv's taps
        # (onnxruntime's requantize multiplies too); off by one step only where x / s lies
        # within an ulp of a rounding boundary
        x = self._times(call.args[0], float(np.float32(1) / np.float32(scale)), src)
        x = bb.emit(relax.op.add(bb.emit(relax.op.round(x)), relax.const(float(zero), src)))
        info = np.iinfo(dtype)
        x = bb.emit(relax.op.minimum(x, relax.const(float(info.max), src)))
        x = bb.emit(relax.op.maximum(x, relax.const(float(info.min), src)))
        return relax.op.astype(x, dtype)


@mutator
class _FoldPermutedConstants(PyExprMutator):
    """``permute_dims(constant)`` -> the permuted constant (the HWIO weights, the per-channel
    scales as (1, 1, 1, C)), so the packer sees constant weights."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        args = [self._constant(a) for a in call.args]
        if any(a is not b for a, b in zip(args, call.args)):
            call = relax.Call(call.op, args, call.attrs, call.ty_args, call.span)
        if call.op.same_as(_OP_PERMUTE) and is_constant(call.args[0]):
            value = const_value(call.args[0])
            axes = list(range(value.ndim))[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            return relax.const(np.ascontiguousarray(value.transpose(axes)))
        return call

    def _constant(self, expr):
        """A variable bound to a constant (a folded transpose) -> the constant."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return value if value is not None and is_constant(value) else expr


@tvm.transform.module_pass(opt_level=0, name="Int8ChannelsLast")
class Int8ChannelsLast:
    """Functions with int8 convolutions the packed kernels take (``act_dtypes`` data) -> NHWC
    convolutions, HWIO weights, element-wise chains between them in NHWC. What it did: module
    attribute ``LAYOUT_ATTR`` (``{"layout": "NHWC", "int8": true, "nhwc_convs": n, ...}``)."""

    def __init__(self, act_dtypes):
        self.act_dtypes = tuple(act_dtypes)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = [gv for gv, f in mod.functions_items()
                 if isinstance(f, relax.Function) and int8_convs(f, self.act_dtypes)]
        if not names:
            return mod
        try:
            converted = copy_module(mod)
            for gv in names:
                spelled = _SpellQuantize(use_counts(converted[gv])).visit_expr(converted[gv])
                converted[gv] = _BeforeConvertLayout().visit_expr(spelled)
            converted = relax.transform.ConvertLayout(LAYOUTS)(relax.transform.Normalize()(converted))
            out = copy_module(mod)
            for gv in names:
                func = _FoldPermutedConstants().visit_expr(converted[gv])
                func = _TransposeBeforeUpsample(tvm.IRModule({gv: func})).visit_expr(func)
                func = _CancelMoves(tvm.IRModule({gv: func})).visit_expr(func)
                # A flatten into a dense layer reads the NHWC tensor, the weight's rows reordered.
                func = _FlattenIntoWeights(tvm.IRModule({gv: func})).visit_expr(func)
                out[gv] = relax.analysis.remove_all_unused(func)
            out = relax.transform.Normalize()(out)
        except Exception as err:  # noqa: BLE001  (an op ConvertLayout cannot move: stays NCHW)
            return mod.with_attr(LAYOUT_ATTR, json.dumps(
                {"layout": "NCHW", "int8": True, "reason": f"int8 channels-last rewrite failed ({type(err).__name__})"}))
        convs = [c for gv in names for c in _calls(out[gv], _OP_CONV2D)]
        transposes = sum(len(_calls(out[gv], _OP_PERMUTE)) for gv in names)
        info = {"layout": "NHWC", "int8": True,
                "nhwc_convs": sum(c.attrs.data_layout == "NHWC" for c in convs),
                "nchw_convs": sum(c.attrs.data_layout == "NCHW" for c in convs),
                "transposes": transposes,
                "reason": f"int8: activations stay channels-last between layers ({transposes} "
                          f"transpose{'' if transposes == 1 else 's'} left)"}
        return out.with_attr(LAYOUT_ATTR, json.dumps(info))


