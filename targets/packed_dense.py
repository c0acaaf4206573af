"""Float dense layers and channels-last convs with their constant weight packed in column
panels: a kernel hook of the CPU families.

A matmul's weight ``[K, N]`` is row-major: the CPU kernels' register tile reads one vector of
``P`` columns per reduction step, ``N * 4`` bytes after the previous one (6 KB for a ViT-S MLP's
1536 columns), so every step touches a new cache line and page, and the prefetcher follows
``K`` interleaved streams. ``PackedDense`` stores such weights as panels ``[N / P, K, P]``,
``P`` being the tile's vector width (``cpu_schedule.vector_width``): a tile reads its panel
front to back, as onnxruntime's MLAS and XNNPACK pack theirs. Offline, so the stored bytes are
the same; the kernel is a TE ``call_tir`` marked out-element-wise fusable, so bias, activation
and slice epilogues still fuse into it, and MetaSchedule tunes it like any matmul.

A 1x1, unpadded, ungrouped channels-last conv is the same product over the map's pixels: it
runs as this kernel on the map flattened to ``[N, H * W, C]`` (a reshape: a view, no copy; a
strided conv on the pixels it reads, taken by a strided slice first), so
that the tile's rows run across the map's lines (on a 14-pixel line they were 2 rows), with its
element-wise epilogue moved to the flat side so that it still fuses, and consecutive such convs
exchange the flat map without reshaping between them. A row count whose divisors give no
register tile but one row (a 13x13 map's 169 pixels; a 7x7 map's 49 where the tile holds at
most 6 rows) runs on a few more rows inside the kernel (``cpu_schedule.dense_rows``: where the
tile estimate gains), the extra rows repeating the last one and dropped before the epilogue's
store: one-row tiles read every weight vector once per pixel (YOLOX's 13x13 convs 1.75x,
ResNet-50's 7x7 1x1 convs 1.9x faster padded).

Every other ungrouped channels-last conv (3x3, padded, dilated) keeps its own kernel but
reads its weight as panels ``[O / P, KH, KW, I, P]`` instead of HWIO: a tile's slice of an
HWIO weight is ``KH * KW * I`` runs of ``P`` floats ``O * 4`` bytes apart, a stride that maps
them onto a few cache sets when ``O`` is 256 or 384, so the slice fell out of L2 (3x3 convs
with 256-512 channels 1.7-2.4x faster in panels, narrower ones unchanged).

Such a conv whose outputs near the borders read padding with whole kernel rows or columns,
for most of its work (an atrous conv on a small map: DeepLabV3's rate-12 ASPP conv on 20x20
reads the map with 36 % of its products; ``DropPaddingTaps`` already dropped the taps that
read padding for every output), runs by regions instead: one kernel per pair of row and
column bands with the taps that read the map and no padding, every region reading the one
packed weight (stored once), the bands concatenated (that rate-12 conv 8.1 -> 2.7 ms).

Such a conv followed by a max pool of kh x kw windows at a stride of the window, through
element-wise ops that never decrease (bias, ReLU, leaky ReLU, PReLU, clip, positive scales), takes
the pool into its kernel: the conv's rows grouped by window, their maximum, then those ops on
the pooled map (a max commutes with them, exactly), scheduled per pooled row
(``cpu_schedule.CPUFallback._schedule_pooled``). The pool is no kernel of its own and the
conv's output never goes to memory whole (the demo model 0.94x -> 0.81x onnxruntime's time).
Not where the pooled rows split unevenly over the cores.

Needs a float32 ``matmul`` whose second operand is a constant 2-D weight (or its transpose: a
Gemm with ``transB`` imported without ``fold``), or an ungrouped NHWC/HWIO ``conv2d`` with a
constant (or permuted constant) weight. Runs before legalization, after ``ChannelsLast`` (which
decides the convs' layout) and ``PadDenseColumns`` (which pads the constant's columns to whole
registers first). Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, te, topi

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import (ELEMENTWISE_OPS, bound_call, const, const_value, is_constant, permuted_constant,
                                      static_shape, use_counts)

from .base import KernelHook
from .conv_geometry import conv_geometry, tap_bands
from .cpu_schedule import POOL_ATTR, TILE_SCOPE_ATTR, dense_rows, target_cores, vector_width
from .packed_conv3d import frame_bands, pack_conv3d_weight, packed_conv3d_ndhwc
from .pooled_conv import epilogue_chain

_OP_MATMUL = tvm.ir.Op.get("relax.matmul")
_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_OP_CONV3D = tvm.ir.Op.get("relax.nn.conv3d")
_OP_RESHAPE = tvm.ir.Op.get("relax.reshape")
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable
_OP_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")
_OP_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
# Ops a max pool commutes with, exactly: f non-decreasing gives max(f(a), f(b)) = f(max(a, b)),
# and rounding keeps that (fl(a + c) never decreases as a grows). Multiply and divide only by
# constants > 0, subtract and divide only with the pooled value first, leaky relu with a slope
# >= 0, PReLU with constant slopes >= 0 (MTCNN's conv -> PReLU -> max pool) (``_monotone``).
_MONOTONE = {tvm.ir.Op.get(f"relax.{n}"): n for n in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "clip", "nn.relu", "nn.leakyrelu",
    "nn.prelu")}
# Rows of pooled output the cores must split about evenly for a conv to take its pool: on
# fewer, uneven rows (3 on two cores) the pool's kernel of its own measured faster.
_POOL_BALANCE = 1.15
# A conv computed by regions (``tap_bands``): each region is a kernel of its own and the bands
# a concat, so only where it saves at least this share of at least this many multiply-adds,
# in at most this many regions.
_REGION_MIN_MACS = 1 << 24
_REGION_MIN_SAVED = 0.3
_REGION_MAX = 9
# A conv3d runs by bands of output frames (``packed_conv3d``) where that skips at least this many
# multiply-adds per output element that read padding frames: about what writing the bands and
# reading them back for their concat costs (ResNet3D-18's stem, 37 saved, ran no faster so).
_BAND_MIN_SAVED = 64


def pack_weight(weight: np.ndarray, panel: int) -> np.ndarray:
    """``[K, N]`` -> ``[N / panel, K, panel]``: column panels, each contiguous."""
    inner, columns = weight.shape
    return np.ascontiguousarray(weight.reshape(inner, columns // panel, panel).transpose(1, 0, 2))


def panel_width(columns: int, lanes: int):
    """Columns per panel for a weight of ``columns`` on ``lanes`` float32 lanes (the CPU tile's
    vector width); None where the weight stays as it is (no width, or a single panel)."""
    panel = vector_width(columns, lanes)
    return None if panel is None or panel == columns else panel


def pack_conv_weight(weight: np.ndarray, panel: int) -> np.ndarray:
    """HWIO ``[KH, KW, I, O]`` -> ``[O / panel, KH, KW, I, panel]``: column panels, each
    contiguous."""
    kh, kw, ci, co = weight.shape
    return np.ascontiguousarray(weight.reshape(kh, kw, ci, co // panel, panel).transpose(3, 0, 1, 2, 4))


def packed_dense(data: te.Tensor, panels: te.Tensor, padded_rows: int = 0) -> te.Tensor:
    """``data [..., M, K] x weight [K, N]`` from the packed weight ``[N / P, K, P]``.
    ``padded_rows`` > M: the product runs on that many rows (the rows past M repeat the last
    one) and the kernel keeps the first M."""
    _, inner, panel = (int(d) for d in panels.shape)
    columns = int(panels.shape[0]) * panel
    k = te.reduce_axis((0, inner), name="k")
    *outer, rows, _ = (int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in data.shape)
    pad = isinstance(rows, int) and padded_rows > rows

    def body(*idx):
        j = idx[-1]
        row = tvm.tirx.min(idx[-2], rows - 1) if pad else idx[-2]
        return te.sum(data[(*idx[:-2], row, k)] * panels[j // panel, k, j % panel], axis=k)

    # Its register tile on the stack (see TILE_SCOPE_ATTR): these kernels 1.05-1.64x faster.
    attrs = {TILE_SCOPE_ATTR: "global"}
    if not pad:
        return te.compute((*data.shape[:-1], columns), body, name="packed_dense", attrs=attrs)
    acc = te.compute((*outer, padded_rows, columns), body, name="packed_dense", attrs=attrs)
    return te.compute((*outer, rows, columns), lambda *idx: acc[idx], name="packed_dense_rows")


def packed_conv2d_nhwc(data: te.Tensor, panels: te.Tensor, strides, padding, dilation, pool=0) -> te.Tensor:
    """NHWC ``data`` x the weight packed ``[O / P, KH, KW, I, P]`` -> NHWC; ``padding`` (top,
    left, bottom, right) as a pad stage of its own, as TOPI's ``conv2d_nhwc`` has it.
    ``pool`` (``k`` or ``(kh, kw)``, more than one element): then a max pool of such windows,
    stride the window, on the rows and columns its windows cover, the conv's rows grouped by
    window (``POOL_ATTR``)."""
    n, h, w, ci = (int(d) for d in data.shape)
    blocks, kh, kw, _, panel = (int(d) for d in panels.shape)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, padding, strides, dilation)
    if pt or pl or pb or pr:
        data = topi.nn.pad(data, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, ci), name="rc")

    def product(b, y, x, o):
        return te.sum(data[b, y * sh + ry * dh, x * sw + rx * dw, rc] * panels[o // panel, ry, rx, rc, o % panel],
                      axis=[ry, rx, rc])

    py, px = (pool, pool) if isinstance(pool, int) else pool
    if py * px <= 1:
        return te.compute((n, oh, ow, blocks * panel), product, name="packed_conv2d")
    ph, pw = oh // py, ow // px
    conv = te.compute((n, ph, py, pw * px, blocks * panel), lambda b, y, dy, x, o: product(b, y * py + dy, x, o),
                      name="packed_conv2d", attrs={POOL_ATTR: py * px})

    def window_max(b, y, x, o):
        values = [conv[b, y, dy, x * px + dx, o] for dy in range(py) for dx in range(px)]
        return functools.reduce(tvm.tirx.max, values)

    return te.compute((n, ph, pw, blocks * panel), window_max, name="max_pool")


def packed_conv2d_region(data: te.Tensor, panels: te.Tensor, strides, dilation, region) -> te.Tensor:
    """One region of an NHWC conv with its weight in panels: ``region`` = (first input row and
    column read, output rows and columns, first kernel row, kernel rows, first kernel column,
    kernel columns). Only those taps, all on the map: no padding."""
    n, _, _, ci = (int(d) for d in data.shape)
    blocks, panel = int(panels.shape[0]), int(panels.shape[4])
    (y0, x0, oh, ow, ty, kh, tx, kw), (sh, sw), (dh, dw) = region, strides, dilation
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, ci), name="rc")
    return te.compute(
        (n, oh, ow, blocks * panel),
        lambda b, y, x, o: te.sum(data[b, y0 + y * sh + ry * dh, x0 + x * sw + rx * dw, rc]
                                  * panels[o // panel, ty + ry, tx + rx, rc, o % panel], axis=[ry, rx, rc]),
        name="packed_conv2d")


@relax.expr_functor.mutator
class _Pack(relax.expr_functor.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.packed = 0
        self.uses: dict = {}
        self.panel_convs: dict = {}
        self.replaced: list = []

    def _flat_source(self, expr, shape):
        """The ``[..., P, C]`` tensor ``expr`` (of ``shape``) was reshaped from by a flattened
        conv or its epilogue, else None."""
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not (isinstance(bound, relax.Call) and bound.op.same_as(_OP_RESHAPE)):
            return None
        src = static_shape(bound.args[0])
        if src is None or len(src) >= len(shape) or src[-1] != shape[-1] or src[:-2] != shape[:len(src) - 2] \
                or src[-2] != int(np.prod(shape[len(src) - 2:-1])):
            return None
        return bound.args[0]

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_OP_MATMUL):
            return self._matmul(call)
        if call.op.same_as(_OP_CONV2D):
            return self._conv(call)
        if call.op.same_as(_OP_CONV3D):
            return self._conv3d(call)
        if call.op.same_as(_OP_MAX_POOL):
            return self._pooled(call)
        if any(call.op.same_as(op) for op in ELEMENTWISE_OPS):
            return self._flat_epilogue(call)
        return call

    def _packed(self, data, weight, layer, whole: bool = False):
        """``data [..., K] x weight [K, N]`` with the weight in panels; None where one panel
        would hold every column, unless ``whole`` (then one panel: the weight as it is)."""
        panel = panel_width(weight.shape[1], self.lanes)
        if panel is None and whole:
            panel = weight.shape[1]
        if panel is None:
            return None
        self.packed += 1
        dims = static_shape(data)
        rows = dense_rows(dims[-2], weight.shape[1], self.lanes) if dims is not None and len(dims) >= 2 else 0
        out = self.builder_.call_te(packed_dense, data, const(pack_weight(weight, panel)), rows,
                                    primfunc_name_hint="packed_dense",
                                    primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE})
        return with_layer(out, layer)

    def _matmul(self, call):
        weight = permuted_constant(self, call.args[1])
        data = call.args[0]
        if weight is None or call.ty.dtype != "float32":
            return call
        if weight.ndim != 2 or weight.dtype != np.float32 or getattr(data.ty, "ndim", 0) < 2 \
                or data.ty.dtype != "float32":
            return call
        out = self._packed(data, weight, call)
        return call if out is None else out

    def _conv(self, call):
        """An ungrouped channels-last float conv with a constant weight: an unpadded 1x1 one
        (any stride) as a dense layer over its map (``_conv1x1``), any other with its weight in
        panels (``_conv_panels``)."""
        attrs = call.attrs
        shape = static_shape(call)
        data = call.args[0]
        if shape is None or static_shape(data) is None or call.ty.dtype != "float32" \
                or data.ty.dtype != "float32" or attrs.data_layout != "NHWC" \
                or attrs.kernel_layout != "HWIO" or str(attrs.out_layout) not in ("", "NHWC") \
                or int(attrs.groups) != 1:
            return call
        weight = permuted_constant(self, call.args[1])
        if weight is None or weight.dtype != np.float32:
            return call
        if weight.shape[:2] == (1, 1) and all(int(v) == 0 for v in attrs.padding):
            return self._conv1x1(call, weight)
        return self._conv_panels(call, weight)

    def _conv_panels(self, call, weight):
        """Any other conv reads its HWIO weight ``[KH, KW, I, O]`` as panels ``[O / P, KH, KW,
        I, P]``: a tile's weight slice is then contiguous. As HWIO the slice is ``KH * KW * I``
        runs of ``P`` floats, ``O * 4`` bytes apart: with ``O`` = 384 that stride maps every run
        to the same few cache sets, the slice (110 KB) no longer stays in L2, and a 13x13
        192 -> 384 3x3 conv ran at 51 GMAC/s against 78 for 192 -> 192."""
        panel = panel_width(weight.shape[3], self.lanes)
        if panel is None:
            return call  # one panel: the slice is contiguous already
        attrs = call.attrs
        self.packed += 1
        geometry = ([int(v) for v in attrs.strides], [int(v) for v in attrs.padding], [int(v) for v in attrs.dilation])
        regions = self._regions(call, weight, panel, geometry)
        if regions is not None:
            return regions
        out = with_layer(self.builder_.call_te(
            packed_conv2d_nhwc, call.args[0], const(pack_conv_weight(weight, panel)), *geometry,
            primfunc_name_hint="packed_conv2d", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), call)
        # A pool after it may take it over (``_pooled``): known by its kernel's GlobalVar.
        self.panel_convs[out.args[0]] = (call.args[0], weight, geometry, call)
        return out

    def _regions(self, call, weight, panel, geometry):
        """The conv by regions where its outputs near the borders read padding with whole
        kernel rows or columns (an atrous conv on a small map: DeepLabV3's rate-12 conv on
        20x20 reads the map with 36 % of its products): one kernel per pair of row and column
        bands over the taps that read the map, the bands concatenated. The regions share the
        one packed weight. None where that does not pay (``_REGION_*``)."""
        (sh, sw), (top, left, _, _), (dh, dw) = geometry
        _, h, w, _ = static_shape(call.args[0])
        _, oh, ow, co = static_shape(call)
        kh, kw, ci, _ = weight.shape
        rows = tap_bands(h, kh, top, sh, dh, oh)
        cols = tap_bands(w, kw, left, sw, dw, ow)
        if rows is None or cols is None or not 1 < len(rows) * len(cols) <= _REGION_MAX:
            return None
        full = oh * ow * kh * kw
        kept = sum((r1 - r0) * (rb - ra + 1) * (c1 - c0) * (cb - ca + 1)
                   for r0, r1, ra, rb in rows for c0, c1, ca, cb in cols)
        if full * ci * co < _REGION_MIN_MACS or kept > (1 - _REGION_MIN_SAVED) * full:
            return None
        panels = const(pack_conv_weight(weight, panel))
        stripes = []
        for r0, r1, ra, rb in rows:
            pieces = []
            for c0, c1, ca, cb in cols:
                region = (r0 * sh + ra * dh - top, c0 * sw + ca * dw - left, r1 - r0, c1 - c0,
                          ra, rb - ra + 1, ca, cb - ca + 1)
                pieces.append(self.builder_.emit(with_layer(self.builder_.call_te(
                    packed_conv2d_region, call.args[0], panels, (sh, sw), (dh, dw), region,
                    primfunc_name_hint="packed_conv2d", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), call)))
            stripes.append(pieces[0] if len(pieces) == 1 else self.builder_.emit(relax.op.concat(pieces, axis=2)))
        return stripes[0] if len(stripes) == 1 else relax.op.concat(stripes, axis=1)

    def _pooled_source(self, value):
        """(data, HWIO weight, (strides, padding, dilation), the conv call naming the layer) of
        a channels-last float conv ``value`` as this pass leaves it (a plain conv, or its
        kernel on the weight in panels), else None."""
        if value.op.same_as(_OP_CONV2D):
            attrs = value.attrs
            if attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or int(attrs.groups) != 1 \
                    or str(attrs.out_layout) not in ("", "NHWC") or value.ty.dtype != "float32" \
                    or value.args[0].ty.dtype != "float32":
                return None
            weight = permuted_constant(self, value.args[1])
            if weight is None or weight.dtype != np.float32 or static_shape(value.args[0]) is None:
                return None
            return value.args[0], weight, ([int(v) for v in attrs.strides], [int(v) for v in attrs.padding],
                                           [int(v) for v in attrs.dilation]), value
        return self.panel_convs.get(value.args[0]) if value.op.same_as(_OP_CALL_TIR) else None

    def _pooled(self, call):
        """``max_pool2d(f(conv))`` with windows of ``kh`` x ``kw``, stride the window, and ``f``
        element-wise and non-decreasing (bias, ReLU, clip) -> ``f(conv with its pool)``: one
        kernel computing, per row of pooled output, the conv rows its windows read, their
        maximum, and ``f`` on a quarter of the values (2 x 2). Exact: a max commutes with
        non-decreasing functions."""
        attrs = call.attrs
        shape, out = static_shape(call.args[0]), static_shape(call)
        k = [int(v) for v in attrs.pool_size]
        if shape is None or out is None or len(shape) != 4 or str(attrs.layout) != "NHWC" \
                or str(attrs.out_layout or "NHWC") != "NHWC" or k[0] * k[1] < 2 \
                or [int(v) for v in attrs.strides] != k or any(int(v) != 1 for v in attrs.dilation) \
                or any(int(v) for v in attrs.padding) or attrs.ceil_mode:
            return call
        rows, cores = out[0] * out[1], target_cores()
        if -(-rows // cores) * cores > _POOL_BALANCE * rows:
            return call
        chain = epilogue_chain(self.lookup_binding, self.uses, call.args[0], (1, 2), self._monotone,
                               lambda value: self._pooled_source(value) is not None)
        if chain is None:
            return call
        root = chain[0][0]
        data, weight, (strides, padding, dilation), layer = self._pooled_source(root)
        if root.op.same_as(_OP_CALL_TIR):
            self.replaced.append(root.args[0])
        panel = panel_width(weight.shape[3], self.lanes) or weight.shape[3]
        self.packed += 1
        value = with_layer(self.builder_.call_te(
            packed_conv2d_nhwc, data, const(pack_conv_weight(weight, panel)), strides, padding, dilation, k,
            primfunc_name_hint="packed_conv2d", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), layer)
        for op, at in chain[1:]:
            args = list(op.args)
            args[at] = self.builder_.emit(value)
            value = relax.Call(op.op, args, op.attrs, op.ty_args)
        return value

    def _monotone(self, op, at: int) -> bool:
        """Whether ``op`` never decreases as its operand ``at`` grows (``_MONOTONE``)."""
        name = next((n for o, n in _MONOTONE.items() if op.op.same_as(o)), None)
        if name is None or (name in ("subtract", "divide") and at != 0):
            return False
        if name in ("multiply", "divide", "nn.prelu"):
            other = self._constant_operand(op.args[1 - at])
            if other is None or (name == "nn.prelu" and at != 0):
                return False
            return bool(np.all(other > 0)) if name != "nn.prelu" else bool(np.all(other >= 0))
        if name == "nn.leakyrelu":
            return float(op.attrs.alpha) >= 0
        return True

    def _constant_operand(self, expr) -> "np.ndarray | None":
        """``expr``'s value when it is a constant, or a reshape of one (the importer reshapes
        PReLU's ``(C, 1, 1)`` slopes to ``(C,)``), else None."""
        if is_constant(expr):
            return const_value(expr)
        bound = bound_call(self, expr, _OP_RESHAPE)
        return const_value(bound.args[0]) if bound is not None and is_constant(bound.args[0]) else None

    def _conv1x1(self, call, weight):
        """A 1x1, unpadded, ungrouped channels-last conv is a dense layer over the map's pixels:
        flattened to ``[N, H * W, C]`` so that the tile's rows run across the map's lines (a
        14-pixel line gave tiles of 2 rows), reshaped back after it (a view, no copy); its
        element-wise epilogue moves to the flat side with it (``_flat_epilogue``) and fuses.
        The weight goes in panels too; one panel where the columns fit one tile row. A strided
        one takes its pixels with a strided slice first (a copy of the pixels it reads: a
        ResNet-50 downsample conv to 7x7 ran in tiles of a 7-pixel line at 47 GMAC/s). A
        1x1x1 conv3d likewise, over its frames' pixels."""
        shape = static_shape(call)
        data = call.args[0]
        n, *pixels, _ = shape
        if int(np.prod(pixels)) == 1:
            return call  # one pixel (squeeze-excite): nothing to tile; its broadcast epilogue fuses
        strides = [int(v) for v in call.attrs.strides]
        if any(s != 1 for s in strides):
            dims = static_shape(data)[1:-1]
            data = self.builder_.emit(relax.op.strided_slice(data, axes=list(range(1, len(dims) + 1)),
                                                             begin=[0] * len(dims), end=dims, strides=strides))
        in_shape = static_shape(data)
        flat = self._flat_source(data, in_shape)
        if flat is None:
            flat = self.builder_.emit(relax.op.reshape(data, [n, int(np.prod(pixels)), in_shape[-1]]))
        out = self._packed(flat, np.ascontiguousarray(weight.reshape(weight.shape[-2:])), call, whole=True)
        return relax.op.reshape(self.builder_.emit(out), shape)

    def _conv3d(self, call):
        """An ungrouped channels-last float conv3d with a constant weight: an unpadded 1x1x1 one
        as a dense layer (``_conv1x1``), any other on its weight in panels, by bands of output
        frames over the kernel frames that read no padding (``packed_conv3d``), where that
        skips ``_BAND_MIN_SAVED`` products per output or leaves one band."""
        attrs = call.attrs
        shape, in_shape = static_shape(call), static_shape(call.args[0])
        if shape is None or in_shape is None or call.ty.dtype != "float32" \
                or call.args[0].ty.dtype != "float32" or attrs.data_layout != "NDHWC" \
                or attrs.kernel_layout != "DHWIO" or str(attrs.out_layout) not in ("", "NDHWC") \
                or int(attrs.groups) != 1:
            return call
        weight = permuted_constant(self, call.args[1])
        if weight is None or weight.dtype != np.float32:
            return call
        padding = [int(v) for v in attrs.padding]
        if weight.shape[:3] == (1, 1, 1) and not any(padding):
            return self._conv1x1(call, weight)
        kt, kh, kw, ci, co = weight.shape
        panel = panel_width(co, self.lanes) or (co if vector_width(co, self.lanes) == co else None)
        if panel is None:
            return call  # no vector width divides the channels (921): TOPI's conv3d, as a conv2d keeps its own
        strides, dilation = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
        bands = frame_bands(in_shape[1], kt, padding[0], padding[3], strides[0], dilation[0])
        if bands is not None and len(bands) > 1:
            saved = (kt * shape[1] - sum(count * taps for _, count, _, taps in bands)) * kh * kw * ci
            if saved < _BAND_MIN_SAVED * shape[1]:
                bands = None
        self.packed += 1
        panels = const(pack_conv3d_weight(weight, panel))
        pieces = [self.builder_.call_te(packed_conv3d_ndhwc, call.args[0], panels, strides, padding, dilation, band,
                                        primfunc_name_hint="packed_conv3d",
                                        primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE})
                  for band in (bands or [None])]
        if len(pieces) == 1:
            return with_layer(pieces[0], call)
        return relax.op.concat([self.builder_.emit(with_layer(p, call)) for p in pieces], axis=1)

    def _flat_operand(self, arg, shape, flat_shape):
        """Operand ``arg`` of an element-wise op of ``shape`` for the same op on ``flat_shape``;
        None where it varies along an axis the flattening merged."""
        if not isinstance(getattr(arg, "ty", None), relax.TensorType):
            return arg
        arg_shape = static_shape(arg)
        if arg_shape is None:
            return None
        source = self._flat_source(arg, shape)
        if source is not None:
            return source
        if arg_shape == shape:
            return self.builder_.emit(relax.op.reshape(arg, flat_shape))
        if len(arg_shape) <= 1:
            return arg
        if len(arg_shape) <= len(shape) and all(d == 1 for d in arg_shape[:-1]):
            channels = [1] * (len(flat_shape) - 1) + arg_shape[-1:]
            if is_constant(arg):
                return const(const_value(arg).reshape(channels))
            return self.builder_.emit(relax.op.reshape(arg, channels))
        return None

    def _flat_epilogue(self, call):
        """``op(reshape(flat), c)`` -> ``reshape(op(flat, c'))`` where ``flat`` is a flattened
        conv's output and every other operand is of the same shape, a scalar, or varies along
        the channels only (a bias): FuseOps fuses the op into the conv's kernel, which it
        would not across the reshape."""
        shape = static_shape(call)
        if shape is None or len(shape) < 3:
            return call
        sources = [f for f in (self._flat_source(a, shape) for a in call.args) if f is not None]
        if not sources:
            return call
        flat_shape = static_shape(sources[0])
        if any(static_shape(f) != flat_shape for f in sources):
            return call
        args = [self._flat_operand(a, shape, flat_shape) for a in call.args]
        if any(a is None for a in args):
            return call
        flat = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        if static_shape(flat) != flat_shape:
            return call
        return relax.op.reshape(flat, shape)


@tvm.transform.module_pass(opt_level=0, name="PackedDense")
class PackedDense:
    """Float matmuls with a constant ``[K, N]`` weight, and 1x1 channels-last convs on their
    flattened map -> a kernel reading the weight packed in panels of the vector width the CPU
    tile takes for ``lanes`` float32 lanes; other ungrouped channels-last convs -> the same
    conv reading its weight in such panels."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Pack(mod, self.lanes)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.uses = use_counts(func)
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(rewriter.visit_expr(func)))
        if not rewriter.packed:
            return mod
        out = rewriter.builder_.get()
        # the panel kernels a pooled conv replaced
        return tvm.IRModule({gv: f for gv, f in out.functions_items() if not any(gv.same_as(r) for r in rewriter.replaced)},
                            attrs=out.attrs, global_infos=out.global_infos)


class PackedDenseKernels(KernelHook):
    """On unless a preset sets ``features.pack_dense = false``."""

    name = "packed_dense"
    feature = "pack_dense"
    default_on = True

    def rewrites(self, profile):
        return [PackedDense(self.lanes(profile))]


PACKED_DENSE = PackedDenseKernels()
