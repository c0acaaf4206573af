"""Convolutions that compute only the rows and columns their pool reads: a kernel hook of the
CPU families.

A pool without bottom/right padding and in floor mode drops the map's last rows and columns
where its windows do not reach them: a 2x2, stride-2 max pool on a 7x7 map reads 6x6 of it.
The conv before it (and its bias, activation and requantize) still computes all 49 pixels: a
quarter of its work thrown away (LeNet- and VGG-style stacks on odd maps). ``TrimPooledConv``
gives such a conv less bottom/right padding, so that it computes just the rows and columns the
pool reads; its element-wise epilogue follows on the smaller map and the pool's output is the
same (its windows read the same values). Exact.

Needs: ``conv2d`` -> element-wise ops (each operand a scalar or constant along the map's rows
and columns, every intermediate read once) -> ``max_pool2d`` / ``avg_pool2d``, static shapes.
Where the conv's padding is too small to shed (the rows lie inside the input), it sheds what
it can. Runs before legalization, first among the kernel hooks' rewrites (the int8, layout
and packing rewrites see the trimmed conv). Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import List, Optional

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.relax_utils import ELEMENTWISE_OPS, copy_module, static_shape, use_counts

from .base import KernelHook

_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_POOLS = (tvm.ir.Op.get("relax.nn.max_pool2d"), tvm.ir.Op.get("relax.nn.avg_pool2d"))
# An int8 build's requantize before its pool, too (a per-axis scale along the map is refused:
# ``_varies_along`` reads every operand as broadcast from the right).
_EPILOGUE = (*ELEMENTWISE_OPS, tvm.ir.Op.get("relax.quantize"), tvm.ir.Op.get("relax.dequantize"))


def _axes(layout: str):
    """Positions of the rows and columns (H, W) in a 4-d layout string."""
    return layout.index("H"), layout.index("W")


def pool_reads(size: int, pool) -> int:
    """How many leading rows (or columns) of a ``size``-long axis a pool with this ``(kernel,
    stride, dilation, top padding, output size)`` reads."""
    kernel, stride, dilation, pad, out = pool
    return min(size, (out - 1) * stride + (kernel - 1) * dilation + 1 - pad)


def _varies_along(arg, shape, axes) -> bool:
    """Whether operand ``arg`` of an element-wise op of ``shape`` takes other values along the
    map's rows or columns (``axes``); True where its shape is unknown."""
    if not isinstance(getattr(arg, "ty", None), relax.TensorType):
        return False
    dims = static_shape(arg)
    if dims is None or shape is None:
        return True
    full = [1] * (len(shape) - len(dims)) + list(dims)
    return len(full) != len(shape) or any(full[a] != 1 for a in axes)


def epilogue_chain(lookup, uses: dict, expr, axes, accept, is_root) -> Optional[list]:
    """[(root, None), (element-wise op, the position of the chain's operand)...] from ``expr``
    back to the call ``is_root`` accepts (a conv): each value read once (``uses``), each op one
    ``accept(op, position)`` takes, every other operand the same at every pixel (``axes``: the
    rows and columns); None where it is not such a chain. ``lookup``: a variable's value."""
    chain = []
    while isinstance(expr, relax.Var) and uses.get(expr, 0) == 1:
        value = lookup(expr)
        if not isinstance(value, relax.Call):
            return None
        if is_root(value):
            return [(value, None), *chain[::-1]]
        shape = static_shape(value)
        along = [i for i, a in enumerate(value.args) if _varies_along(a, shape, axes)]
        if shape is None or len(along) != 1 or not accept(value, along[0]):
            return None
        chain.append((value, along[0]))
        expr = value.args[along[0]]
    return None


@mutator
class _Trim(PyExprMutator):
    def __init__(self, mod, uses: dict):
        super().__init__(mod)
        self.uses = uses
        self.trimmed = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not any(call.op.same_as(op) for op in _POOLS):
            return call
        attrs = call.attrs
        axes = _axes(str(attrs.layout))
        shape, out = static_shape(call.args[0]), static_shape(call)
        chain = epilogue_chain(self.lookup_binding, self.uses, call.args[0], axes,
                               lambda op, _at: any(op.op.same_as(e) for e in _EPILOGUE),
                               lambda value: value.op.same_as(_OP_CONV2D))
        pads = [int(p) for p in attrs.padding]
        if chain is None or shape is None or out is None or attrs.ceil_mode or pads[2] or pads[3]:
            return call
        out_axes = _axes(str(attrs.out_layout or attrs.layout))
        need = [pool_reads(shape[axis], (int(attrs.pool_size[i]), int(attrs.strides[i]), int(attrs.dilation[i]),
                                         pads[i], out[out_axes[i]]))
                for i, axis in enumerate(axes)]
        value = self._conv(chain[0][0], need, [shape[a] for a in axes])
        if value is None:
            return call
        for op, at in chain[1:]:
            args = list(op.args)
            args[at] = self.builder_.emit(value)
            value = relax.Call(op.op, args, op.attrs, op.ty_args)
        pooled = relax.Call(call.op, [self.builder_.emit(value)], attrs, call.ty_args)
        if static_shape(self.builder_.normalize(pooled)) != out:
            return call
        self.trimmed += 1
        return pooled

    def _conv(self, conv, need, sizes) -> Optional[relax.Expr]:
        """``conv`` with the bottom/right padding cut by whole strides, down to ``need`` rows
        and columns of its output where it has that much padding (as far as it has
        elsewhere), or None where it sheds none."""
        attrs = conv.attrs
        pads = [int(p) for p in attrs.padding]
        strides = [int(s) for s in attrs.strides]
        cut = [max(0, min(size - n, pads[2 + i] // strides[i])) for i, (n, size) in enumerate(zip(need, sizes))]
        if not any(cut):
            return None
        for i, rows in enumerate(cut):
            pads[2 + i] -= rows * strides[i]
        return relax.op.nn.conv2d(conv.args[0], conv.args[1], strides, pads, [int(d) for d in attrs.dilation],
                                  int(attrs.groups), str(attrs.data_layout), str(attrs.kernel_layout),
                                  attrs.out_layout, attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="TrimPooledConv")
class TrimPooledConv:
    """``pool(epilogue(conv2d(x, w)))`` where the pool reads only the first rows/columns of
    the conv's output -> the conv with less bottom/right padding, computing just those."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = None
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            trim = _Trim(mod, use_counts(func))
            func = trim.visit_expr(func)
            if trim.trimmed:
                out = out or copy_module(mod)
                out[gv] = relax.analysis.remove_all_unused(func)  # the untrimmed conv's bindings
        return relax.transform.Normalize()(out) if out is not None else mod


class PooledConvKernels(KernelHook):
    """On unless a preset sets ``features.trim_pooled_conv = false``."""

    name = "pooled_conv"
    feature = "trim_pooled_conv"
    default_on = True

    def rewrites(self, profile):
        return [TrimPooledConv()]


POOLED_CONV = PooledConvKernels()
