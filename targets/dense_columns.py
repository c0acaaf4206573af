"""Float dense layers whose output width is no whole number of vectors, padded to one: a kernel
hook of the CPU families.

CPU dense kernels (the default schedule and MetaSchedule's) vectorize along the output columns.
A width that no whole register divides leaves lanes empty in every vector: the PP-OCRv4
recognizer's 6625-class CTC head (6625 = 5^3 x 53) ran on vectors of 5 lanes, a third of an
AVX-512 register, at 2.2x onnxruntime's time. ``PadDenseColumns`` gives a float ``matmul`` with
a constant 2-D weight zero columns up to the next whole register where that fills the
registers better than the widths that divide it, and takes the real columns back with a slice
(layers of at least ``MIN_MACS``). A row count that no register tile of 4-8 rows divides (a
ViT's 197 tokens) gets zero rows up to a multiple of 8 the same way. Matmuls of two
activations (attention's Q x K^T and P x V) are padded too, by pad kernels on the operands: 197
score columns had no vector width at all (a 6x197x64x197 product took 4 ms, 95 us padded).
Channels-last convs (2-d and 3-d) with a constant weight are dense layers over their pixels and get zero
output channels the same way: an STFT front end's 257 frequency bins (openWakeWord's
melspectrogram, 257 = a prime) ran on one lane per vector, 8.5x slower than padded to 264.
Where the unpadded width fills under half the lanes, layers from ``MIN_MACS / 64`` are padded
(convs only then).

Runs before legalization, after the int8, sparse and binary rewrites (their kernels are no
float matmul). Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const, const_value, is_constant, permuted_constant, static_shape

from .base import KernelHook, rewrite_functions
from .cpu_schedule import vector_width

_OP_MATMUL = tvm.ir.Op.get("relax.matmul")
_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_OP_CONV3D = tvm.ir.Op.get("relax.nn.conv3d")
# channels-last data and weight layouts of the convs this pads
_CHANNELS_LAST = {"NHWC": "HWIO", "NDHWC": "DHWIO"}
# The slice is a kernel of its own: on smaller layers (the recognizer's 40x120x360 neck
# matmuls) it cost more than the fuller registers saved.
MIN_MACS = 1 << 22
# ... unless the padding at least doubles the lanes in use
_MIN_GAIN_MACS, _LANE_GAIN = MIN_MACS >> 6, 2.0
# Convs only for that, or where their rows run on vectors of a width no power of two (a masked
# register at every step: 230 channels on 10 of 16 lanes, or 5 of 8): a 64 -> 230 3x3 conv on
# 56x56 6.46 -> 4.22 ms padded to 240. Not for 24-72 channels on 16 lanes (MobileNets on
# AVX-512), on 8-lane vectors: padded to whole 16-lane registers they ran slower (72 -> 80:
# 1.40 -> 1.52 ms; 24 -> 32: 0.73 -> 0.91 ms; docs/benchmarks.md).
CONV_ANY_GAIN_FROM = float("inf")


def conv_macs(out_nhwc, weight_hwio) -> float:
    """MACs of an NHWC (NDHWC) conv with output shape ``out_nhwc`` and an HWIO (DHWIO) weight."""
    return float(np.prod(out_nhwc)) * float(np.prod(weight_hwio[:-1]))


def lane_use(columns: int, lanes: int) -> float:
    """Share of the vector lanes a row of ``columns`` outputs keeps busy in the CPU kernels
    (vectors of ``cpu_schedule.vector_width``)."""
    width = vector_width(columns, lanes) or 1
    return width / (-(-width // lanes) * lanes)


def padded_columns(columns: int, lanes: int) -> int:
    """``columns`` padded to whole registers when that wastes less than the lanes the unpadded
    width leaves empty (6625 -> 6640 on 16 lanes), else ``columns``."""
    padded = -(-columns // lanes) * lanes
    return padded if columns / padded > lane_use(columns, lanes) else columns


def worth_padding(columns: int, macs: float, lanes: int, any_gain_from: float = MIN_MACS) -> bool:
    """Whether a layer of ``macs`` with ``columns`` outputs per row gets padded columns: from
    ``any_gain_from`` MACs where padding fills the registers better at all, from ``MIN_MACS /
    64`` where it at least doubles the lanes in use."""
    padded = padded_columns(columns, lanes)
    if padded == columns:
        return False
    return macs >= any_gain_from or (macs >= _MIN_GAIN_MACS and columns / padded >= _LANE_GAIN * lane_use(columns, lanes))


def worth_padding_conv(columns: int, macs: float, lanes: int) -> bool:
    """``worth_padding`` for a channels-last conv's output channels (see CONV_ANY_GAIN_FROM)."""
    width = vector_width(columns, lanes)
    masked = macs >= MIN_MACS and width is not None and width & (width - 1) != 0
    return worth_padding(columns, macs, lanes, 0 if masked else CONV_ANY_GAIN_FROM)


