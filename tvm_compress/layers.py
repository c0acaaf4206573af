"""Stable layer identity: every compressible layer is named once, at import, after its ONNX node.

A layer is a convolution (1-d, 2-d, 3-d, transposed) or a matmul whose weight is a constant. Its name
travels on the Relax call itself, as the call's span (source name ``layer:<name>``): spans take
no part in structural equality, the C++ mutators keep them when they rebuild a call, and a pass
that replaces a layer's call gives the new calls the old one's name (``with_layer``). Reports,
``--quant-skip``-style options, speed tables and fallbacks join on that name; no pass needs the
ONNX file.

Names come from matching each layer's weight bytes with the weight initializers of the ONNX
Conv / ConvTranspose / Gemm / MatMul nodes (directly or through DequantizeLinear), so the
match survives reordering by the importer; a layer no node matches is named ``<op>_<index>``.
``layer_stats`` measures each named layer: params, MACs and the bytes of the constants its
calls use (int8 weights plus scales, ...).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax

from .relax_utils import constants, copy_module, is_constant, relax_functions, tensor_shape

_PREFIX = "layer:"
OP_CONV1D = tvm.ir.Op.get("relax.nn.conv1d")
OP_CONV1D_T = tvm.ir.Op.get("relax.nn.conv1d_transpose")
OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
OP_CONV2D_T = tvm.ir.Op.get("relax.nn.conv2d_transpose")
OP_CONV3D = tvm.ir.Op.get("relax.nn.conv3d")
OP_CONV3D_T = tvm.ir.Op.get("relax.nn.conv3d_transpose")
OP_MATMUL = tvm.ir.Op.get("relax.matmul")
_OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_OP_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
LAYER_OPS = {OP_CONV1D: "conv1d", OP_CONV1D_T: "conv1d_transpose", OP_CONV2D: "conv2d",
             OP_CONV2D_T: "conv2d_transpose", OP_CONV3D: "conv3d", OP_CONV3D_T: "conv3d_transpose",
             OP_MATMUL: "matmul"}
_ONNX_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_name(call) -> Optional[str]:
    """The layer a call belongs to (None: not part of a named layer)."""
    span = getattr(call, "span", None)
    if span is None:
        return None
    source = span.source_name.name
    return source[len(_PREFIX):] if source.startswith(_PREFIX) else None


def with_layer(call: relax.Call, layer) -> relax.Call:
    """``call`` named as ``layer`` (a name, or a call whose name to take; None: unchanged).

    Emit nested calls among its arguments first: the block builder rebuilds a call whose
    arguments it must bind, and the rebuilt call has no name."""
    name = layer if isinstance(layer, str) or layer is None else layer_name(layer)
    if name is None or not isinstance(call, relax.Call):
        return call
    span = tvm.ir.Span(tvm.ir.SourceName(_PREFIX + name), 0, 0, 0, 0)
    return relax.Call(call.op, call.args, call.attrs, call.ty_args, span)


def op_kind(call) -> Optional[str]:
    """``conv2d`` / ``matmul`` ... when ``call`` is a layer op, else None."""
    if not isinstance(call, relax.Call):
        return None
    for op, kind in LAYER_OPS.items():
        if call.op.same_as(op):
            return kind
    return None


def _consts_of(arg, var2val) -> List[relax.Constant]:
    """The constants a (weight) operand is made of: itself, or through permute_dims /
    dequantize (the int8 tensor first, then scale and zero point); [] for an activation."""
    arg = var2val.get(arg, arg) if isinstance(arg, relax.Var) else arg
    if is_constant(arg):
        return [arg]
    if isinstance(arg, relax.Call) and (arg.op.same_as(_OP_PERMUTE) or arg.op.same_as(_OP_DEQUANTIZE)):
        inner = _consts_of(arg.args[0], var2val)
        return inner + [a for a in arg.args[1:] if is_constant(a)] if inner else []
    return []


def _key(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return hashlib.sha1(arr.tobytes() + str(arr.dtype).encode() + str(arr.shape).encode()).hexdigest()


def onnx_layer_names(model) -> Dict[str, List[str]]:
    """Weight key -> names of the ONNX layer nodes with that weight, in graph order."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    names: Dict[str, List[str]] = defaultdict(list)
    used = set()
    for node in model.graph.node:
        if node.op_type not in _ONNX_LAYER_OPS or len(node.input) < 2:
            continue
        source = dequantized.get(node.input[1], node.input[1])
        if source not in inits:
            continue
        name = node.name or node.output[0]
        base, k = name, 2
        while name in used:  # exporters do not always give unique names
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[_key(numpy_helper.to_array(inits[source]))].append(name)
    return names


