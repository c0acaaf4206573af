"""Packed-weight int8 convolution: the compute and its hand schedule over a dot intrinsic.

The weight ``[OC, IC, KH, KW]`` is packed offline to ``[OC/lanes, IC/depth, KH, KW, lanes,
depth]``, zero-padded to whole steps, so one intrinsic call reads one contiguous block. The
kernel's first stage packs the NCHW activations the same way (zero padding, ``depth`` channels
innermost, in the intrinsic's dtype; int8 activations shifted into uint8 for unsigned x signed
dots, corrected by a per-channel ``comp`` after the sum). The schedule keeps a register tile of
``tile_w`` output columns x ``tile_oc`` lane groups in int32 accumulators over the whole
reduction, then runs the fused epilogue (requantize) on it. Grouped convolutions run the same
kernel, each output channel reducing over its own group's inputs (``group_weight``). Depthwise
convolutions use plain vectors along output columns instead (see ``packed_depthwise_conv2d``).

Channels-last activations (``Int8ChannelsLast``) use the same kernels with NHWC indexing: the
pack becomes a contiguous copy of each pixel's channels, the epilogue stores vectors of
channels, and depthwise kernels vectorize along channels (``_depthwise_nhwc``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from tvm_compress.specs import pair_weight_sums

from .conv_geometry import conv_geometry, first_row, real_rows, row_window
from .cpu_schedule import PARALLEL_MIN_ELEMS, reads_within, target_cores
from .int8_intrin import KERNELS, DotKernel, pair_tap_intrin, register, tap_intrin

# Block annotation that marks the convolution for ``schedule_packed_conv`` (set by the compute).
KERNEL_ATTR = "tvm_compress.int8_dot"
DEPTHWISE_ATTR = "tvm_compress.int8_depthwise"
PACK_INTERIOR_ATTR = "tvm_compress.pack_interior"
TILE_ATTR = "tvm_compress.int8_tile"
# Output channels per group of a grouped convolution (``packed_conv2d``'s ``group_out``).
GROUP_ATTR = "tvm_compress.int8_group"
# "NHWC" on kernels whose activations are channels-last (``Int8ChannelsLast``); NCHW otherwise.
LAYOUT_ATTR = "tvm_compress.int8_layout"
# A parallel region costs microseconds to start: small packs (``PARALLEL_MIN_ELEMS``) and
# convolutions run serially. Measured on the PP-OCR classifier's 2-24 x 96 maps (2 cores): dot
# kernels from about 150k multiply-adds (8 -> 24 1x1 at 12x96, 221k: 1.5x faster on both
# cores; 24 -> 8 at 6x96, 110k: 0.75x) and depthwise ones, dearer per multiply-add, from
# about 100k (24 channels 3x3 at 6x96, 124k: 1.7x; 8 channels, 83k: 0.8x).
_PARALLEL_MIN_MACS = 1 << 17
_PARALLEL_MIN_MACS_DEPTHWISE = 100_000
# Accumulator tiles stay in "global" scope: TVM puts a "global" buffer under 1 KiB on the stack
# (registers, after LLVM), but serves a "local" one from the workspace pool, an alloc/free pair
# in every parallel iteration (a third of a small depthwise kernel's time under perf).
_ACC_SCOPE = "global"


def pack_weight(w: np.ndarray, kernel: DotKernel) -> np.ndarray:
    """OIHW int8 -> [OC/lanes, KH, KW, IC/depth, lanes, depth], zero-padded to whole lane groups
    and dot steps. Input channels innermost: the reduction walks them contiguously, as it walks
    the packed activations (channels innermost per pixel)."""
    oc, ic, kh, kw = w.shape
    ocp = -(-oc // kernel.lanes) * kernel.lanes
    icp = -(-ic // kernel.depth) * kernel.depth
    w = np.pad(w, ((0, ocp - oc), (0, icp - ic), (0, 0), (0, 0)))
    w = w.reshape(ocp // kernel.lanes, kernel.lanes, icp // kernel.depth, kernel.depth, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


# A saturating int16 pair sum (``DotKernel.int16_pairs``) of two uint8 activations (up to 255)
# times int8 weights is exact while the pair's same-signed weights add up to at most this.
_PAIR_WEIGHT_LIMIT = 32767 // 255


def column_taps(w: np.ndarray, taps: int) -> np.ndarray:
    """A single-channel conv's OIHW weight ``[O, 1, KH, KW]`` -> ``[O, taps, KH, ceil(KW / taps)]``:
    columns ``q * taps + j`` of each row as input channel ``j`` (zero past ``KW``). With a pack
    that puts a pixel and its ``taps - 1`` right neighbours in a pixel's channels
    (``packed_conv2d``'s ``kw``), one dot step multiplies ``taps`` columns of the kernel: a 3x3
    conv on one channel is 3 dot steps of 4 instead of 9 of which three quarters are padding."""
    o, _, kh, kw = w.shape
    q = -(-kw // taps)
    rows = np.pad(w[:, 0], ((0, 0), (0, 0), (0, q * taps - kw)))
    return np.ascontiguousarray(rows.reshape(o, kh, q, taps).transpose(0, 3, 1, 2))


def layer_kernel(w: np.ndarray, kernel: DotKernel) -> DotKernel:
    """The kernel that runs the OIHW int8 weight ``w`` exactly: ``kernel`` unless it sums
    products in saturating int16 pairs (adjacent input channels, as packed) and a pair of
    ``w`` could overflow one; then its exact fallback (``DotKernel.exact_fallback``). The
    fallback also takes 1-2 input channels: padded to ``kernel``'s 4-channel dot step, twice
    the fallback's, they lose its 2x rate (a one-channel conv wider than one column gets
    ``column_taps`` first, so its channels are whole steps)."""
    if not kernel.int16_pairs:
        return kernel
    fallback = KERNELS[kernel.exact_fallback]
    if -(-w.shape[1] // kernel.depth) * kernel.depth >= 2 * -(-w.shape[1] // fallback.depth) * fallback.depth:
        return fallback
    return kernel if pair_weight_sums(w).max() <= _PAIR_WEIGHT_LIMIT else fallback


def group_weight(w: np.ndarray, groups: int, lanes: int) -> Optional[Tuple[np.ndarray, int]]:
    """A grouped conv's OIHW weight ``[OC, IC / groups, KH, KW]`` as one whose groups are whole
    lane groups of output channels: (weight, output channels per group), None where the group
    width and ``lanes`` divide neither way. A group of ``lanes`` or a multiple of it stays as it
    is; narrower groups (RegNet's 8 on 16 lanes, ResNeXt's 4 on 8) are taken ``lanes / width``
    at a time as one group of ``lanes`` outputs over their inputs together, the weight block
    diagonal (zeros across the groups: that many times the products, in whole vectors)."""
    oc, icg, kh, kw = w.shape
    width = oc // groups
    if width % lanes == 0:
        return w, width
    if lanes % width:
        return None
    k = lanes // width
    merged = -(-groups // k)
    out = np.zeros((merged * lanes, k * icg, kh, kw), w.dtype)
    for g in range(groups):
        j = g % k
        out[g * width:(g + 1) * width, j * icg:(j + 1) * icg] = w[g * width:(g + 1) * width]
    return out, lanes


def shift_compensation(w: np.ndarray, shift: int) -> np.ndarray:
    """``shift * sum(w)`` per output channel of an OIHW weight (int32): what activations
    shifted by ``shift`` add to each sum."""
    return (shift * w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)).astype(np.int32)


def _packed_value(value, shift: int, dtype: str):
    """An activation in the intrinsic's dtype (shifted by ``shift`` first)."""
    return (value.astype("int32") + shift).astype(dtype) if shift else value.astype(dtype)


