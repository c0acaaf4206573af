"""Convolution geometry shared by the CPU kernels: output sizes, and the kernel rows that reach
the map from each output row (a window that skips padding rows on maps shorter than the kernel).
"""

from __future__ import annotations

from tvm import tirx


def conv_geometry(h, w, kh, kw, padding, strides, dilation):
    """Integer padding, strides, dilation and the output size of a convolution."""
    pt, pl, pb, pr = (int(v) for v in padding)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return (pt, pl, pb, pr), (sh, sw), (dh, dw), (oh, ow)


def real_rows(h: int, kh: int, geometry):
    """Per output row, how many of the ``kh`` kernel rows read the map (not padding)."""
    (pt, _, _, _), (sh, _), (dh, _), (oh, _) = geometry
    return [sum(pt <= y * sh + r * dh < h + pt for r in range(kh)) for y in range(oh)]


def row_window(h: int, kh: int, geometry) -> int:
    """Kernel rows a windowed kernel runs per output row: the most that reach the map from any
    output row (all ``kh`` on maps taller than the kernel; 3 of 5 on 3 rows with padding 2)."""
    return max(real_rows(h, kh, geometry))


def first_row(y, kh: int, window: int, geometry):
    """The kernel row output row ``y`` starts its ``window`` rows at: its first real one,
    moved up where fewer than ``window`` rows follow in the kernel (those extra rows read
    padding, zeros). 0 where the window is the whole kernel.

    Undilated: ``min(max(pt - y * sh, 0), kh - window)``. Dilated rows are looked up per
    output row (few: the window is shorter than the kernel only on maps shorter than it);
    TVM 0.27 miscompiled the ``floordiv(pt - y * sh + dh - 1, dh)`` form inside a reduction
    (output row 1 of a 3x3 kernel with dilation 2 on 3 rows started at kernel row 0)."""
    (pt, _, _, _), (sh, _), (dh, _), (oh, _) = geometry
    if window == kh:
        return 0
    if dh == 1:
        return tirx.min(tirx.max(pt - y * sh, 0), kh - window)
    firsts = [min(max(-(-(pt - r * sh) // dh), 0), kh - window) for r in range(oh)]
    dtype = str(y.ty)
    value = tirx.const(firsts[-1], dtype)
    for row in range(oh - 2, -1, -1):
        value = tirx.Select(y == row, tirx.const(firsts[row], dtype), value)
    return value


def tap_bands(size: int, kernel: int, pad: int, stride: int, dilation: int, out: int):
    """Along one axis: [(first output, end output, first tap, last tap)] per band of outputs
    that read the map with the same run of kernel taps (output ``y`` with tap ``r`` reads
    ``y * stride + r * dilation - pad``); None where some output reads only padding."""
    found = []
    for y in range(out):
        taps = [r for r in range(kernel) if 0 <= y * stride + r * dilation - pad < size]
        if not taps:
            return None
        if found and found[-1][2:] == [taps[0], taps[-1]]:
            found[-1][1] = y + 1
        else:
            found.append([y, y + 1, taps[0], taps[-1]])
    return [tuple(b) for b in found]
