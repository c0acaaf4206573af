"""TeCallsToOps: TE kernels the ONNX importer emits back into Relax ops.

Needs: an imported module (the importer's ``Clip`` becomes ``call_tir(maximum, (x, lo))`` and
``call_tir(minimum, (x, hi))``, each bound a scalar, most often computed from constants; its
``Pad`` becomes ``call_tir(pad, (x,))``, or ``mirror_pad`` / ``replicate_pad`` for the reflect
and edge modes). Runs at import, before the compression
passes: as ``R.maximum`` / ``R.minimum`` / ``R.nn.pad`` these are ops every pass understands (a
channel pruned before a clip stays prunable, fusion and int8 epilogues see an op, a model with a
``Pad`` that onnxruntime's load-time fusion does not fold into a conv, such as one before a
reshape, can still change layout), and the compiled kernels compute the same. A call is replaced
only when its PrimFunc is structurally the one TOPI builds for those shapes, so nothing else is
touched. Pads are recognized with value zero (the ONNX default), reflected or replicating
the edge, and at most ``_MAX_PAD_TRIES`` ways to split the padding.
"""

from __future__ import annotations

import itertools

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, topi
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from tvm_compress.relax_utils import copy_module, is_constant, relax_functions, static_shape

# TOPI computes the importer uses, and the Relax op computing the same
_OPS = ((topi.maximum, relax.op.maximum), (topi.minimum, relax.op.minimum))
_MAX_PAD_TRIES = 256


def _te_func(compute, *args):
    """The PrimFunc ``bb.emit_te(compute, *args)`` makes for these argument types."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", a.ty) for i, a in enumerate(args)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(compute, *params))
        bb.emit_func_output(out)
    mod = bb.get()
    return next(f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


# TOPI pads the importer emits for ONNX ``Pad`` modes, and ``R.nn.pad``'s mode computing the same
_PADS = (
    (lambda t, b, a: topi.nn.pad(t, b, a, 0.0), "constant"),
    (lambda t, b, a: topi.nn.mirror_pad(t, b, a, "REFLECT"), "reflect"),
    (lambda t, b, a: topi.nn.replicate_pad(t, b, a), "replicate"),
)


def _pad_widths(prim, x, call, cache) -> "tuple | None":
    """``R.nn.pad``'s widths and mode when ``prim`` is one of TOPI's pads (``_PADS``) of ``x``
    to ``call``'s shape: each way of splitting the shapes' difference before/after is built
    and compared, the even splits first."""
    src, dst = static_shape(x), static_shape(call)
    if src is None or dst is None or len(src) != len(dst) or any(d < s for s, d in zip(src, dst)):
        return None
    extra = [d - s for s, d in zip(src, dst)]
    if not any(extra) or np.prod([e + 1 for e in extra]) > _MAX_PAD_TRIES:
        return None
    splits = sorted(itertools.product(*(range(e + 1) for e in extra)),
                    key=lambda before: sum(abs(2 * b - e) for b, e in zip(before, extra)))
    for before in splits:
        after = [e - b for e, b in zip(extra, before)]
        for index, (compute, mode) in enumerate(_PADS):
            key = ("pad", index, str(x.ty), tuple(before), tuple(after))
            if key not in cache:
                cache[key] = _te_func(lambda t, b=list(before), a=after, c=compute: c(t, b, a), x)
            if tvm_ffi.structural_equal(prim, cache[key], map_free_vars=True):
                return [w for pair in zip(before, after) for w in pair], mode
    return None


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
            if isinstance(args, relax.Tuple) and len(args.fields) == 1:
                found = _pad_widths(mod[call.args[0]], args.fields[0], call, cache)
                return call if found is None else relax.op.nn.pad(args.fields[0], found[0], found[1])
            if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
                return call
            x, c = args.fields
            # a bound computed from the data (a clip to the map's maximum minus 80 dB) stays a
            # variable; one computed from constants becomes the constant
            folded = _scalar_constant(c, var2val)
            if folded is not None:
                c = folded
            elif getattr(c.ty, "ndim", None) != 0:
                return call
            prim = mod[call.args[0]]
            for compute, op in _OPS:
                key = (id(compute), str(x.ty), str(c.ty))
                if key not in cache:
                    cache[key] = _te_func(compute, x, c)
                if tvm_ffi.structural_equal(prim, cache[key], map_free_vars=True):
                    return op(x, c)
            return call

        for gv, func in relax_functions(mod):
            # bindings in order (a dict keeps it): the scalar chains are folded from them
            bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings}
            out[gv] = rewrite_call(pattern, lambda c, m, v=bindings: rewrite(c, m, v), func)
        return relax.transform.DeadCodeElimination([gv.name_hint for gv, _ in relax_functions(out)])(out)