# The default schedule's register tile takes up to 8 rows that divide the row count; with no
# divisor of 4 or more (197 tokens, a prime) the tile held one row and read each weight vector
# once per row: a ViT-S MLP matmul (197x384 by 384x1536) ran at 2.4 ms, 0.60 ms at 200 rows.
_ROW_TILE = 8


def padded_rows(rows: int) -> int:
    """``rows`` padded to a multiple of 8 where no tile of 4 to 8 rows divides it (at least 32
    rows, so that the padding costs at most a fifth), else ``rows``."""
    if rows < 32 or any(rows % f == 0 for f in range(4, _ROW_TILE + 1)):
        return rows
    return -(-rows // _ROW_TILE) * _ROW_TILE


@mutator
class _PadColumns(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.padded = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_OP_CONV2D) or call.op.same_as(_OP_CONV3D):
            return self._conv(call)
        if not call.op.same_as(_OP_MATMUL) or call.ty.dtype != "float32":
            return call
        second = call.args[1]
        if is_constant(second):
            weight = const_value(second)
            if weight.ndim != 2 or weight.dtype != np.float32:
                return call
            inner, columns = weight.shape
        else:  # an activation (attention's Q x K^T, P x V): padded by a kernel, not in the constant
            dims = static_shape(second)
            if dims is None or len(dims) < 2 or second.ty.dtype != "float32":
                return call
            inner, columns = dims[-2:]
        shape = list(call.ty.shape)
        rows = 1
        for d in shape[:-1]:
            rows *= int(d) if isinstance(d, tvm.tirx.IntImm) else 1 << 20
        macs = rows * inner * columns
        padded = padded_columns(columns, self.lanes) if worth_padding(columns, macs, self.lanes) else columns
        data_dims = static_shape(call.args[0])
        lines = int(shape[-2]) if len(shape) >= 2 and isinstance(shape[-2], tvm.tirx.IntImm) \
            and data_dims is not None and len(data_dims) >= 2 else None
        lines_padded = padded_rows(lines) if lines is not None and macs >= MIN_MACS else lines
        if padded == columns and lines_padded == lines:
            return call
        self.padded += 1
        data, ndim = call.args[0], len(shape)
        if lines_padded != lines:
            data = self.builder_.emit(relax.op.nn.pad(data, _pad_widths(len(data_dims), -2, lines_padded - lines)))
        if is_constant(second):
            second = const(np.pad(weight, ((0, 0), (0, padded - columns))))
        elif padded != columns:
            second = self.builder_.emit(relax.op.nn.pad(second, _pad_widths(len(dims), -1, padded - columns)))
        out = self.builder_.emit(with_layer(relax.op.matmul(data, second), call))
        return relax.op.strided_slice(out, axes=[ndim - 2, ndim - 1], begin=[0, 0], end=[lines or 1, columns]) \
            if lines_padded != lines else relax.op.strided_slice(out, axes=[ndim - 1], begin=[0], end=[columns])


    def _conv(self, call):
        """An ungrouped channels-last float conv (2-d or 3-d) with a constant HWIO (DHWIO)
        weight: zero output channels (the weight's last axis), sliced back."""
        attrs = call.attrs
        shape = static_shape(call)
        layout = str(attrs.data_layout)
        if shape is None or call.ty.dtype != "float32" or _CHANNELS_LAST.get(layout) != attrs.kernel_layout \
                or str(attrs.out_layout) not in ("", layout) or int(attrs.groups) != 1:
            return call
        weight = permuted_constant(self, call.args[1])
        if weight is None:
            return call
        columns = weight.shape[-1]
        if weight.dtype != np.float32 or not worth_padding_conv(columns, conv_macs(shape, weight.shape), self.lanes):
            return call
        self.padded += 1
        padded = padded_columns(columns, self.lanes)
        weight = const(np.pad(weight, [(0, 0)] * (weight.ndim - 1) + [(0, padded - columns)]))
        out = self.builder_.emit(with_layer(relax.Call(call.op, [call.args[0], weight], attrs), call))
        return relax.op.strided_slice(out, axes=[len(shape) - 1], begin=[0], end=[columns])


def _pad_widths(ndim: int, axis: int, after: int) -> list:
    """``relax.op.nn.pad``'s flat (before, after) list: ``after`` zeros at the end of ``axis``."""
    widths = [0] * (2 * ndim)
    widths[2 * (axis % ndim) + 1] = after
    return widths


@tvm.transform.module_pass(opt_level=0, name="PadDenseColumns")
class PadDenseColumns:
    """Float matmuls and channels-last convs -> the same on zero-padded columns (and a matmul's
    rows), sliced back, where whole registers of ``lanes`` float32 fit the padded width, or a
    4-8 row tile the padded rows, better."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_functions(mod, lambda m: _PadColumns(m, self.lanes), "padded")


class DenseColumnsKernels(KernelHook):
    """On unless a preset sets ``features.pad_dense_columns = false``."""

    name = "dense_columns"
    feature = "pad_dense_columns"
    default_on = True

    def rewrites(self, profile):
        return [PadDenseColumns(self.lanes(profile))]


DENSE_COLUMNS = DenseColumnsKernels()
