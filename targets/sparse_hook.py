"""The block-sparse float32 kernels (``sparse_kernels``) as a kernel hook of the CPU families.

Needs: layers marked in the module attribute ``SPARSE_LAYERS_ATTR`` with ``"kernel": "sparse"``
(the pruning pass's block kind writes it after timing each layer both ways) whose weights are
constants: 1x1 convolutions (NCHW, stride 1, no padding, groups 1) and matmuls ``x @ W``.
Before fusion (``SparseLayers``), each such layer becomes a ``call_tir`` of a kernel generated
for its sparsity pattern, with only the kept blocks as a constant (the artifact shrinks); the
kernel is out-element-wise fusable, so bias and activation epilogues fuse into it. After fusion
(``ScheduleSparse``) those kernels get their parallel loop and their epilogue is vectorized;
they are marked scheduled, so tuning and the default schedules leave them alone.
Layers the kernels cannot take stay dense (and float); nothing else changes.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.dpl import is_const
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import layer_name, with_layer
from tvm_compress.relax_utils import const_value, tensor_shape
from tvm_compress.specs import sparse_layers

from .base import KernelHook
from .sparse_kernels import (
    bsr_from_dense,
    find_sparse_block,
    schedule_sparse,
    sparse_conv1x1,
    sparse_dense,
    target_isa,
)

_log = logging.getLogger("tvm_compress")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONST = is_const()
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable
# Kept blocks a kernel may bake in: its straight-line code (and compile time, ~3 ms per block)
# grows with them.
MAX_BLOCKS = 40000


def weight_2d(call: relax.Call) -> Optional[np.ndarray]:
    """The weight of a layer the sparse kernels can take, as [out, in]; None otherwise."""
    if not isinstance(call, relax.Call) or len(call.args) != 2 or not _CONST.match(call.args[1]):
        return None
    data, weight = call.args
    if str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32":
        return None
    try:
        [int(d) for d in data.ty.shape]
    except (TypeError, ValueError, tvm.TVMError):  # symbolic dimensions
        return None
    w = const_value(weight)
    if call.op.same_as(_CONV2D):
        a = call.attrs
        if not (
            w.ndim == 4 and w.shape[2:] == (1, 1) and int(a.groups) == 1
            and (a.data_layout, a.kernel_layout, a.out_layout) == ("NCHW", "OIHW", "NCHW")
            and all(int(v) == 1 for v in a.strides) and all(int(v) == 0 for v in a.padding)
            and all(int(v) == 1 for v in a.dilation) and str(a.out_dtype) in ("", "None", "void", "float32")
        ):
            return None
        return w.reshape(w.shape[:2])
    if call.op.same_as(_MATMUL):
        if w.ndim != 2 or len(data.ty.shape) < 2:
            return None
        return np.ascontiguousarray(w.T)
    return None


def why_dense(call: relax.Call, block: Tuple[int, int], lanes: int = 1) -> Optional[str]:
    """Why the sparse kernels cannot run this layer with ``block`` (None: they can)."""
    w = weight_2d(call)
    if w is None:
        return "not a stride-1 unpadded 1x1 conv or a matmul with a float32 constant weight"
    pixels = int(np.prod(tensor_shape(call.args[0])[2:])) if call.op.same_as(_CONV2D) else lanes
    if pixels < max(lanes, 2):  # the conv kernel vectorizes along pixels
        return f"{pixels} pixels: fewer than one vector"
    r, c = block
    if w.shape[0] % r or w.shape[1] % c:
        return f"block {r}x{c} does not divide the {w.shape[0]}x{w.shape[1]} weight"
    nnz = int(np.any(w.reshape(w.shape[0] // r, r, w.shape[1] // c, c) != 0, axis=(1, 3)).sum())
    if nnz > MAX_BLOCKS:
        return f"{nnz} kept blocks: more than the {MAX_BLOCKS} a kernel bakes in"
    return None


@mutator
class _Sparsify(PyExprMutator):
    def __init__(self, mod, marks: Dict[str, dict], isa):
        super().__init__(mod)
        self.marks = marks
        self.isa = isa
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = layer_name(call)
        mark = self.marks.get(name) if name else None
        if mark is None or mark.get("kernel") != "sparse":
            return call
        block = tuple(int(v) for v in mark["block"])
        reason = why_dense(call, block, self.isa.lanes)
        if reason is not None:
            _log.warning("sparse: layer %s stays dense (%s)", name, reason)
            return call
        bsr = bsr_from_dense(weight_2d(call), block)
        data = bsr.data if bsr.nnz_blocks else np.zeros((1, *block), "float32")
        options = {"lanes": self.isa.lanes, "registers": self.isa.registers, "chunks": self.isa.chunks}
        self.count += 1
        x = call.args[0]
        if call.op.same_as(_CONV2D):
            out = self.builder_.call_te(
                lambda xx, dd: sparse_conv1x1(xx, bsr, dd, **options), x, relax.const(data),
                primfunc_name_hint="bsr_conv1x1", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE})
            return with_layer(out, name)
        # matmul: leading dimensions flattened into the batch
        shape = [int(d) for d in x.ty.shape]
        rows = int(np.prod(shape[:-1]))
        flat = x if len(shape) == 2 else self.builder_.emit(relax.op.reshape(x, (rows, shape[-1])))
        out = with_layer(self.builder_.call_te(
            lambda xx, dd: sparse_dense(xx, bsr, dd, **options), flat, relax.const(data),
            primfunc_name_hint="bsr_dense", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), name)
        if len(shape) == 2:
            return out
        return relax.op.reshape(self.builder_.emit(out), (*shape[:-1], bsr.shape[0]))


@tvm.transform.module_pass(opt_level=0, name="SparseLayers")
class SparseLayers:
    """Run the layers marked ``"kernel": "sparse"`` with block-sparse kernels for ``target``."""

    def __init__(self, target: tvm.target.Target):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        marks = sparse_layers(mod)
        if not any(m.get("kernel") == "sparse" for m in marks.values()):
            return mod
        rewriter = _Sparsify(mod, marks, target_isa(self.target))
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                new = rewriter.visit_expr(func)
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return rewriter.builder_.get() if rewriter.count else mod


@tvm.transform.module_pass(opt_level=0, name="ScheduleSparse")
class ScheduleSparse:
    """Schedule every fused function holding a block-sparse kernel (after FuseTIR)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch = s_tir.Schedule(func)
            block = find_sparse_block(sch)
            if block is None:
                continue
            schedule_sparse(sch, block)
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return mod


class BlockSparseKernels(KernelHook):
    name = "block_sparse"
    feature = None  # offered on every preset of the family; the pruning pass decides per layer

    def rewrites(self, profile):
        return [SparseLayers(profile.tvm_target())]

    def schedules(self, profile):
        return [ScheduleSparse()]

    def facts(self, profile):
        # One float vector of output rows per block: each activation load feeds a whole vector.
        return {"sparse_block": (target_isa(profile.tvm_target()).lanes, 1)}


BLOCK_SPARSE = BlockSparseKernels()
