"""Float dense layers whose output width is no whole number of vectors, padded to one: a kernel
hook of the CPU families.

CPU dense kernels (the default schedule and MetaSchedule's) vectorize along the output columns.
A width that no whole register divides leaves lanes empty in every vector: the PP-OCRv4
recognizer's 6625-class CTC head (6625 = 5^3 x 53) ran on vectors of 5 lanes, a third of an
AVX-512 register, at 2.2x onnxruntime's time. ``PadDenseColumns`` gives a float ``matmul`` with
a constant 2-D weight zero columns up to the next whole register where that fills the
registers better than the widths that divide it, and takes the real columns back with a slice
(layers of at least ``MIN_MACS``).

Runs before legalization, after the int8, sparse and binary rewrites (their kernels are no
float matmul). Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const, const_value, copy_module, is_constant

from .base import KernelHook
from .cpu_schedule import vector_width

_OP_MATMUL = tvm.ir.Op.get("relax.matmul")
# The slice is a kernel of its own: on smaller layers (the recognizer's 40x120x360 neck
# matmuls) it cost more than the fuller registers saved.
MIN_MACS = 1 << 22


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


@mutator
class _PadColumns(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.padded = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_MATMUL) or not is_constant(call.args[1]):
            return call
        weight = const_value(call.args[1])
        if weight.ndim != 2 or weight.dtype != np.float32 or call.ty.dtype != "float32":
            return call
        columns = weight.shape[1]
        padded = padded_columns(columns, self.lanes)
        rows = 1
        for d in list(call.ty.shape)[:-1]:
            rows *= int(d) if isinstance(d, tvm.tirx.IntImm) else 1 << 20
        if padded == columns or rows * weight.shape[0] * columns < MIN_MACS:
            return call
        self.padded += 1
        wide = np.pad(weight, ((0, 0), (0, padded - columns)))
        out = self.builder_.emit(with_layer(relax.op.matmul(call.args[0], const(wide)), call))
        return relax.op.strided_slice(out, axes=[len(call.ty.shape) - 1], begin=[0], end=[columns])


@tvm.transform.module_pass(opt_level=0, name="PadDenseColumns")
class PadDenseColumns:
    """Float matmuls with constant weights -> the same on zero-padded columns, sliced back,
    where whole registers of ``lanes`` float32 fit the padded width better."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = None
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter = _PadColumns(mod, self.lanes)
                func = rewriter.visit_expr(func)
                if rewriter.padded:
                    out = out or copy_module(mod)
                    out[gv] = func
        return relax.transform.Normalize()(out) if out is not None else mod


class DenseColumnsKernels(KernelHook):
    """On unless a preset sets ``features.pad_dense_columns = false``."""

    name = "dense_columns"
    feature = "pad_dense_columns"
    default_on = True

    def rewrites(self, profile):
        from .base import get_family

        return [PadDenseColumns(get_family(profile.family).vector_lanes(profile))]


DENSE_COLUMNS = DenseColumnsKernels()
