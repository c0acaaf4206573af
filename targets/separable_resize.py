"""Bilinear upsampling in two passes: the input's rows resized along their columns, then each
output row a blend of two of those rows. A kernel hook of the CPU families.

The legalized ``resize2d`` computes every output element from four input pixels whose column
it derives per element (a floor, a clamp and a load per lane of a vector: a gather), so a
segmentation head's 8x upsampling of 21 classes to 320x320 (LR-ASPP) took a third of the
model's time. Linear interpolation is separable: ``rows[r, x]`` blends the two input columns
of output column ``x`` for each of the ``H`` input rows (``H x OW`` gathers instead of ``4 x
OH x OW``), and ``out[y, x]`` blends rows ``rows[y0(y)]`` and ``rows[y0(y) + 1]`` with
contiguous vector loads. The arithmetic is TOPI's, in its order (``top`` and ``bottom`` are its
two row blends), so the result is bit-identical to the legalized op.

Needs: a float32 ``image.resize2d``, method ``linear``, layout ``NCHW`` (columns innermost,
where the gathers are; channels-last ones load whole channel vectors per pixel already),
coordinate modes ``half_pixel``, ``pytorch_half_pixel``, ``align_corners`` or
``asymmetric``, static shapes, output at least as tall as the input (shorter ones would blend
rows no output reads). Runs before legalization, after the channels-last rewrite. The row pass
stays a buffer of its own (``NO_INLINE_ATTR``, which MetaSchedule's inlining honours too);
both passes are plain TE for the default CPU schedule and MetaSchedule. Numbers:
docs/benchmarks.md.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.topi.image.resize import get_inx

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import static_shape

from .base import KernelHook
from .cpu_schedule import NO_INLINE_ATTR

_OP_RESIZE2D = tvm.ir.Op.get("relax.image.resize2d")
_INJECTIVE = 2  # relax.transform's OpPatternKind kInjective, as the legalized resize
_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def _source(v, size: int, out: int, mode: str):
    """(first input index, blend weight) of output index ``v``, as TOPI's linear resize."""
    f = get_inx(v, tirx.IntImm("int64", size), tirx.IntImm("int64", out), mode)
    i = te.floor(f).astype("int32")
    return i, f - i


def _clamp(i, size: int):
    return tirx.max(tirx.min(i, size - 1), 0)


def _lerp(a, b, t):
    return a * (1.0 - t) + b * t


def separable_resize2d(x: te.Tensor, out_h: int, out_w: int, mode: str) -> te.Tensor:
    """Bilinear NCHW resize of ``x`` to ``out_h`` x ``out_w``: a row pass, then a column one."""
    n, c, h, w = (int(d) for d in x.shape)

    def row(b, ch, r, col):
        i, t = _source(col, w, out_w, mode)
        return _lerp(x[b, ch, r, _clamp(i, w)], x[b, ch, r, _clamp(i + 1, w)], t)

    rows = te.compute((n, c, h, out_w), row, name="resize_rows", attrs={NO_INLINE_ATTR: "disable"})

    def value(b, ch, y, col):
        i, t = _source(y, h, out_h, mode)
        return _lerp(rows[b, ch, _clamp(i, h), col], rows[b, ch, _clamp(i + 1, h), col], t)

    return te.compute((n, c, out_h, out_w), value, name="resize")


def _rewritten(call):
    """(output height, width, mode) of a resize this pass gives the two-pass kernel, else None."""
    attrs = call.attrs
    dims, out = static_shape(call.args[0]), static_shape(call)
    if dims is None or out is None or len(dims) != 4 or call.args[0].ty.dtype != "float32" \
            or call.ty.dtype != "float32":
        return None
    mode = str(attrs.coordinate_transformation_mode)
    if str(attrs.method) != "linear" or str(attrs.layout) != "NCHW" or mode not in _MODES:
        return None
    if out[2] < dims[2] or (out[2], out[3]) == (dims[2], dims[3]):
        return None
    return out[2], out[3], mode


@mutator
class _Resize(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_RESIZE2D):
            return call
        found = _rewritten(call)
        if found is None:
            return call
        self.rewritten += 1
        return with_layer(self.builder_.call_te(
            separable_resize2d, call.args[0], *found,
            primfunc_name_hint="resize2d", primfunc_attrs={"op_pattern": _INJECTIVE}), call)


@tvm.transform.module_pass(opt_level=0, name="SeparableResize")
class SeparableResize:
    """Float bilinear NCHW ``image.resize2d`` calls that upsample -> ``separable_resize2d``."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Resize(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get() if rewriter.rewritten else mod


class SeparableResizeKernels(KernelHook):
    """On unless a preset sets ``features.separable_resize = false``."""

    name = "separable_resize"
    feature = "separable_resize"
    default_on = True

    def rewrites(self, profile):
        return [SeparableResize()]


SEPARABLE_RESIZE = SeparableResizeKernels()