def _compensate(acc: te.Tensor, comp, out_channels: int, out_w: Optional[int] = None,
                layout: str = "NCHW") -> te.Tensor:
    """Subtract the shift's per-channel contribution; crop the padded lanes (channels, or
    columns for depthwise)."""
    if layout == "NHWC":
        n, oh, ow, oc = (int(v) for v in acc.shape)
        out_w = out_w or ow
        if comp is None and (oc, ow) == (out_channels, out_w):
            return acc
        shape = (n, oh, out_w, out_channels)
        if comp is None:
            return te.compute(shape, lambda b, y, xx, o: acc[b, y, xx, o], name="int8_conv_crop")
        return te.compute(shape, lambda b, y, xx, o: acc[b, y, xx, o] - comp[o], name="int8_conv_comp")
    n, _, oh, ow = (int(v) for v in acc.shape)
    out_w = out_w or ow
    if comp is None and (int(acc.shape[1]), ow) == (out_channels, out_w):
        return acc
    if comp is None:
        return te.compute((n, out_channels, oh, out_w), lambda b, o, y, xx: acc[b, o, y, xx],
                          name="int8_conv_crop")
    return te.compute((n, out_channels, oh, out_w), lambda b, o, y, xx: acc[b, o, y, xx] - comp[o],
                      name="int8_conv_comp")


