"""Float depthwise convs on maps shorter than their kernel, run over the kernel rows that reach
the map: a kernel hook of the CPU families.

A 5x5 depthwise conv with padding 2 on a 3-row map (text-line models: a 48-pixel line after
four stride-2 stages) multiplies 6 of each output row's 15 kernel rows with padding, 40 % of
its taps. ``DepthwiseRowWindow`` gives such a float ``conv2d`` (NCHW/OIHW or NHWC/HWIO, one
weight per channel) a kernel whose reduction runs ``row_window`` kernel rows from a first row
that depends on the output row (``conv_geometry.first_row``): 3 rows of 5 there, exact (the
rows it drops read only zeros). The int8 depthwise kernels do the same with their pair taps.
Where the window is the whole kernel (maps at least as tall as the kernel's reach) the conv
stays as it is.

Runs before legalization, after the channels-last rewrite (it keeps the layout it chose); the
kernel is plain TE, so the default CPU schedule and MetaSchedule schedule it as they would
the legalized conv. Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import static_shape

from .base import KernelHook
from .conv_geometry import conv_geometry, first_row, row_window

_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable
# data layout -> the weight layout it is rewritten with, and where H, W, C sit in the data
_LAYOUTS = {"NCHW": ("OIHW", (2, 3, 1)), "NHWC": ("HWIO", (1, 2, 3))}


def windowed_depthwise(x: te.Tensor, w: te.Tensor, strides, padding, dilation, layout: str) -> te.Tensor:
    """Depthwise conv of ``x`` (``layout``) with ``w`` ([C, 1, KH, KW] for NCHW, [KH, KW, 1, C]
    for NHWC) whose reduction runs the ``row_window`` kernel rows each output row reads."""
    hi, wi, ci = _LAYOUTS[layout][1]
    h, w_, c = (int(x.shape[i]) for i in (hi, wi, ci))
    kh, kw = (int(v) for v in (w.shape[2:] if layout == "NCHW" else w.shape[:2]))
    geometry = conv_geometry(h, w_, kh, kw, padding, strides, dilation)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = geometry
    before, after = [0] * 4, [0] * 4
    before[hi], before[wi], after[hi], after[wi] = pt, pl, pb, pr
    xpad = topi.nn.pad(x, before, after, name="pad_temp")
    window = row_window(h, kh, geometry)
    ry = te.reduce_axis((0, window), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def value(b, ch, y, xx):
        r = first_row(y, kh, window, geometry) + ry
        row, col = y * sh + r * dh, xx * sw + rx * dw
        if layout == "NCHW":
            return xpad[b, ch, row, col] * w[ch, 0, r, rx]
        return xpad[b, row, col, ch] * w[r, rx, 0, ch]

    n = int(x.shape[0])
    if layout == "NCHW":
        return te.compute((n, c, oh, ow), lambda b, ch, y, xx: te.sum(value(b, ch, y, xx), axis=[ry, rx]),
                          name="depthwise_conv2d")
    return te.compute((n, oh, ow, c), lambda b, y, xx, ch: te.sum(value(b, ch, y, xx), axis=[ry, rx]),
                      name="depthwise_conv2d")


def _window(call):
    """(layout, geometry args) of a float depthwise conv whose row window is shorter than its
    kernel, else None."""
    attrs = call.attrs
    layout = str(attrs.data_layout)
    if layout not in _LAYOUTS or str(attrs.kernel_layout) != _LAYOUTS[layout][0] \
            or str(attrs.out_layout) not in ("", layout) or call.ty.dtype != "float32":
        return None
    data, weight = call.args
    dims, wdims = static_shape(data), static_shape(weight)
    if dims is None or wdims is None or data.ty.dtype != "float32" or weight.ty.dtype != "float32":
        return None
    hi, wi, ci = _LAYOUTS[layout][1]
    kh, kw, per_group = (wdims[2], wdims[3], wdims[1]) if layout == "NCHW" else (wdims[0], wdims[1], wdims[2])
    out_channels = wdims[0] if layout == "NCHW" else wdims[3]
    if int(attrs.groups) != dims[ci] or per_group != 1 or out_channels != dims[ci]:
        return None
    strides, padding, dilation = ([int(v) for v in a] for a in (attrs.strides, attrs.padding, attrs.dilation))
    if row_window(dims[hi], kh, conv_geometry(dims[hi], dims[wi], kh, kw, padding, strides, dilation)) >= kh:
        return None
    return layout, (strides, padding, dilation)


@mutator
class _Window(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.windowed = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_CONV2D):
            return call
        found = _window(call)
        if found is None:
            return call
        layout, (strides, padding, dilation) = found
        self.windowed += 1
        return with_layer(self.builder_.call_te(
            windowed_depthwise, call.args[0], call.args[1], strides, padding, dilation, layout,
            primfunc_name_hint="depthwise_conv2d", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), call)


@tvm.transform.module_pass(opt_level=0, name="DepthwiseRowWindow")
class DepthwiseRowWindow:
    """Float depthwise ``conv2d`` calls on maps shorter than their kernel's reach -> a kernel
    over the kernel rows each output row reads (``windowed_depthwise``)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Window(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get() if rewriter.windowed else mod


class DepthwiseRowsKernels(KernelHook):
    """On unless a preset sets ``features.depthwise_rows = false``."""

    name = "depthwise_rows"
    feature = "depthwise_rows"
    default_on = True

    def rewrites(self, profile):
        return [DepthwiseRowWindow()]


DEPTHWISE_ROWS = DepthwiseRowsKernels()
