"""Small Relax helpers every pass uses: constants, shapes, dtypes, emitting bindings."""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_const

_CONST = is_const()
_OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
# Element-wise ops (one output element from the same element of each operand, broadcasting):
# bias, activations, a residual add, and a requantize (round, clamp, astype).
ELEMENTWISE_OPS = tuple(tvm.ir.Op.get(f"relax.{n}") for n in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "clip", "nn.relu",
    "sigmoid", "tanh", "exp", "erf", "sqrt", "negative", "abs", "nn.gelu", "nn.silu",
    "round", "floor", "ceil", "astype"))


def is_constant(expr) -> bool:
    return _CONST.match(expr)


def const_value(expr: relax.Expr) -> np.ndarray:
    return expr.value.numpy()


def scalar_value(expr):
    """The value of a constant with one element (a Python number), else None."""
    if not is_constant(expr):
        return None
    value = const_value(expr)
    return value.reshape(()).item() if value.size == 1 else None


def bound_call(mutator, expr, op):
    """``expr``'s value when it is a call of ``op``, through its variable binding in the function
    ``mutator`` (a ``PyExprMutator``) is building, else None."""
    value = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
    return value if isinstance(value, relax.Call) and value.op.same_as(op) else None


def permuted_constant(mutator, expr) -> Optional[np.ndarray]:
    """``expr``'s value when it is a constant or a permuted constant (a Gemm's ``transB``
    before constant folding, a conv's OIHW -> HWIO weight after ``ConvertLayout``), through its
    binding in the function ``mutator`` is building, else None."""
    if is_constant(expr):
        return const_value(expr)
    bound = bound_call(mutator, expr, _OP_PERMUTE)
    if bound is None or not is_constant(bound.args[0]):
        return None
    value = const_value(bound.args[0])
    axes = bound.attrs.axes
    axes = list(range(value.ndim))[::-1] if axes is None else [int(a) for a in axes]
    return np.ascontiguousarray(value.transpose(axes))


def use_counts(func: relax.Function) -> dict:
    """How many expressions read each variable of ``func`` (calls, tuples, block outputs)."""
    count: dict = {}

    def visit(expr):
        reads = expr.args if isinstance(expr, relax.Call) else expr.fields if isinstance(expr, relax.Tuple) \
            else [expr.body] if isinstance(expr, relax.SeqExpr) else []
        for arg in reads:
            if isinstance(arg, relax.Var):
                count[arg] = count.get(arg, 0) + 1

    relax.analysis.post_order_visit(func, visit)
    return count


def clip_bounds(call: relax.Call):
    """(lo, hi) of a ``clip`` call as floats (its bounds are PrimValues)."""
    return tuple(float(getattr(arg.value, "value", arg.value)) for arg in call.args[1:3])


def const(value: np.ndarray, dtype: Optional[str] = None) -> relax.Expr:
    value = np.asarray(value)
    if dtype is not None:
        value = value.astype(dtype)
    return relax.const(value, str(value.dtype))


def tensor_shape(expr: relax.Expr) -> List[int]:
    return [int(d) for d in expr.ty.shape]


def static_shape(expr) -> Optional[List[int]]:
    """``expr``'s shape when every dimension is a constant, else None."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return None
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in shape]
    return None if None in dims else dims


def tensor_dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def emit_like(builder, var, value, name: str = ""):
    """Emit ``value`` bound to a var of the same kind as ``var`` (dataflow var or block output)."""
    name = name or var.name
    if isinstance(var, relax.DataflowVar):
        return builder.emit(value, name)
    return builder.emit_output(value, name)


def copy_module(mod):
    """A new module holding the same functions: for passes whose tools update the module they
    are given (dlight's ApplyDefaultSchedule, ``mod[gv] = ...``) without touching the caller's."""
    import tvm

    return tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)


def relax_functions(mod):
    """(GlobalVar, Function) of every Relax function in ``mod``."""
    return [(gv, f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)]


def content_key(value: np.ndarray) -> tuple:
    """Equal for two arrays exactly when dtype, shape and bytes are equal."""
    return value.dtype.str, value.shape, hashlib.sha1(value.tobytes()).digest()


def constants(mod) -> List[np.ndarray]:
    """Every distinct tensor constant of the module's Relax functions (what the artifact stores):
    equal ones count once, as the library stores them (``passes.ShareConstants``)."""
    seen: Dict[int, np.ndarray] = {}
    by_content: Dict[tuple, np.ndarray] = {}

    def visit(expr):
        if is_constant(expr) and hash(expr) not in seen:
            value = seen[hash(expr)] = expr.value.numpy()
            by_content.setdefault(content_key(value), value)

    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
    return list(by_content.values())


def constant_bytes(mod) -> Dict[str, int]:
    """Bytes of the module's tensor constants by dtype."""
    totals: Dict[str, int] = {}
    for arr in constants(mod):
        totals[str(arr.dtype)] = totals.get(str(arr.dtype), 0) + int(arr.nbytes)
    return totals
