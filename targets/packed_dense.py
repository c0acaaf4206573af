"""Float dense layers with their constant weight packed in column panels: a kernel hook of the
CPU families.

A matmul's weight ``[K, N]`` is row-major: the CPU kernels' register tile reads one vector of
``P`` columns per reduction step, ``N * 4`` bytes after the previous one (6 KB for a ViT-S MLP's
1536 columns), so every step touches a new cache line and page, and the prefetcher follows
``K`` interleaved streams. ``PackedDense`` stores such weights as panels ``[N / P, K, P]``,
``P`` being the tile's vector width (``cpu_schedule.vector_width``): a tile reads its panel
front to back, as onnxruntime's MLAS and XNNPACK pack theirs. Offline, so the stored bytes are
the same; the kernel is a TE ``call_tir`` marked out-element-wise fusable, so bias, activation
and slice epilogues still fuse into it, and MetaSchedule tunes it like any matmul.

Needs a float32 ``matmul`` whose second operand is a constant 2-D weight (or its transpose: a
Gemm with ``transB`` imported without ``fold``). Runs before
legalization, after ``PadDenseColumns`` (which pads the constant's columns to whole registers
first). Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const, const_value, is_constant

from .base import KernelHook
from .cpu_schedule import vector_width

_OP_MATMUL = tvm.ir.Op.get("relax.matmul")
_OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable


def pack_weight(weight: np.ndarray, panel: int) -> np.ndarray:
    """``[K, N]`` -> ``[N / panel, K, panel]``: column panels, each contiguous."""
    inner, columns = weight.shape
    return np.ascontiguousarray(weight.reshape(inner, columns // panel, panel).transpose(1, 0, 2))


def panel_width(columns: int, lanes: int):
    """Columns per panel for a weight of ``columns`` on ``lanes`` float32 lanes (the CPU tile's
    vector width); None where the weight stays as it is (no width, or a single panel)."""
    panel = vector_width(columns, lanes)
    return None if panel is None or panel == columns else panel


def packed_dense(data: te.Tensor, panels: te.Tensor) -> te.Tensor:
    """``data [..., M, K] x weight [K, N]`` from the packed weight ``[N / P, K, P]``."""
    _, inner, panel = (int(d) for d in panels.shape)
    columns = int(panels.shape[0]) * panel
    k = te.reduce_axis((0, inner), name="k")

    def body(*idx):
        j = idx[-1]
        return te.sum(data[(*idx[:-1], k)] * panels[j // panel, k, j % panel], axis=k)

    return te.compute((*data.shape[:-1], columns), body, name="packed_dense")


@relax.expr_functor.mutator
class _Pack(relax.expr_functor.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.packed = 0

    def _constant_weight(self, expr):
        """The weight as ``[K, N]`` when ``expr`` is a constant or a transposed constant (a Gemm
        with ``transB`` before constant folding), else None."""
        if is_constant(expr):
            return const_value(expr)
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if isinstance(bound, relax.Call) and bound.op.same_as(_OP_PERMUTE) and is_constant(bound.args[0]):
            axes = bound.attrs.axes
            value = const_value(bound.args[0])
            if value.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                return np.ascontiguousarray(value.T)
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_MATMUL) or call.ty.dtype != "float32":
            return call
        weight = self._constant_weight(call.args[1])
        data = call.args[0]
        if weight is None:
            return call
        if weight.ndim != 2 or weight.dtype != np.float32 or getattr(data.ty, "ndim", 0) < 2 \
                or data.ty.dtype != "float32":
            return call
        panel = panel_width(weight.shape[1], self.lanes)
        if panel is None:
            return call
        self.packed += 1
        out = self.builder_.call_te(packed_dense, data, const(pack_weight(weight, panel)),
                                    primfunc_name_hint="packed_dense",
                                    primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE})
        return with_layer(out, call)


@tvm.transform.module_pass(opt_level=0, name="PackedDense")
class PackedDense:
    """Float matmuls with a constant ``[K, N]`` weight -> a kernel reading it packed in panels
    of the vector width the CPU tile takes for ``lanes`` float32 lanes."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Pack(mod, self.lanes)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(rewriter.visit_expr(func)))
        return rewriter.builder_.get() if rewriter.packed else mod


class PackedDenseKernels(KernelHook):
    """On unless a preset sets ``features.pack_dense = false``."""

    name = "packed_dense"
    feature = "pack_dense"
    default_on = True

    def rewrites(self, profile):
        from .base import get_family

        return [PackedDense(get_family(profile.family).vector_lanes(profile))]


PACKED_DENSE = PackedDenseKernels()
