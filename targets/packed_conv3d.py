"""Channels-last 3-D convolutions (video models) with their weight in column panels, by bands
of output frames: the kernels ``packed_dense``'s hook gives an ungrouped NDHWC conv3d.

TVM legalizes a conv3d to TOPI's NCDHW loop nest, which the default schedule vectorizes along a
row of the map (7 or 14 floats deep in a ResNet3D's last stages) and runs over every temporal
tap, including the ones that read padding frames: with 1 or 2 frames left after the temporal
strides, two thirds or one third of the products are zeros times weights. Here the conv runs in
NDHWC on its ``[KT, KH, KW, I, O]`` weight packed as ``[O / P, KT, KH, KW, I, P]`` (the panels of
``packed_conv2d_nhwc``: the register tile's weight slice contiguous), and the output frames are
split into bands that read the same run of temporal taps (``tap_bands``), each band a kernel
over those taps only, with no temporal padding, the bands concatenated along the frames.
Numbers: docs/benchmarks.md ("ResNet3D").
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from .conv_geometry import conv_geometry, tap_bands


def pack_conv3d_weight(weight: np.ndarray, panel: int) -> np.ndarray:
    """DHWIO ``[KT, KH, KW, I, O]`` -> ``[O / panel, KT, KH, KW, I, panel]``."""
    kt, kh, kw, ci, co = weight.shape
    return np.ascontiguousarray(weight.reshape(kt, kh, kw, ci, co // panel, panel).transpose(4, 0, 1, 2, 3, 5))


def frame_bands(frames: int, kernel: int, front: int, back: int, stride: int, dilation: int):
    """[(first input frame, output frames, first kernel frame, kernel frames)] per band of
    output frames reading the same run of kernel frames, none of them padding; None where an
    output frame reads only padding (then the conv keeps its temporal padding)."""
    out = (frames + front + back - dilation * (kernel - 1) - 1) // stride + 1
    bands = tap_bands(frames, kernel, front, stride, dilation, out)
    return None if bands is None else [(t0 * stride + first * dilation - front, t1 - t0, first, last - first + 1)
                                       for t0, t1, first, last in bands]


def packed_conv3d_ndhwc(data: te.Tensor, panels: te.Tensor, strides, padding, dilation, band=None) -> te.Tensor:
    """NDHWC ``data`` x the weight in panels -> NDHWC. ``padding``: Relax's six values (front,
    top, left, back, bottom, right). ``band`` (``frame_bands``' tuple): those output frames
    from those kernel frames; None: every output frame from every kernel frame. The pad stage
    holds only the frames the kernel reads (a band of one frame padded all eight of
    ResNet3D-18's first stage and ran 1.2x slower per product)."""
    n, t, h, w, ci = (int(d) for d in data.shape)
    blocks, kt, kh, kw, _, panel = (int(d) for d in panels.shape)
    front, top, left, back, bottom, right = (int(v) for v in padding)
    st, dt = int(strides[0]), int(dilation[0])
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow) = conv_geometry(
        h, w, kh, kw, (top, left, bottom, right), strides[1:], dilation[1:])
    if band is None:
        band = (-front, (t + front + back - dt * (kt - 1) - 1) // st + 1, 0, kt)
    first, frames, tap0, taps = band
    span = (frames - 1) * st + (taps - 1) * dt + 1  # input frames read, from ``first``
    if pt or pl or pb or pr or first < 0 or first + span > t:
        source, start = data, first

        def padded(b, z, y, x, c):
            bounds = [(start + z, start < 0, start + span > t, t), (y - pt, pt, pb, h), (x - pl, pl, pr, w)]
            inside = [cond for i, low, high, size in bounds
                      for cond in ([i >= 0] if low else []) + ([i < size] if high else [])]
            return tirx.if_then_else(tirx.all(*inside), source[b, start + z, y - pt, x - pl, c],
                                     tirx.const(0.0, data.dtype))

        data = te.compute((n, span, h + pt + pb, w + pl + pr, ci), padded, name="pad_temp")
        first = 0
    rt = te.reduce_axis((0, taps), name="rt")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, ci), name="rc")
    return te.compute(
        (n, frames, oh, ow, blocks * panel),
        lambda b, z, y, x, o: te.sum(
            data[b, first + z * st + rt * dt, y * sh + ry * dh, x * sw + rx * dw, rc]
            * panels[o // panel, tap0 + rt, ry, rx, rc, o % panel], axis=[rt, ry, rx, rc]),
        name="packed_conv3d")