def dense_tile(kernel: DotKernel, lane_groups: int, out_w: int) -> Tuple[int, int, int]:
    """Register tile of a regular packed convolution: (lane groups, output columns, padded
    output width).

    A tile of ``tile_oc x tile_w`` accumulators reuses each activation load ``tile_oc`` times
    and each weight load ``tile_w`` times, so wide tiles pay; on rows whose width has no good
    divisor (7, 14: tiles of 1 or 2 columns) the output width is padded to whole tiles instead,
    and the padded columns are computed and dropped. Cost per useful dot step, in micro-ops:
    the dot (multiply + add), a weight load per ``tile_w`` and a broadcast per ``tile_oc``,
    times the share of padded columns; exact widths win ties. The tile, its ``tile_oc`` weight
    vectors, the broadcast activation (and the product, for a dot that does not accumulate)
    must fit the vector registers: one more and LLVM spills (AVX2, 96->24 3x3 at 80x80:
    3 x 4 tiles 1.8x slower than 3 x 3).
    """
    spare = kernel.registers - 1 - (0 if kernel.accumulates else 1)
    best = None
    for tile_oc in range(1, 5):
        if lane_groups % tile_oc:
            continue
        for tile_w in range(1, min(spare // tile_oc, kernel.max_acc // tile_oc + 1)):
            padded = -(-out_w // tile_w) * tile_w
            cost = (2 + 2 / tile_w + 1 / tile_oc) * padded / out_w * (1.0 if padded == out_w else 1.03)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, tile_oc, tile_w, padded)
    return best[1:]


def packed_conv2d(
    x: te.Tensor,
    wp: te.Tensor,
    comp: Optional[te.Tensor],
    out_channels: int,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    kernel_name: str,
    layout: str = "NCHW",
    kw: int = 0,
    group_out: int = 0,
) -> te.Tensor:
    """NCHW (or NHWC) int8/uint8 x packed int8 -> int32 in the same layout (``out_channels``
    of them); ``comp``: the shift's correction (``shift_compensation``) when
    ``kernel.shift(x.dtype)`` is not 0. ``kw``: a single-channel conv's width when ``wp`` packs
    its ``column_taps``; the pack's channel ``k`` of a pixel is then the pixel ``k`` columns
    (times the dilation) to its right. ``group_out``: a grouped conv's output channels per
    group (``group_weight``), whole lane groups; ``wp`` then packs one group's input channels
    (whole dot steps), and output channel ``o`` reduces over group ``o // group_out``'s."""
    kernel = KERNELS[kernel_name]
    shift = kernel.shift(str(x.dtype))
    rows = layout == "rows"  # ``packed_matmul``: [..., K] rows as the pixels of a map
    nhwc = layout == "NHWC" or rows
    if rows:
        n, (h, w), ic = 1, matmul_map(x.shape), int(x.shape[-1])
    elif nhwc:
        n, h, w, ic = (int(v) for v in x.shape)
    else:
        n, ic, h, w = (int(v) for v in x.shape)

    def read(b, c, y, xx):
        if rows:
            return x[(*_lead_index(x.shape, y, xx), c)]
        return x[b, y, xx, c] if nhwc else x[b, c, y, xx]

    ocb, kh, kwp, icb, lanes, depth = (int(v) for v in wp.shape)
    taps = icb * depth if kw else 1  # columns per packed pixel (``column_taps``)
    kw = kw or kwp
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, padding, strides, dilation)
    dt = kernel.packed_dtype
    # A register tile's lane groups share their activations: one group's at most.
    tile_oc, tile_w, owp = dense_tile(kernel, group_out // lanes if group_out else ocb, ow)
    group_steps = icb if group_out else 0  # dot steps of one group's inputs
    if group_out:
        icb *= ocb * lanes // group_out
    # Wide enough for the padded output columns too (they read zeros).
    cols = max(w + pl + pr, (owp - 1) * sw + (kwp - 1) * taps * dw + 1)
    # Pack: zero padding (rows, columns; channels up to whole dot steps), all channels of a
    # pixel contiguous (NHWC) in the intrinsic's dtype: one dot step's ``depth`` channels are
    # one scalar load, and the reduction over channels streams through memory. (Channel planes
    # of ``depth`` instead made each step jump a plane: 3x slower on 96-channel 3x3 convs.)
    def pack(b, y, xx, c, d):
        if taps > 1:  # channel k: the pixel k columns on
            col = xx + (c * depth + d) * dw
            value = _packed_value(read(b, 0, y - pt, col - pl), shift, dt)
            return tirx.if_then_else(tirx.all(y >= pt, y < h + pt, col >= pl, col < w + pl),
                                     value, tirx.const(shift, dt))
        value = _packed_value(read(b, tirx.Min(c * depth + d, ic - 1), y - pt, xx - pl), shift, dt)
        if (pt, pb, pl, cols) == (0, 0, 0, w):
            # Only channels padded (the read is clamped): a select vectorizes, where a
            # conditional load is split into bytes, and the dot steps' loads of the bytes
            # stored one at a time wait for them (store forwarding fails).
            return tirx.Select(c * depth + d < ic, value, tirx.const(shift, dt))
        return tirx.if_then_else(tirx.all(c * depth + d < ic, y >= pt, y < h + pt, xx >= pl, xx < w + pl),
                                 value, tirx.const(shift, dt))

    xpack = te.compute(
        (n, h + pt + pb, cols, icb, depth),
        pack,
        name="int8_pack",
        attrs={PACK_INTERIOR_ATTR: [pt, h + pt, pl, w + pl - (taps - 1) * dw]},
    )
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kwp), name="rx")
    rc = te.reduce_axis((0, (group_steps or icb) * depth), name="rc")

    def dot(b, o, y, xx):
        step = o // group_out * group_steps + rc // depth if group_out else rc // depth
        return te.sum(
            xpack[b, y * sh + ry * dh, xx * sw + rx * taps * dw, step, rc % depth].astype("int32")
            * wp[o // lanes, ry, rx, rc // depth, o % lanes, rc % depth].astype("int32"),
            axis=[ry, rx, rc],
        )

    attrs = {KERNEL_ATTR: kernel_name, TILE_ATTR: [tile_oc, tile_w], LAYOUT_ATTR: "NHWC" if nhwc else layout}
    if group_out:
        attrs[GROUP_ATTR] = group_out
    if nhwc:
        acc = te.compute((n, oh, owp, ocb * lanes), lambda b, y, xx, o: dot(b, o, y, xx),
                         name="int8_conv", attrs=attrs)
    else:
        acc = te.compute((n, ocb * lanes, oh, owp), dot, name="int8_conv", attrs=attrs)
    return _compensate(acc, comp, out_channels, ow, "NHWC" if nhwc else layout)


def matmul_map(shape) -> Tuple[int, int]:
    """The map (rows, columns) of ``packed_matmul``'s pixels for a ``[..., K]`` input: its
    leading dimensions other than 1, at most two (one: a single row)."""
    lead = [int(v) for v in shape[:-1] if int(v) != 1]
    assert len(lead) <= 2, f"packed_matmul takes at most two leading dimensions other than 1, not {shape}"
    return (lead[0], lead[1]) if len(lead) == 2 else (1, lead[0] if lead else 1)


def _lead_index(shape, y, xx):
    """The leading index of ``shape`` at map pixel (y, xx): 0 on unit dimensions (affine, so a
    tile's epilogue stays a contiguous region of the map)."""
    wide = [i for i, v in enumerate(shape[:-1]) if int(v) != 1]
    coords = dict(zip(wide, [y, xx] if len(wide) == 2 else [xx]))
    return [coords.get(i, 0) for i in range(len(shape) - 1)]


def packed_matmul(x: te.Tensor, wp: te.Tensor, comp: Optional[te.Tensor], out_features: int,
                  kernel_name: str) -> te.Tensor:
    """int8/uint8 ``[..., K]`` x a ``[K, N]`` int8 weight packed as the 1x1 convolution
    ``[N, K, 1, 1]`` (``pack_weight``) -> int32 ``[..., N]``: the rows are the pixels of a
    channels-last map (``matmul_map``: tokens of a batch as one row), so a dense layer runs the
    convolutions' dot kernel with tiles of several rows."""
    acc = packed_conv2d(x, wp, comp, out_features, (1, 1), (0, 0, 0, 0), (1, 1), kernel_name, layout="rows")
    lead = [int(v) for v in x.shape[:-1]]
    wide = [i for i, v in enumerate(lead) if v != 1]

    def row(*index):
        y, xx = ([index[i] for i in wide] if len(wide) == 2 else [0, index[wide[0]] if wide else 0])
        return acc[0, y, xx, index[-1]]

    return te.compute((*lead, out_features), row, name="int8_matmul_rows")


def pack_depthwise_weight(w: np.ndarray, kernel: DotKernel, layout: str = "NCHW",
                          pairs: bool = False) -> np.ndarray:
    """[C, 1, KH, KW] int8 -> [C, KH, KW]: depthwise taps are scalars broadcast over a vector of
    output columns, so no dot-product layout is needed. NHWC: [KH, KW, C'], C' channels padded
    to whole vectors (``channel_lanes``): one tap is one vector load (widened in the kernel;
    stored as int8, the weights stay a quarter of float's bytes). ``pairs``
    (``depthwise_tap_pairs``): [KH, ceil(KW / 2), C', 2], neighbouring columns' taps side by
    side per channel, an odd last column paired with a zero weight."""
    if layout != "NHWC":
        return np.ascontiguousarray(w[:, 0])
    c, kw = w.shape[0], w.shape[3]
    cp = -(-c // channel_lanes(c, kernel.lanes)) * channel_lanes(c, kernel.lanes)
    taps = np.pad(w[:, 0], ((0, cp - c), (0, 0), (0, kw % 2 if pairs else 0))).transpose(1, 2, 0)
    if pairs:
        kh, kwp = taps.shape[0], taps.shape[1] // 2
        taps = taps.reshape(kh, kwp, 2, cp).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(taps)


def depthwise_tap_pairs(kernel: DotKernel, x_shape, kh: int, kw: int, padding, strides, dilation) -> bool:
    """Whether an NHWC depthwise conv runs two taps per instruction: where the ISA's tap is a
    pair multiply-add (x86) and the kernel packs its input (``_inline_pad``). The pack then
    holds each pixel's channel next to its right neighbour's as int16 halves of an int32, so
    one ``vpmaddwd`` (``vpdpwssd``) multiplies two columns' taps: a 3x3 kernel 6 tap
    instructions instead of 9, with the activations' widening done once per pixel in the pack
    instead of once per tap."""
    n, h, w, c = (int(v) for v in x_shape)
    geometry = conv_geometry(h, w, kh, kw, padding, strides, dilation)
    return _pairable(kernel, c, kw) and not _inline_pad(h, kh, kw, geometry, paired=True)


def _pairable(kernel: DotKernel, channels: int, kw: int) -> bool:
    return kw > 1 and pair_tap_intrin(kernel, channel_lanes(channels, kernel.lanes)) is not None


def channel_lanes(channels: int, lanes: int) -> int:
    """int32 lanes of one channel vector of an NHWC depthwise kernel: a whole register when it
    divides the channels, else half or a quarter of one (24 channels on 16 lanes: vectors of
    8, no padded channels), else a whole register over channels padded to fit."""
    for width in (lanes, lanes // 2, lanes // 4):
        if width >= 4 and channels % width == 0:
            return width
    return lanes


def packed_depthwise_conv2d(
    x: te.Tensor,
    wp: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    kernel_name: str,
    layout: str = "NCHW",
    kw: int = 0,
) -> te.Tensor:
    """Depthwise NCHW int8/uint8 x [C, KH, KW] int8 -> NCHW int32.

    A depthwise sum has too few terms for a dot instruction to pay off; the cost is moving
    the data. So vectors run along output columns (``lanes`` int32 of them): each tap is one
    contiguous load of a padded input row times a broadcast weight, with no channel gather,
    and the epilogue stores whole rows. Strided convolutions read a column-phase split copy
    of the input (``int8_pack``), so their loads stay contiguous too.
    """
    if layout == "NHWC":
        return _depthwise_nhwc(x, wp, strides, padding, dilation, kernel_name, kw)
    kernel = KERNELS[kernel_name]
    n, c, h, w = (int(v) for v in x.shape)
    _, kh, kw = (int(v) for v in wp.shape)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, padding, strides, dilation)
    owp = -(-ow // kernel.lanes) * kernel.lanes
    cols = owp + (kw - 1) * dw // sw
    xpad = te.compute(
        (n, c, h + pt + pb, sw, cols),
        lambda b, cc, y, p, xx: tirx.if_then_else(
            tirx.all(y >= pt, y < h + pt, xx * sw + p >= pl, xx * sw + p < w + pl),
            x[b, cc, y - pt, tirx.Max(tirx.Min(xx * sw + p - pl, w - 1), 0)],
            tirx.const(0, x.dtype),
        ),
        name="int8_pack",
        # Rows [pt, h + pt) and columns [lo, hi) read no padding (for any column phase).
        attrs={PACK_INTERIOR_ATTR: [pt, h + pt, min(-(-pl // sw), cols), min((w + pl) // sw, cols)]},
    )
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (n, c, oh, owp),
        lambda b, o, y, xx: te.sum(
            xpad[b, o, y * sh + ry * dh, rx * dw % sw, xx + rx * dw // sw].astype("int32")
            * wp[o, ry, rx].astype("int32"),
            axis=[ry, rx],
        ),
        name="int8_conv",
        attrs={KERNEL_ATTR: kernel_name, DEPTHWISE_ATTR: 1},
    )
    return _compensate(acc, None, c, ow)


# Share of a depthwise kernel's taps falling on padding rows above which the padding is read
# as a condition per tap instead of packed zeros, where the ISA has no pair tap: the condition
# skips those taps, the pack multiplies them. 5x5 kernels on the PP-OCR classifier's 2-3 row
# maps (40-60 % padding taps) 1.9-2.5x faster that way; on 6 rows (20 %) 0.6x.
_PAD_ROW_SHARE = 0.3


def _inline_pad(h: int, kh: int, kw: int, geometry, paired: bool) -> bool:
    """Whether a depthwise kernel tests padding rows per tap instead of packing them.

    ``paired``: the packed kernel takes two taps per instruction over ``row_window`` rows;
    the test pays where the taps off the padding rows are fewer than those instructions."""
    oh = geometry[3][0]
    valid = sum(real_rows(h, kh, geometry))
    if paired:
        return valid * kw < -(-kw // 2) * oh * _pair_window(h, kh, geometry)
    return 1 - valid / (oh * kh) > _PAD_ROW_SHARE


def _pair_window(h: int, kh: int, geometry) -> int:
    """Kernel rows per output row of a pair kernel: ``row_window``, undilated only (a dilated
    window's first row is a lookup, which the tap intrinsic's pattern does not match)."""
    return row_window(h, kh, geometry) if geometry[2][0] == 1 else kh


def _depthwise_nhwc(x, wp, strides, padding, dilation, kernel_name, kw=0):
    """Depthwise NHWC int8/uint8 x [KH, KW, C'] int8 -> NHWC int32: vectors along channels.

    Each tap is a vector of a pixel's channels times a vector of weights, at any map size and
    stride (columns of a 10x10 map fill 10 of 16 lanes; 96 channels fill whole registers).
    The pack pads the borders and the channels to whole vectors, channels innermost in groups
    of ``channel_lanes``, the regular kernels' pack layout. With tap pairs
    (``depthwise_tap_pairs``: ``wp`` is [KH, KW/2, C', 2], ``kw`` the kernel's width) each
    packed element is an int32 holding a pixel's channel and its right neighbour's.
    """
    kernel = KERNELS[kernel_name]
    n, h, w, c = (int(v) for v in x.shape)
    pairs = len(wp.shape) == 4  # [KH, KW/2, C', 2]: two taps per instruction
    kh, kwp, cp = (int(v) for v in wp.shape[:3])
    kw = kw or kwp  # pairs: the kernel's width, its taps rounded up to pairs in ``wp``
    cl = channel_lanes(c, kernel.lanes)
    geometry = conv_geometry(h, w, kh, kw, padding, strides, dilation)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = geometry

    def read(b, y, xx, cc, l):
        return tirx.if_then_else(
            tirx.all(cc * cl + l < c, y >= pt, y < h + pt, xx >= pl, xx < w + pl),
            x[b, y - pt, xx - pl, tirx.Min(cc * cl + l, c - 1)],
            tirx.const(0, x.dtype),
        )

    if pairs:
        # Element xx: column g * xx and the one dw on, as the int16 halves of an int32. Taps read
        # columns x * sw + 2 * rx * dw, all multiples of g: a stride of 2 packs every other one.
        g = math.gcd(sw, 2 * dw)
        cols = ((ow - 1) * sw + 2 * (kwp - 1) * dw) // g + 1
        value = lambda b, y, xx, cc, l: (  # noqa: E731
            read(b, y, xx * g, cc, l).astype("int16").astype("uint16").astype("int32")
            | (read(b, y, xx * g + dw, cc, l).astype("int32") << 16))
        interior = [-(-pl // g), -(-(w + pl - dw) // g)]
    else:
        g, cols, value, interior = 1, w + pl + pr, read, [pl, w + pl]
    xpad = te.compute(
        (n, h + pt + pb, cols, cp // cl, cl),
        value,
        name="int8_pack",
        attrs={PACK_INTERIOR_ATTR: [pt, h + pt, *interior]},
    )
    inline_pad = int(_inline_pad(h, kh, kw, geometry, pairs or _pairable(kernel, c, kw)))
    assert not (pairs and inline_pad), "tap pairs need the pack"
    # Pairs run only the kernel rows that reach the map (``row_window``): 5x5 kernels on 3
    # rows 9 pair taps instead of 15.
    window = _pair_window(h, kh, geometry) if pairs else kh
    ry = te.reduce_axis((0, window), name="ry")
    rx = te.reduce_axis((0, kwp), name="rx")

    def tap(b, y, xx, o):
        col = (xx * sw + 2 * rx * dw) // g if pairs else xx * sw + rx * dw
        r = first_row(y, kh, window, geometry) + ry
        a = xpad[b, y * sh + r * dh, col, o // cl, o % cl]
        if pairs:  # as ``int8_intrin.pair_tap_intrin`` spells it
            return (a.astype("int16").astype("int32") * wp[r, rx, o, 0].astype("int32")
                    + tirx.shift_right(a, 16) * wp[r, rx, o, 1].astype("int32"))
        return a.astype("int32") * wp[r, rx, o].astype("int32")

    acc = te.compute(
        (n, oh, ow, cp),
        lambda b, y, xx, o: te.sum(tap(b, y, xx, o), axis=[ry, rx]),
        name="int8_conv",
        attrs={KERNEL_ATTR: kernel_name, DEPTHWISE_ATTR: 1, LAYOUT_ATTR: "NHWC", TILE_ATTR: [cl, inline_pad]},
    )
    return _compensate(acc, None, c, ow, "NHWC")


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _inline_epilogue(sch: s_tir.Schedule, block):
    """Inline the element-wise chain after ``block`` into its last block; return that block
    (None when the convolution's own output is not followed by one).

    The chain stops before an op that writes more than the convolution (a squeeze-excite
    conv's per-channel scale times a whole feature map): inlined into that op, the per-channel
    arithmetic would run again at every pixel. ``_broadcast_tail`` takes the rest."""
    tail = None
    consumers = sch.get_consumers(block)
    while consumers and reads_within(sch, consumers[0], block):
        tail = consumers[0]
        after = sch.get_consumers(tail)
        # A consumer with outputs that read nothing of the tail (a fused pad or concat) stays
        # a loop nest of its own: moved under the tile loop it would lose them.
        if not after or not all(reads_within(sch, c, tail) for c in after) \
                or (len(after) == 1 and _elements(sch, after[0]) > _elements(sch, block)):
            break
        sch.compute_inline(tail)
        consumers = sch.get_consumers(block)
    if tail is not None:
        _inline_other_inputs(sch, tail, block)
    return tail


def _inline_other_inputs(sch: s_tir.Schedule, tail, source) -> None:
    """Other element-wise inputs of an epilogue (e.g. a dequantized residual, one block per op
    when spelled out for the channels-last rewrite) into it too."""
    others = [p for p in sch.get_producers(tail) if not sch.get(p).same_as(sch.get(source))]
    while others:
        sch.compute_inline(others[0])
        others = [p for p in sch.get_producers(tail) if not sch.get(p).same_as(sch.get(source))]


def _broadcast_tail(sch: s_tir.Schedule, tail, block):
    """The chain after a per-channel epilogue ``tail`` that scales a whole map, inlined into its
    last block (None when ``tail`` ends the kernel)."""
    after = sch.get_consumers(tail)
    if len(after) != 1 or _elements(sch, after[0]) <= _elements(sch, block):
        return None
    rest = after[0]
    nxt = sch.get_consumers(rest)
    while nxt and all(reads_within(sch, c, rest) for c in nxt):
        sch.compute_inline(rest)
        rest = sch.get_consumers(tail)[0]
        nxt = sch.get_consumers(rest)
    _inline_other_inputs(sch, rest, tail)
    return rest


def _elements(sch: s_tir.Schedule, block) -> int:
    return int(np.prod([int(v) for v in sch.get(block).writes[0].source.shape]))


def _broadcasts(sch: s_tir.Schedule, tail, block) -> bool:
    """True when the epilogue writes more than the convolution (a squeeze-excite conv on a 1x1
    map scaling a whole feature map): under the conv's tile loop it would run serially."""
    return _elements(sch, tail) > _elements(sch, block)


def _schedule_alone(sch: s_tir.Schedule, block, lanes: int) -> None:
    """An element-wise loop nest of its own: parallel over its outer loops when large,
    vectorized along the innermost."""
    *outer, inner = sch.get_loops(block)
    width = next((v for v in (2 * lanes, lanes, lanes // 2, 4) if _extent(sch, inner) % v == 0), None)
    if width is not None:
        sch.vectorize(sch.split(inner, [None, width])[1] if _extent(sch, inner) > width else inner)
    if outer and _elements(sch, block) >= PARALLEL_MIN_ELEMS:
        sch.parallel(sch.fuse(*outer[:2]) if len(outer) > 1 else outer[0])


def _partition(sch: s_tir.Schedule, loop, lo: int, hi: int):
    """Split ``loop`` into [0, lo), [lo, hi), [hi, end) (empty parts left out); returns the
    pieces and the index of the middle one. In the middle piece the pack's bounds test on this
    loop is provably true, so the simplifier drops it."""
    end = _extent(sch, loop)
    lo, hi = max(0, min(lo, end)), max(0, min(hi, end))
    sizes = [p for p in (lo, hi - lo, end - hi) if p]
    if hi - lo < 1 or len(sizes) == 1:
        return [loop], 0
    return sch.loop_partition(loop, [*sizes[:-1], None]), 1 if lo else 0


def _schedule_pack(sch: s_tir.Schedule, block, depthwise: bool) -> None:
    """The activation packing stage: padding rows and columns split off (``PACK_INTERIOR_ATTR``:
    the rows and columns that read the input), so the interior copies without bounds tests
    (with them the pack ran as scalar code with a branch per element, about half of a
    160x160 depthwise kernel's time); parallel when large enough, vectorized innermost (a
    pixel's channels for regular convolutions, a row for depthwise ones)."""
    (pack,) = sch.get_producers(block)  # the weight is a parameter: the pack is the one producer
    loops = sch.get_loops(pack)
    big = np.prod([_extent(sch, l) for l in loops]) >= PARALLEL_MIN_ELEMS
    row_lo, row_hi, col_lo, col_hi = (int(v) for v in sch.get(pack).annotations[PACK_INTERIOR_ATTR])
    # depthwise: (b, c, y, phase, x), parallel over channels; regular: (b, y, x, c, d) over
    # rows. Counted from the innermost loop: a partition puts the outer loops out of reach.
    row_at, col_at = (-3, -1) if depthwise else (-4, -3)
    if big and depthwise:
        sch.parallel(sch.fuse(*loops[:2]))
    rows, mid = _partition(sch, loops[row_at], row_lo, row_hi)
    for i, row_piece in enumerate(rows):
        (inner,) = sch.get_child_blocks(row_piece) if len(rows) > 1 else [pack]
        if i == mid:
            if big and not depthwise:
                sch.parallel(row_piece if len(rows) > 1 else sch.fuse(*loops[:2]))
            col_pieces, _ = _partition(sch, sch.get_loops(inner)[col_at], col_lo, col_hi)
            targets = [sch.get_child_blocks(c)[0] if len(col_pieces) > 1 else inner for c in col_pieces]
        else:
            targets = [inner]
        for blk in targets:
            blk_loops = sch.get_loops(blk)
            if depthwise:
                sch.vectorize(blk_loops[-1])
            else:
                _vectorize_channels_run(sch, sch.fuse(*blk_loops[-2:]), unroll=True)


def _finish(sch: s_tir.Schedule, block, parallel_loops, r_first, tile_loops, lane_loop, intrin,
            packed: bool = False, macs_per_step: int = 1):
    """Shared tail of both schedules: pack stage (unless ``packed``: already placed), parallel
    outer loops, then the lane loop tensorized with ``intrin`` (or vectorized when None).
    ``macs_per_step``: products per iteration of the block's loops (2 for tap pairs)."""
    annotations = sch.get(block).annotations
    if not packed:
        _schedule_pack(sch, block, DEPTHWISE_ATTR in annotations and not _nhwc(annotations))
    least = _PARALLEL_MIN_MACS_DEPTHWISE if DEPTHWISE_ATTR in annotations else _PARALLEL_MIN_MACS
    if macs_per_step * np.prod([_extent(sch, l) for l in sch.get_loops(block)]) >= least:
        sch.parallel(sch.fuse(*parallel_loops))
    if intrin is None:
        sch.vectorize(lane_loop)  # before the init is split off: vectorize needs a whole reduction block
    init = sch.decompose_reduction(block, r_first)
    if intrin is not None:
        sch.tensorize(lane_loop, intrin)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in tile_loops:
        sch.unroll(loop)


def _nhwc(annotations) -> bool:
    return str(annotations.get(LAYOUT_ATTR, "NCHW")) == "NHWC"


def schedule_packed_conv(sch: s_tir.Schedule, block) -> None:
    """Schedule one packed convolution block (and its fused epilogue) in ``sch``."""
    register()
    annotations = sch.get(block).annotations
    kernel = KERNELS[str(annotations[KERNEL_ATTR])]
    if DEPTHWISE_ATTR in annotations and _nhwc(annotations):
        _schedule_depthwise_nhwc(sch, block, kernel)
    elif DEPTHWISE_ATTR in annotations:
        _schedule_depthwise(sch, block, kernel)
    else:
        _schedule_dense(sch, block, kernel)


def _schedule_dense(sch: s_tir.Schedule, block, kernel: DotKernel) -> None:
    lanes, depth = kernel.lanes, kernel.depth
    nhwc = _nhwc(sch.get(block).annotations)
    if nhwc:
        n, y, x, o, ry, rx, rc = sch.get_loops(block)
    else:
        n, o, y, x, ry, rx, rc = sch.get_loops(block)
    rc_o, r_inner = sch.split(rc, [None, depth])
    # Register tile: tile_w columns x tile_oc lane groups of int32 accumulators; each
    # activation group is reused tile_oc times, each weight block tile_w times.
    tile_oc, tile_w = (int(v) for v in sch.get(block).annotations[TILE_ATTR])
    o_o, o_t, o_l = sch.split(o, [None, tile_oc, lanes])
    x_o, x_t = sch.split(x, [None, tile_w])
    mode = _pack_mode(sch, block, (ry, rx), _extent(sch, o_o)) if nhwc else None
    if mode == "pixels":
        sch.reorder(n, y, x_o, o_o, ry, rx, rc_o, x_t, o_t, o_l, r_inner)
        parallel = (n, y)
    elif nhwc:
        # Rows outermost: the parallel loop's chunks are bands of rows. With the lane groups
        # outermost the two cores each took half of every pixel's channels, in step, and wrote
        # neighbouring cache lines (a pair the adjacent-line prefetcher fetches together): the
        # detector's 18 -> 96 conv on AVX-512 3.8x and its 12 -> 96 on AVX2 1.65x slower, 2-thread
        # runs slower than 1-thread ones.
        sch.reorder(n, y, o_o, x_o, ry, rx, rc_o, x_t, o_t, o_l, r_inner)
        parallel = (n, y, o_o)
    else:
        sch.reorder(n, o_o, y, x_o, ry, rx, rc_o, x_t, o_t, o_l, r_inner)
        parallel = (n, o_o, y)
    if nhwc:
        x_o, parallel = _column_bands(sch, x_o, parallel)
    crop = _narrow_crop(sch, block, lanes) if nhwc else None
    tail = _inline_epilogue(sch, crop) if crop is not None else None
    if tail is not None:
        sch.reverse_compute_at(crop, x_o, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(crop)[-1])
    else:
        tail = _inline_epilogue(sch, block)
    if tail is not None and _broadcasts(sch, tail, block):
        _schedule_alone(sch, tail, lanes)
        tail = None
    rest = _broadcast_tail(sch, tail, block) if tail is not None else None
    if rest is not None:
        _schedule_alone(sch, rest, lanes)
    if tail is not None and nhwc:
        # Requantize per register tile, a vector of channels at a time: the NHWC stores are
        # contiguous along the channels.
        sch.reverse_compute_at(tail, x_o, preserve_unit_loops=True)
        _vectorize_channels(sch, tail, lanes)
    elif tail is not None:
        # Requantize along the output columns: the NCHW stores (and residual loads) are
        # contiguous there. Along the lanes instead, every store is a 16-way scatter: measured
        # 1.1x-4.5x slower per kernel (1x1 and 3x3, 2x96 to 160x160 outputs). Rows whose width
        # takes whole vectors run it once per output row on full vectors (1x1 convs on 80x80
        # and 160x160 maps 1.4x-2.4x faster than per register tile, whose 4-6 columns make
        # short vectors); other rows per tile (7x7, 14x14: 15-20% faster that way).
        out_w = _extent(sch, sch.get_loops(tail)[-1])
        width = next((v for v in (16, 8) if out_w % v == 0), None)
        if width is not None:
            sch.reverse_compute_at(tail, y, preserve_unit_loops=True)
            sch.vectorize(sch.split(sch.get_loops(tail)[-1], [None, width])[1])
        else:
            sch.reverse_compute_at(tail, x_o, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(tail)[-1])
    else:
        local = sch.cache_write(block, 0, _ACC_SCOPE)
        sch.reverse_compute_at(local, x_o, preserve_unit_loops=True)
    if not nhwc:
        # Lanes contiguous in the accumulator tile: one vector register holds one call's C.
        sch.transform_layout(block, ("write", 0), lambda b, c, h, w: (b, c // lanes, h, w, c % lanes))
    if mode is not None:
        _pack_tile(sch, block, x_o)
    _finish(sch, block, parallel, ry, (x_t, o_t), o_l, kernel.intrin, packed=mode is not None)


# Fewer parallel chunks than this that the cores do not divide leave a core idle long enough
# to matter (3 on two cores: a third of the time; 15: a fifteenth).
_FEW_CHUNKS = 16


def _column_bands(sch: s_tir.Schedule, x_o, parallel: tuple):
    """Chunks of the ``parallel`` loops (rows outermost) that do not split evenly over the
    cores, and are few (3 rows of a 3x96 map on two cores: one core did two), cut into bands
    of the pixel tiles' loop ``x_o`` too, right under the rows, as in
    ``_schedule_depthwise_nhwc``: (the tile loop, the parallel loops)."""
    cores = target_cores()
    chunks = int(np.prod([_extent(sch, l) for l in parallel]))
    x_tiles = _extent(sch, x_o)
    if chunks % cores == 0 or chunks >= _FEW_CHUNKS or x_tiles < 2 * cores or x_tiles % cores:
        return x_o, parallel
    x_c, x_o = sch.split(x_o, [cores, None])
    rows, rest = parallel[:2], parallel[2:]
    sch.reorder(*rows, x_c, *rest, x_o)
    return x_o, (*rows, x_c, *rest)


def _narrow_crop(sch: s_tir.Schedule, block, lanes: int):
    """The block that keeps fewer channels than one vector of an NHWC accumulator (a detector
    head's 4 of 8 lanes), else None. Kept as a copy per register tile (one short vector per
    pixel) instead of inlined: the epilogue then reads contiguous channels and runs along
    pixels x channels in whole vectors (inlined, each vector gathered its lanes from two
    pixels' accumulators with one insert per lane). The crop may subtract the shift's
    correction on the way (int8 activations): inlined, that crop cost the classifier's
    8 -> 8 conv 2.6x."""
    consumers = sch.get_consumers(block)
    if len(consumers) != 1:
        return None
    crop = sch.get(consumers[0])
    src = [int(v) for v in sch.get(block).writes[0].source.shape]
    dst = [int(v) for v in crop.writes[0].source.shape]
    # The crop alone, or with the shift's per-channel correction (``int8_conv_comp``).
    others = [r for r in crop.reads if not r.source.same_as(sch.get(block).writes[0].source)]
    if len(crop.reads) - len(others) != 1 or any(len(r.source.shape) != 1 for r in others) \
            or src[:-1] != dst[:-1] or not dst[-1] < lanes <= src[-1]:
        return None
    return consumers[0]


# Dot steps of a 1x1 conv's reduction up to which its lane groups run inside each pixel tile.
_SHORT_REDUCTION = 3


def _pack_mode(sch: s_tir.Schedule, block, reduce_loops, lane_tiles: int):
    """How a 1x1 conv over an unpadded map packs its activations: per register tile, just
    before using them inside the parallel loop, instead of in a whole-map pass first (the
    packed pixels are still in L1 when the dot loop reads them); None keeps the whole-map
    pass. Larger windows would pack each input row once per output row reading it. Channels
    padded to a whole dot step too: their pack gathers each pixel's channels (a clamped
    index), in a whole-map pass serially (the detector's 18 -> 96 and 42 -> 96 convs 1.1x and
    1.7x faster packed per tile).

    ``lanes``: each of the ``lane_tiles`` groups of output channels (a loop inside the row loop)
    packs its pixel tiles again, so only a few may: up to 3, or 6 where the whole-map pack is
    small enough to run serially (the classifier's 1x1 kernels 1.2-2.3x faster; the detector's
    with 6-45 groups over parallel packs 5-20 % slower, measured with the groups outermost).
    ``pixels``: more groups over a small map run inside each pixel tile, packed once, in
    parallel over rows (over rows and tiles it measured slower; few rows that do not split
    evenly over the cores, over rows and bands of columns): 7-19 % faster than ``lanes``
    on the classifier's 16 -> 88, 16 -> 104 and 32 -> 200 convs. Also instead of ``lanes`` where
    the reduction is at most ``_SHORT_REDUCTION`` dot steps: such a kernel mostly moves memory,
    and ``lanes`` passes over the map once per group (the detector's 12 -> 96 conv on AVX-512,
    3 steps of 4 channels: 155 -> 46 us). Not instead of the whole-map pass: there each tile's
    epilogue runs on accumulators still in registers, where ``pixels`` stores and reloads them
    (the same conv on AVX2, 12 lane groups: 44 us, 70 us as ``pixels``)."""
    (pack,) = sch.get_producers(block)
    if any(_extent(sch, l) != 1 for l in reduce_loops) or GROUP_ATTR in sch.get(block).annotations:
        return None
    interior = [int(v) for v in sch.get(pack).annotations[PACK_INTERIOR_ATTR]]
    _, rows, cols, groups, depth = (int(v) for v in sch.get(pack).writes[0].source.shape)
    channels = int(sch.get(pack).reads[0].source.shape[-1])
    if interior != [0, rows, 0, cols]:
        return None
    serial_pack = rows * cols * channels < PARALLEL_MIN_ELEMS
    if lane_tiles <= (6 if serial_pack else 3):
        return "pixels" if groups <= _SHORT_REDUCTION and lane_tiles > 1 else "lanes"
    return "pixels" if serial_pack else None


def _vectorize_channels_run(sch: s_tir.Schedule, run, unroll: bool = False,
                            widths: Sequence[int] = (64, 32, 16, 8, 4), whole: bool = True) -> None:
    """Vectorize a pixel's run of packed channels in power-of-two vectors (the first of
    ``widths`` that divides it): with AVX2, LLVM assembled a 48-byte vector from legal pieces
    through byte extracts and inserts (a 48-channel 3x3 depthwise kernel 1.6x slower, a quarter
    of its time in them). ``unroll`` the vectors of a run; a run no width divides is one
    vector if ``whole``, else left to LLVM."""
    extent = _extent(sch, run)
    width = next((v for v in widths if extent % v == 0), None)
    if width is None or extent == width:
        if width is not None or whole:
            sch.vectorize(run)
        return
    steps, lanes = sch.split(run, [None, width])
    sch.vectorize(lanes)
    if unroll:
        sch.unroll(steps)


def _pack_tile(sch: s_tir.Schedule, block, x_o) -> None:
    (pack,) = sch.get_producers(block)
    sch.compute_at(pack, x_o, preserve_unit_loops=True)
    # A pixel's channels in whole vectors (with the pixels fused too, channel counts that are
    # no power of two put a division into every lane's index: 4x slower).
    run = sch.fuse(*sch.get_loops(pack)[-2:])
    # Padded channels unrolled: the select of a clamped read (``packed_conv2d``) then
    # simplifies away in all but the last vector.
    # Vectors of at most 16 bytes here: of 32, the detector's 96 -> 96 conv on AVX-512 0.88x.
    _vectorize_channels_run(sch, run, unroll=_extent(sch, run) > int(sch.get(pack).reads[0].source.shape[-1]),
                            widths=(16, 8, 4), whole=False)


def _schedule_depthwise(sch: s_tir.Schedule, block, kernel: DotKernel) -> None:
    lanes = kernel.lanes
    n, c, y, x, ry, rx = sch.get_loops(block)
    # Register tile: tile vectors of neighbouring output columns of one row.
    tile = _largest_divisor(_extent(sch, x) // lanes, kernel.depthwise_acc)
    x_o, x_t, x_l = sch.split(x, [None, tile, lanes])
    sch.reorder(n, c, y, x_o, ry, rx, x_t, x_l)
    tail = _inline_epilogue(sch, block)
    if tail is not None:
        sch.reverse_compute_at(tail, x_o, preserve_unit_loops=True)
        *_, t_w = sch.get_loops(tail)
        if _extent(sch, t_w) % lanes == 0:  # whole rows: requantize and store a vector at a time
            sch.vectorize(sch.split(t_w, [None, lanes])[1])
    else:
        local = sch.cache_write(block, 0, _ACC_SCOPE)
        sch.reverse_compute_at(local, x_o, preserve_unit_loops=True)
    _finish(sch, block, (n, c, y), ry, (x_t,), x_l, None)


def _vectorize_channels(sch: s_tir.Schedule, tail, lanes: int) -> None:
    """Vectorize the innermost (channel) loop of an NHWC epilogue in whole vectors of at least
    ``lanes`` (the int8 stores narrow best from wide vectors).

    With 16 lanes, channel counts that are whole 8-lane vectors (24, 40, 88, 200) run in those.
    When the channels are fewer than a vector, divide it and are all the output has (a
    detector head's 4), the tile's pixels are contiguous too: the column and channel loops run
    as one (a 4-channel sigmoid epilogue ran in half-empty vectors). Only then: a run of 12
    channels fused with the pixels read its scales lane by lane (the detector's 48 -> 12
    conv 3.1x slower than unfused), and a fused run of 24 channels reads
    its per-channel scales through a lane index modulo 24, a gather of scalar loads (an 8 -> 24
    1x1 conv on AVX-512 8x slower than its float kernel). A run no such width divides is left
    to LLVM's loop vectorizer: TVM's 4-wide vectors of a 12-channel requantize were 12 % slower
    than what LLVM made of the scalar loop. A run of 2 or 4 channels alone (a squeeze-excite
    conv's on one pixel) is one short vector: LLVM ran that requantize lane by lane, a branch
    per lane for its ReLU."""
    loops = sch.get_loops(tail)
    inner = loops[-1]
    extent = _extent(sch, inner)
    widths = (4 * lanes, 2 * lanes, lanes) + ((lanes // 2,) if lanes >= 16 else ())
    if extent < lanes and lanes % extent == 0 and len(loops) > 1 and _extent(sch, loops[-2]) > 1 \
            and extent == int(sch.get(tail).writes[0].source.shape[-1]):
        inner = sch.fuse(loops[-2], inner)
        extent = _extent(sch, inner)
        widths = widths[:3]
    width = next((v for v in widths if extent % v == 0), None)
    if width is None and extent < lanes and extent & (extent - 1) == 0:
        width = extent  # one short vector (a squeeze conv's 2 channels on one pixel)
    if width is not None:
        sch.vectorize(sch.split(inner, [None, width])[1] if extent > width else inner)


# TVM keeps an accumulator tile of fewer bytes than this on the stack (``_ACC_SCOPE``).
_STACK_ACC_BYTES = 1024


def _row_chunks(rows: int, cores: int) -> int:
    """Chunks of output rows for a depthwise kernel's parallel loop: a multiple of the cores
    with at most 32 rows each where the row count allows, else the fewest that keep every
    core busy."""
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    even = [d for d in divisors if d % cores == 0 and rows // d <= 32]
    return even[0] if even else next((d for d in divisors if d >= cores), rows)


def _schedule_depthwise_nhwc(sch: s_tir.Schedule, block, kernel: DotKernel) -> None:
    cl, inline_pad = (int(v) for v in sch.get(block).annotations[TILE_ATTR])
    (pack,) = sch.get_producers(block)
    act = str(sch.get(pack).writes[0].source.dtype)
    if inline_pad:
        sch.compute_inline(pack)
    n, y, x, o, ry, rx = sch.get_loops(block)
    # Register tile: ``tile`` neighbouring output columns x one channel vector; the weight
    # vector of a tap is loaded once per tile.
    tile = _largest_divisor(_extent(sch, x), max(1, kernel.depthwise_acc // 2))
    o_o, o_l = sch.split(o, [None, cl])
    x_o, x_t = sch.split(x, [None, tile])
    # Chunks of output rows, each packing the input rows it reads inside the parallel loop:
    # packed in one pass over the map first, by both threads, every chunk read rows the
    # other core had just written (1.07-2.1x slower on the detector's and classifier's maps).
    cores = target_cores()
    row_chunks = _row_chunks(_extent(sch, y), cores)
    y_o, y_i = sch.split(y, [row_chunks, None])
    # Rows that do not split evenly over the cores (3 on two: one core did two) are cut into
    # bands of columns too, each packing the columns it reads; whole bands only (a band past
    # the edge is a predicate on the tap block, which tensorize rejects: PP-LCNet's 5x5
    # depthwise convs on 7x7 maps ran untensorized on AVX2).
    x_tiles = _extent(sch, x_o)
    col_chunks = cores if row_chunks % cores and x_tiles >= 2 * cores and x_tiles % cores == 0 else 1
    if col_chunks > 1:
        x_c, x_o = sch.split(x_o, [col_chunks, None])
        sch.reorder(n, y_o, x_c, y_i, x_o, o_o, ry, rx, x_t, o_l)
        chunk, parallel = x_c, (n, y_o, x_c)
    else:
        sch.reorder(n, y_o, y_i, x_o, o_o, ry, rx, x_t, o_l)
        chunk, parallel = y_o, (n, y_o)
    tail = _inline_epilogue(sch, block)
    # The epilogue after the tile's last channel vector, over all its channels at once where
    # their accumulators stay on the stack (``_ACC_SCOPE``): wider requantize vectors and stores
    # (AVX2: the detector's 16-channel 160x160 kernel 1.22x faster, 48 channels 1.07-1.15x).
    # Larger tiles came from the workspace pool in every iteration (PP-LCNet's 64-channel
    # kernels: the model 1.07x slower, though each kernel alone ran faster); the taps that test
    # padding inline were 0.76-0.91x. Otherwise after each channel vector.
    cp = int(sch.get(block).writes[0].source.shape[-1])
    at = x_o if not inline_pad and cl < cp and tile * cp * 4 < _STACK_ACC_BYTES else o_o
    if tail is not None:
        sch.reverse_compute_at(tail, at, preserve_unit_loops=True)
        _vectorize_channels(sch, tail, cl)
    else:
        local = sch.cache_write(block, 0, _ACC_SCOPE)
        sch.reverse_compute_at(local, at, preserve_unit_loops=True)
    if inline_pad:  # plain vectors: the condition in each tap's operand is no intrinsic's
        _finish(sch, block, parallel, ry, (x_t,), o_l, None, packed=True)
        return
    sch.compute_at(pack, chunk, preserve_unit_loops=True)
    # Pairs (int32) in vectors of at most one register (``channel_lanes`` divides the run): in
    # vectors of 32 lanes (four AVX2 registers, two conditional reads each) the recognizer's
    # 480-channel 5x5 stride (2, 1) kernel ran 0.91x its unpaired speed, 1.0x this way; the
    # detector's stride-2 ones 1.06-1.10x faster. (24 channels on 16 lanes as one 24-lane
    # vector: 5.8x slower.)
    pairs = act == "int32"  # the pair pack (``depthwise_tap_pairs``)
    widths = (kernel.lanes, kernel.lanes // 2, kernel.lanes // 4) if pairs else (64, 32, 16, 8, 4)
    # Padding columns split off as in ``_schedule_pack`` (the rows' test is one per row here):
    # the detector's 160x160 16-channel pair kernel 1.05x faster without a branch per vector.
    # (A band of columns packs from its own first column: the map's bounds are not its loop's.)
    _, _, col_lo, col_hi = (int(v) for v in sch.get(pack).annotations[PACK_INTERIOR_ATTR])
    cols = _partition(sch, sch.get_loops(pack)[-3], col_lo, col_hi)[0] if col_chunks == 1 else [None]
    for piece in cols:
        (blk,) = sch.get_child_blocks(piece) if len(cols) > 1 else [pack]
        _vectorize_channels_run(sch, sch.fuse(*sch.get_loops(blk)[-2:]), unroll=True, widths=widths)
    intrin = pair_tap_intrin(kernel, cl) if pairs else tap_intrin(kernel, cl, act)
    _finish(sch, block, parallel, ry, (x_t,), o_l, intrin, packed=True, macs_per_step=2 if pairs else 1)
