"""Float depthwise convs in a kernel of their own: channels-last ones read their padding inline,
and those on maps shorter than their kernel run only the kernel rows that reach the map. A
kernel hook of the CPU families.

- **Padding read inline** (NHWC): the legalized conv pads its input in a pass of its own (a
  buffer the size of the padded map, written then read again; per chunk of output rows only
  on tall maps), as much time as the taps themselves on 3x3 kernels of 56-112 row maps. With
  channels innermost, whether a tap reads padding is the same for every lane of a channel
  vector, so the kernel tests it per tap (a branch on scalars) and reads the map directly:
  stride-2 and 5x5 kernels 1.3-1.7x faster, 3x3 stride-1 ones 1.0-1.4x (``x86-avx2``).
  NCHW kernels keep the pad (vectors along columns: the test would differ per lane).
- **Row windows**: a 5x5 depthwise conv with padding 2 on a 3-row map (text-line models: a
  48-pixel line after four stride-2 stages) multiplies 6 of each output row's 15 kernel rows
  with padding, 40 % of its taps. The kernel's reduction runs ``row_window`` kernel rows from
  a first row that depends on the output row (``conv_geometry.first_row``): 3 rows of 5 there,
  exact (the rows it drops read only zeros). The int8 depthwise kernels do the same with their
  pair taps.

Needs: a float32 ``conv2d`` with one weight per channel (groups = channels, NCHW/OIHW or
NHWC/HWIO), static shapes. Runs before legalization, after the channels-last rewrite (it keeps
the layout that chose); the kernel is plain TE, so the default CPU schedule and MetaSchedule
schedule it as they would the legalized conv. Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import static_shape

from .base import KernelHook
from .conv_geometry import conv_geometry, first_row, row_window

_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable
# data layout -> the weight layout it is rewritten with, and where H, W, C sit in the data
_LAYOUTS = {"NCHW": ("OIHW", (2, 3, 1)), "NHWC": ("HWIO", (1, 2, 3))}


def depthwise_conv2d(x: te.Tensor, w: te.Tensor, strides, padding, dilation, layout: str) -> te.Tensor:
    """Depthwise conv of ``x`` (``layout``) with ``w`` ([C, 1, KH, KW] for NCHW, [KH, KW, 1, C]
    for NHWC): the ``row_window`` kernel rows each output row reads; NHWC testing each tap for
    padding instead of reading a padded copy."""
    hi, wi, ci = _LAYOUTS[layout][1]
    h, w_, c = (int(x.shape[i]) for i in (hi, wi, ci))
    kh, kw = (int(v) for v in (w.shape[2:] if layout == "NCHW" else w.shape[:2]))
    geometry = conv_geometry(h, w_, kh, kw, padding, strides, dilation)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = geometry
    if layout == "NCHW":
        before, after = [0] * 4, [0] * 4
        before[hi], before[wi], after[hi], after[wi] = pt, pl, pb, pr
        xpad = topi.nn.pad(x, before, after, name="pad_temp")

        def read(b, ch, row, col):
            return xpad[b, ch, row, col]
    else:
        def read(b, ch, row, col):  # row and col in padded coordinates
            iy, ix = row - pt, col - pl
            return tirx.if_then_else(tirx.all(iy >= 0, iy < h, ix >= 0, ix < w_), x[b, iy, ix, ch],
                                     tirx.const(0.0, x.dtype))
    window = row_window(h, kh, geometry)
    ry = te.reduce_axis((0, window), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def value(b, ch, y, xx):
        r = first_row(y, kh, window, geometry) + ry
        tap = w[ch, 0, r, rx] if layout == "NCHW" else w[r, rx, 0, ch]
        return read(b, ch, y * sh + r * dh, xx * sw + rx * dw) * tap

    n = int(x.shape[0])
    if layout == "NCHW":
        return te.compute((n, c, oh, ow), lambda b, ch, y, xx: te.sum(value(b, ch, y, xx), axis=[ry, rx]),
                          name="depthwise_conv2d")
    return te.compute((n, oh, ow, c), lambda b, y, xx, ch: te.sum(value(b, ch, y, xx), axis=[ry, rx]),
                      name="depthwise_conv2d")


def _rewritten(call):
    """(layout, geometry args) of a float depthwise conv this pass gives a kernel (NHWC with
    padding, or a row window shorter than the kernel), else None."""
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
    windowed = row_window(dims[hi], kh, conv_geometry(dims[hi], dims[wi], kh, kw, padding, strides, dilation)) < kh
    if not windowed and not (layout == "NHWC" and any(padding)):
        return None
    return layout, (strides, padding, dilation)


@mutator
class _Depthwise(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_CONV2D):
            return call
        found = _rewritten(call)
        if found is None:
            return call
        layout, (strides, padding, dilation) = found
        self.rewritten += 1
        return with_layer(self.builder_.call_te(
            depthwise_conv2d, call.args[0], call.args[1], strides, padding, dilation, layout,
            primfunc_name_hint="depthwise_conv2d", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), call)


@tvm.transform.module_pass(opt_level=0, name="FloatDepthwise")
class FloatDepthwise:
    """Float depthwise ``conv2d`` calls that are channels-last with padding, or on maps shorter
    than their kernel's reach -> ``depthwise_conv2d``'s kernel."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Depthwise(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get() if rewriter.rewritten else mod


class FloatDepthwiseKernels(KernelHook):
    """On unless a preset sets ``features.float_depthwise = false``."""

    name = "float_depthwise"
    feature = "float_depthwise"
    default_on = True

    def rewrites(self, profile):
        return [FloatDepthwise()]


FLOAT_DEPTHWISE = FloatDepthwiseKernels()
