"""TeCallsToOps: element-wise TE kernels the ONNX importer emits back into Relax ops.

Needs: an imported module (the importer's ``Clip`` becomes ``call_tir(maximum, (x, lo))`` and
``call_tir(minimum, (x, hi))``, each bound a scalar computed from constants). Runs at import,
before the compression passes: as ``R.maximum`` / ``R.minimum`` these are element-wise
ops every pass understands (a channel pruned before a clip stays prunable, fusion and int8
epilogues see an op), and the compiled kernels are the same. A call is replaced only when its
PrimFunc is structurally the one TOPI builds for those shapes, so nothing else is touched.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, topi
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tvm_compress.relax_utils import copy_module, is_constant, relax_functions

# TOPI computes the importer uses, and the Relax op computing the same
_OPS = ((topi.maximum, relax.op.maximum), (topi.minimum, relax.op.minimum))


def _topi_func(compute, x, c):
    """The PrimFunc ``bb.emit_te(compute, x, c)`` makes for these argument types."""
    bb = relax.BlockBuilder()
    xv, cv = relax.Var("x", x.ty), relax.Var("c", c.ty)
    with bb.function("main", [xv, cv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(compute, xv, cv))
        bb.emit_func_output(out)
    mod = bb.get()
    return next(f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def _scalar_constant(expr, bindings) -> "relax.Constant | None":
    """``expr`` as a 0-d constant when it is one, or is computed from constants only (the
    importer's NaN-guarded clip bounds). Only those bindings are folded, in a function of their
    own: folding the whole model would also fold the dequantized weights of QDQ models."""
    if is_constant(expr):
        return expr if len(expr.value.shape) == 0 else None
    if not isinstance(expr, relax.Var) or expr not in bindings or expr.ty.ndim != 0:
        return None
    needed, todo = set(), [expr]
    while todo:
        var = todo.pop()
        if var in needed:
            continue
        value = bindings.get(var)
        if not isinstance(value, relax.Call):
            return None
        needed.add(var)
        todo += list(relax.analysis.free_vars(value))
    chain = [relax.VarBinding(v, value) for v, value in bindings.items() if v in needed]
    out = relax.Var("bound", expr.ty)
    body = relax.SeqExpr([relax.DataflowBlock(chain + [relax.VarBinding(out, expr)])], out)
    mod = tvm.IRModule({"main": relax.Function([], body, expr.ty)})
    folded = relax.transform.FoldConstant()(relax.transform.Normalize()(mod))["main"].body.body
    return folded if is_constant(folded) else None


@tvm.transform.module_pass(opt_level=0, name="TeCallsToOps")
class TeCallsToOps:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pattern = is_op("relax.call_tir")(wildcard(), wildcard())
        out = copy_module(mod)
        cache = {}

        def rewrite(call, _matches, var2val):
            if not isinstance(call, relax.Call):
                return call
            args = call.args[1]
            if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
                return call
            x, c = args.fields
            c = _scalar_constant(c, var2val)
            if c is None:
                return call
            prim = mod[call.args[0]]
            for compute, op in _OPS:
                key = (id(compute), str(x.ty), str(c.ty))
                if key not in cache:
                    cache[key] = _topi_func(compute, x, c)
                if tvm_ffi.structural_equal(prim, cache[key], map_free_vars=True):
                    return op(x, c)
            return call

        for gv, func in relax_functions(mod):
            # bindings in order (a dict keeps it): the scalar chains are folded from them
            bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings}
            out[gv] = rewrite_call(pattern, lambda c, m, v=bindings: rewrite(c, m, v), func)
        return relax.transform.DeadCodeElimination([gv.name_hint for gv, _ in relax_functions(out)])(out)
