"""StackReduceToBinary: the importer's variadic Max/Min/Sum/Mean back into element-wise ops.

Needs: Relax as imported. The ONNX importer spells ``Max(a, b, ...)`` (and ``Min``, ``Sum``,
``Mean``) as ``max(stack((broadcast_to(a, S), broadcast_to(b, S), ...)), axis=0)``: every
operand is materialized at the full output shape ``S`` (a ``(1, 1, 1, 1)`` constant operand
becomes a whole feature map of constants once folded), and a conv followed by such a reduction
is not followed by an element-wise op, so no epilogue, layout or pooling rewrite sees it. Each
becomes the pairwise ``maximum(maximum(a, b), ...)`` (``minimum``, ``add``; ``Mean`` divides the
sum by the count), which ONNX defines the ops to be (element-wise, multidirectional
broadcasting) and which the bound ops broadcast themselves. Max and Min are exact; the sums
add in the same order as the reduction.

Runs right after import with the other canonicalizations, before the compression passes.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tvm_compress.relax_utils import copy_module, relax_functions, static_shape

# reduction over the stacked axis -> the pairwise op computing it
_PAIRWISE = {"relax.max": relax.op.maximum, "relax.min": relax.op.minimum,
             "relax.sum": relax.op.add, "relax.mean": relax.op.add}


def _operand(field, var2val, shape):
    """A stacked operand without the importer's ``broadcast_to(x, S)`` around it."""
    value = var2val.get(field, field)
    if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.broadcast_to")):
        if static_shape(value) == shape:
            return value.args[0]
    return field


@tvm.transform.module_pass(opt_level=0, name="StackReduceToBinary")
class StackReduceToBinary:
    """Rewrite ``reduce(stack(operands), axis=0)`` of every Relax function into pairwise ops
    (see the module docstring); other reductions stay."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        stacked = is_op("relax.stack")(wildcard())
        pattern = functools.reduce(lambda a, b: a | b, (is_op(name)(stacked) for name in _PAIRWISE))

        def rewrite(call, matches, var2val):
            stack = matches[stacked]
            fields = stack.args[0].fields if isinstance(stack.args[0], relax.Tuple) else None
            axis = call.attrs.axis
            if (fields is None or int(stack.attrs.axis) != 0 or axis is None or len(axis) != 1
                    or int(axis[0]) != 0 or call.attrs.keepdims):
                return call
            shape = static_shape(call)
            if shape is None:
                return call
            name = next(n for n in _PAIRWISE if call.op.same_as(tvm.ir.Op.get(n)))
            operands = [_operand(f, var2val, shape) for f in fields]
            shapes = [static_shape(x) for x in operands]
            if None in shapes:
                return call
            out = functools.reduce(_PAIRWISE[name], operands)
            if name == "relax.mean":
                dtype = str(call.ty.dtype)
                out = relax.op.divide(out, relax.const(np.array(len(operands), dtype), dtype))
            if list(np.broadcast_shapes(*shapes)) != shape:
                out = relax.op.broadcast_to(out, relax.ShapeExpr(shape))
            return out

        out = copy_module(mod)
        for gv, func in relax_functions(mod):
            bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings}
            out[gv] = rewrite_call(pattern, lambda c, m, v=bindings: rewrite(c, m, v), func)
        # the broadcasts the rewrite bypassed
        return relax.transform.DeadCodeElimination([gv.name_hint for gv, _ in relax_functions(out)])(out)
