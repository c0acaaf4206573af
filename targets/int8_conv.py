"""Packed-weight int8 convolution: the compute and its hand schedule over a dot intrinsic.

The weight ``[OC, IC, KH, KW]`` is packed offline to ``[OC/lanes, IC/depth, KH, KW, lanes,
depth]`` (depthwise: ``[C/lanes, KH, KW/depth, lanes, depth]``), zero-padded to whole steps, so
one intrinsic call reads one contiguous block. The kernel's first stage packs the NCHW
activations the same way (zero padding, ``depth`` channels or taps innermost, the intrinsic's
dtype). The schedule keeps a register tile of ``tile_w`` output columns x ``tile_oc`` lane groups
in int32 accumulators over the whole reduction, then runs the fused epilogue (requantize) on it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tvm import s_tir, te, tirx

from .int8_intrin import KERNELS, DotKernel, register

# Block annotation that marks the convolution for ``schedule_packed_conv`` (set by the compute).
KERNEL_ATTR = "tvm_compress.int8_dot"
DEPTHWISE_ATTR = "tvm_compress.int8_depthwise"
# A parallel region costs microseconds to start: small packs and convolutions run serially.
_PARALLEL_MIN_ELEMS = 1 << 15
_PARALLEL_MIN_MACS = 1 << 18


def pack_weight(w: np.ndarray, kernel: DotKernel) -> np.ndarray:
    """OIHW int8 -> [OC/lanes, IC/depth, KH, KW, lanes, depth], zero-padded: IC to whole dot
    steps, OC to pairs of lane groups (the register tile holds two)."""
    oc, ic, kh, kw = w.shape
    step = kernel.lanes * (2 if oc > kernel.lanes else 1)
    ocp = -(-oc // step) * step
    icp = -(-ic // kernel.depth) * kernel.depth
    w = np.pad(w, ((0, ocp - oc), (0, icp - ic), (0, 0), (0, 0)))
    w = w.reshape(ocp // kernel.lanes, kernel.lanes, icp // kernel.depth, kernel.depth, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 2, 4, 5, 1, 3))


def _geometry(h, w, kh, kw, padding, strides, dilation):
    """Integer padding, strides, dilation and the output size of a convolution."""
    pt, pl, pb, pr = (int(v) for v in padding)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow)


def packed_conv2d(
    x: te.Tensor,
    wp: te.Tensor,
    out_channels: int,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    kernel_name: str,
) -> te.Tensor:
    """NCHW int8/uint8 x packed int8 -> NCHW int32 (``out_channels`` of them)."""
    kernel = KERNELS[kernel_name]
    n, ic, h, w = (int(v) for v in x.shape)
    ocb, icb, kh, kw, lanes, depth = (int(v) for v in wp.shape)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = _geometry(h, w, kh, kw, padding, strides, dilation)
    # Pack: zero padding (rows, columns; channels up to whole dot steps), channels in groups
    # of ``depth`` innermost, in the intrinsic's dtype: one pixel's group is one scalar load.
    dt = kernel.packed_dtype
    xpack = te.compute(
        (n, icb, h + pt + pb, w + pl + pr, depth),
        lambda b, c, y, xx, d: tirx.if_then_else(
            tirx.all(c * depth + d < ic, y >= pt, y < h + pt, xx >= pl, xx < w + pl),
            x[b, tirx.Min(c * depth + d, ic - 1), y - pt, xx - pl].astype(dt),
            tirx.const(0, dt),
        ),
        name="int8_pack",
    )
    rc = te.reduce_axis((0, icb * depth), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (n, ocb * lanes, oh, ow),
        lambda b, o, y, xx: te.sum(
            xpack[b, rc // depth, y * sh + ry * dh, xx * sw + rx * dw, rc % depth].astype("int32")
            * wp[o // lanes, rc // depth, ry, rx, o % lanes, rc % depth].astype("int32"),
            axis=[rc, ry, rx],
        ),
        name="int8_conv",
        attrs={KERNEL_ATTR: kernel_name},
    )
    if ocb * lanes == out_channels:
        return acc
    return te.compute(
        (n, out_channels, oh, ow), lambda b, o, y, xx: acc[b, o, y, xx], name="int8_conv_crop"
    )


def pack_depthwise_weight(w: np.ndarray, kernel: DotKernel) -> np.ndarray:
    """[C, 1, KH, KW] int8 -> [C/lanes, KH, KW/depth, lanes, depth], zero-padded: C to whole
    lane groups, KW to whole dot steps (the extra taps multiply zeros)."""
    c, _, kh, kw = w.shape
    cp = -(-c // kernel.lanes) * kernel.lanes
    kwp = -(-kw // kernel.depth) * kernel.depth
    w = np.pad(w[:, 0], ((0, cp - c), (0, 0), (0, kwp - kw)))
    w = w.reshape(cp // kernel.lanes, kernel.lanes, kh, kwp // kernel.depth, kernel.depth)
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1, 4))


def packed_depthwise_conv2d(
    x: te.Tensor,
    wp: te.Tensor,
    kernel_w: int,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    kernel_name: str,
) -> te.Tensor:
    """Depthwise NCHW int8/uint8 x packed int8 -> NCHW int32 (``kernel_w``: unpadded taps)."""
    kernel = KERNELS[kernel_name]
    n, c, h, w = (int(v) for v in x.shape)
    cb, kh, kj, lanes, depth = (int(v) for v in wp.shape)
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = _geometry(
        h, w, kh, kernel_w, padding, strides, dilation
    )
    # Pack: for each column, the ``depth`` taps it starts (columns x, x+dw, ...) of ``lanes``
    # channels side by side, so one call reads one contiguous block.
    dt = kernel.packed_dtype
    cols = (ow - 1) * sw + (kj - 1) * depth * dw + 1
    xpack = te.compute(
        (n, cb, h + pt + pb, cols, lanes, depth),
        lambda b, cc, y, xx, l, d: tirx.if_then_else(
            tirx.all(cc * lanes + l < c, y >= pt, y < h + pt, xx + d * dw >= pl, xx + d * dw < w + pl),
            x[b, tirx.Min(cc * lanes + l, c - 1), y - pt, tirx.Min(xx + d * dw - pl, w - 1)].astype(dt),
            tirx.const(0, dt),
        ),
        name="int8_pack",
    )
    ry = te.reduce_axis((0, kh), name="ry")
    rj = te.reduce_axis((0, kj), name="rj")
    rk = te.reduce_axis((0, depth), name="rk")
    acc = te.compute(
        (n, cb * lanes, oh, ow),
        lambda b, o, y, xx: te.sum(
            xpack[b, o // lanes, y * sh + ry * dh, xx * sw + rj * depth * dw, o % lanes, rk].astype("int32")
            * wp[o // lanes, ry, rj, o % lanes, rk].astype("int32"),
            axis=[ry, rj, rk],
        ),
        name="int8_conv",
        attrs={KERNEL_ATTR: kernel_name, DEPTHWISE_ATTR: 1},
    )
    if cb * lanes == c:
        return acc
    return te.compute((n, c, oh, ow), lambda b, o, y, xx: acc[b, o, y, xx], name="int8_conv_crop")


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def schedule_packed_conv(sch: s_tir.Schedule, block) -> None:
    """Schedule one ``packed_conv2d`` block (and its fused epilogue) in ``sch``."""
    register()
    annotations = sch.get(block).annotations
    kernel = KERNELS[str(annotations[KERNEL_ATTR])]
    lanes, depth = kernel.lanes, kernel.depth
    n, o, y, x, *reduction = sch.get_loops(block)
    if DEPTHWISE_ATTR in annotations:  # reduction: rows, tap groups, taps of a group
        r_outer, r_inner = reduction[:-1], reduction[-1]
        intrin = kernel.depthwise_intrin
    else:  # reduction: input channels (split into dot steps), rows, columns
        rc, ry, rx = reduction
        rc_o, r_inner = sch.split(rc, [None, depth])
        r_outer = [rc_o, ry, rx]
        intrin = kernel.intrin
    # Register tile: tile_w columns x tile_oc lane groups of int32 accumulators; each
    # activation group is reused tile_oc times (not for depthwise), each weight block tile_w times.
    ocb = _extent(sch, o) // lanes
    tile_oc = 2 if ocb % 2 == 0 else 1
    tile_w = _largest_divisor(_extent(sch, x), kernel.max_acc // tile_oc)
    o_o, o_t, o_l = sch.split(o, [None, tile_oc, lanes])
    x_o, x_t = sch.split(x, [None, tile_w])
    sch.reorder(n, o_o, y, x_o, *r_outer, x_t, o_t, o_l, r_inner)

    # Epilogue: inline the element-wise chain into its last block, run that on the tile.
    tail = None
    consumers = sch.get_consumers(block)
    while consumers:
        tail = consumers[0]
        if not sch.get_consumers(tail):
            break
        sch.compute_inline(tail)
        consumers = sch.get_consumers(block)
    if tail is not None:
        # Other element-wise inputs of the epilogue (e.g. a dequantized residual) into it too.
        for other in sch.get_producers(tail):
            if not sch.get(other).same_as(sch.get(block)):
                sch.compute_inline(other)
        sch.reverse_compute_at(tail, x_o, preserve_unit_loops=True)
        sch.set_scope(block, 0, "local")
        # Requantize a lane vector at a time: accumulators and per-channel scales are
        # contiguous along the lanes (only the NCHW store is strided).
        *_, t_c, t_h, t_w = sch.get_loops(tail)
        if _extent(sch, t_c) % lanes == 0:
            t_co, t_cl = sch.split(t_c, [None, lanes])
            sch.reorder(t_co, t_h, t_w, t_cl)
            sch.vectorize(t_cl)
    else:
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, x_o, preserve_unit_loops=True)
    # Lanes contiguous in the accumulator tile: one vector register holds one call's C.
    sch.transform_layout(block, ("write", 0), lambda b, c, h, w: (b, c // lanes, h, w, c % lanes))
    # Packing stage: its own loop nest (the weight is a parameter, so it is the one producer).
    (pack,) = sch.get_producers(block)
    loops = sch.get_loops(pack)
    if np.prod([_extent(sch, l) for l in loops]) >= _PARALLEL_MIN_ELEMS:
        sch.parallel(sch.fuse(*loops[:2]))
    sch.vectorize(sch.fuse(*loops[4:]) if len(loops) > 5 else loops[-1])
    macs = np.prod([_extent(sch, l) for l in sch.get_loops(block)])
    if macs >= _PARALLEL_MIN_MACS:
        sch.parallel(sch.fuse(n, o_o, y))
    init = sch.decompose_reduction(block, r_outer[0])
    sch.tensorize(o_l, intrin)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(x_t)
    sch.unroll(o_t)