@tvm.transform.module_pass(opt_level=0, name="NameLayers")
class NameLayers:
    """Name every layer call of every Relax function (see the module docstring).

    ``names``: weight key -> candidate names (``onnx_layer_names``); without it, every layer is
    named ``<op>_<index>``."""

    def __init__(self, names: Optional[Dict[str, List[str]]] = None):
        self.names = names or {}

    def transform_module(self, mod, _ctx):
        from tvm.relax.expr_functor import PyExprMutator, mutator

        pool = {k: list(v) for k, v in self.names.items()}
        count = [0]

        @mutator
        class _Namer(PyExprMutator):
            def __init__(self, mod, var2val):
                super().__init__(mod)
                self.var2val = var2val

            def visit_call_(self, call):
                call = super().visit_call_(call)
                kind = op_kind(call)
                if kind is None or layer_name(call) is not None or len(call.args) < 2:
                    return call
                weights = _consts_of(call.args[1], self.var2val)
                if not weights:
                    return call
                candidates = pool.get(_key(weights[0].value.numpy()))
                name = candidates.pop(0) if candidates else f"{kind}_{count[0]}"
                count[0] += 1
                return with_layer(call, name)

        out = copy_module(mod)
        for gv, func in relax_functions(mod):
            out[gv] = _Namer(mod, relax.analysis.get_var2val(func)).visit_expr(func)
        return out


def layer_stats(mod: tvm.IRModule) -> Dict[str, Dict]:
    """Per named layer: op, params (elements of its weight), MACs, and weight_bytes: the bytes
    of every constant the layer's calls use (weights, scales, zero points ...)."""
    out: Dict[str, Dict] = {}
    for _, func in relax_functions(mod):
        var2val = relax.analysis.get_var2val(func)
        counted: Dict[str, set] = defaultdict(set)

        def visit(expr):
            name = layer_name(expr)
            if name is None or not isinstance(expr, relax.Call):
                return
            rec = out.setdefault(name, {"op": None, "params": 0, "macs": 0, "weight_bytes": 0})
            kind = op_kind(expr)
            if kind is not None and rec["op"] is None and len(expr.args) > 1:
                weights = _consts_of(expr.args[1], var2val)
                if weights:
                    w = weights[0].value.numpy()
                    rec.update(op=kind, params=int(w.size), macs=_macs(kind, expr, w))
            for arg in expr.args:
                for c in _consts_of(arg, var2val):
                    if hash(c) not in counted[name]:
                        counted[name].add(hash(c))
                        rec["weight_bytes"] += int(c.value.numpy().nbytes)

        relax.analysis.post_order_visit(func, visit)
    return out


def _macs(kind: str, call: relax.Call, weight: np.ndarray) -> int:
    out = int(np.prod(tensor_shape(call)))
    if kind == "matmul":
        return out * int(tensor_shape(call.args[0])[-1])
    if kind.endswith("_transpose"):
        # every input element meets (out channels per group) x kh x kw weights
        return int(np.prod(tensor_shape(call.args[0]))) * int(np.prod(weight.shape[1:]))
    return out * int(np.prod(weight.shape[1:]))


def totals(stats: Dict[str, Dict]) -> Tuple[int, int]:
    """(params, MACs) summed over the layers."""
    return (sum(r["params"] for r in stats.values()), sum(r["macs"] for r in stats.values()))


def weight_stats(mod: tvm.IRModule) -> Dict[str, int]:
    """Elements and bytes of every distinct tensor constant: what the library stores."""
    arrays = constants(mod)
    return {"params": sum(int(a.size) for a in arrays), "bytes": sum(int(a.nbytes) for a in arrays)}
