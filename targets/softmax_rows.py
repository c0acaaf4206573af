"""Float softmax rows whose length is no whole number of vectors, padded to one with -inf: a
kernel hook of the CPU families.

The default CPU schedule runs a softmax row by row, its max and sum as lane-wise vector
reductions (``cpu_schedule``), which need a row of whole vectors. Attention over a ViT's 197
tokens has rows of 197 scores: no vector width divides them, and the reductions ran one
element at a time (1.85 ms of two ViT-S blocks' 14 ms). ``PadSoftmaxRows`` pads such a row with
``-inf`` up to whole registers and slices the real columns back: ``exp(-inf - max)`` is exactly
0, so the max, the sum and every real output are unchanged. Rows of at least ``MIN_ELEMS``
elements in all (the schedule runs smaller kernels serially, where padding gains nothing).

Runs before legalization, with the other CPU kernel hooks. Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.relax_utils import static_shape

from .base import KernelHook, rewrite_functions
from .cpu_schedule import PARALLEL_MIN_ELEMS
from .dense_columns import padded_columns

_OP_SOFTMAX = tvm.ir.Op.get("relax.nn.softmax")
MIN_ELEMS = PARALLEL_MIN_ELEMS


@mutator
class _PadRows(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.padded = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_SOFTMAX) or call.ty.dtype != "float32":
            return call
        dims = static_shape(call.args[0])
        if not dims or int(call.attrs.axis) % len(dims) != len(dims) - 1:
            return call  # along another axis than the row: not a row of contiguous scores
        columns = dims[-1]
        padded = padded_columns(columns, self.lanes)
        if padded == columns or math.prod(dims) < MIN_ELEMS:
            return call
        self.padded += 1
        widths = [0] * (2 * len(dims))
        widths[-1] = padded - columns
        wide = self.builder_.emit(relax.op.nn.pad(call.args[0], widths, pad_value=float("-inf")))
        out = self.builder_.emit(relax.op.nn.softmax(wide, axis=-1))
        return relax.op.strided_slice(out, axes=[len(dims) - 1], begin=[0], end=[columns])


@tvm.transform.module_pass(opt_level=0, name="PadSoftmaxRows")
class PadSoftmaxRows:
    """Float32 softmax along the last axis -> the same on rows padded with -inf to whole
    registers of ``lanes`` float32, sliced back, where that fills the registers better."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_functions(mod, lambda m: _PadRows(m, self.lanes), "padded")


class SoftmaxRowsKernels(KernelHook):
    """On unless a preset sets ``features.pad_softmax_rows = false``."""

    name = "softmax_rows"
    feature = "pad_softmax_rows"
    default_on = True

    def rewrites(self, profile):
        return [PadSoftmaxRows(self.lanes(profile))]


SOFTMAX_ROWS = SoftmaxRowsKernels()
