"""ONNX ``Einsum`` nodes that are (batched) matrix products -> ``Transpose``/``Reshape`` + ``MatMul``.

Attention layers exported from PyTorch often spell their products as einsums (MaxViT:
``bghid,bghjd->bghij`` for ``q k^T`` and ``bghij,bghjd->bghid`` for ``attn v``). TVM's importer
turns an einsum into one generic reduction kernel, which no matmul schedule or pass
recognizes; where both operands run along the contracted index (``q k^T``) its default
schedule reads one of them with a stride per vector lane (MaxViT's: 0.8 ms for 10 MMAC, its
``attn v`` 0.09 ms). With shapes fixed, such an einsum is each operand transposed and
reshaped to ``[batch..., M, K]`` and ``[batch..., K, N]``, one ``MatMul``, and the result
reshaped and transposed to the output's order (identity steps left out). Exact: the same
products, summed over the same indices.

Runs in ``prepare_onnx`` after shapes are inferred, like the recurrent unrolling; onnxruntime
still runs the original model. Einsums with one operand or more than two, ellipses, implicit
outputs, repeated indices (diagonals), an index summed within one operand, an outer product,
or batch indices whose sizes differ (broadcasting) stay as they are.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper

from .onnx_rnn import Emitter, graph_shapes

_MATMUL_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                 onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64}


def _plan(equation: str, a_shape, b_shape) -> Optional[tuple]:
    """(a, b, batch, a_free, contracted, b_free, out, size) index letters and sizes, or None when
    the einsum is not a matrix product of its two operands."""
    text = equation.replace(" ", "")
    if "..." in text or "->" not in text:
        return None
    ins, out = text.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(a) != len(a_shape) or len(b) != len(b_shape):
        return None
    if any(len(set(s)) != len(s) for s in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    size: Dict[str, int] = {}
    for letters, shape in ((a, a_shape), (b, b_shape)):
        for ch, dim in zip(letters, shape):
            if dim <= 0 or size.setdefault(ch, dim) != dim:
                return None  # unknown, broadcast or mismatched
    batch = [c for c in out if c in a and c in b]
    contracted = [c for c in a if c in b and c not in out]
    a_free = [c for c in out if c in a and c not in b]
    b_free = [c for c in out if c in b and c not in a]
    if not contracted or len(batch) + len(contracted) + len(a_free) != len(a) \
            or len(batch) + len(contracted) + len(b_free) != len(b):
        return None  # an outer product, or an index summed within one operand
    return a, b, batch, a_free, contracted, b_free, out, size


def _arrange(em: Emitter, x: str, letters: str, order: List[str], size: Dict[str, int], shape: List[int]) -> str:
    """``x`` (indexed by ``letters``) transposed to ``order`` and reshaped to ``shape``."""
    perm = [letters.index(c) for c in order]
    if perm != list(range(len(perm))):
        x = em.op("Transpose", [x], perm=perm)
    if [size[c] for c in order] != shape:
        x = em.reshape(x, shape)
    return x


def _rewrite(node: onnx.NodeProto, plan: tuple, em: Emitter) -> None:
    a, b, batch, a_free, contracted, b_free, out, size = plan
    dims = [size[c] for c in batch]
    m, k, n = (int(np.prod([size[c] for c in group], dtype=np.int64)) for group in (a_free, contracted, b_free))
    lhs = _arrange(em, node.input[0], a, batch + a_free + contracted, size, dims + [m, k])
    rhs = _arrange(em, node.input[1], b, batch + contracted + b_free, size, dims + [k, n])
    natural = batch + a_free + b_free
    perm = [natural.index(c) for c in out]
    reshaped = [size[c] for c in natural] != dims + [m, n]
    transposed = perm != list(range(len(perm)))
    res = em.op("MatMul", [lhs, rhs], None if reshaped or transposed else node.output[0])
    if reshaped:
        res = em.reshape(res, [size[c] for c in natural], None if transposed else node.output[0])
    if transposed:
        em.op("Transpose", [res], node.output[0], perm=perm)


def einsums_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every ``Einsum`` of ``model``'s main graph that is a matrix product of
    its two inputs with known shapes; returns how many."""
    graph = model.graph
    if not any(n.op_type == "Einsum" for n in graph.node):
        return 0
    shapes = graph_shapes(graph, {})
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    elem.update({i.name: i.data_type for i in graph.initializer})
    nodes, count = [], 0
    for node in graph.node:
        plan = None
        if node.op_type == "Einsum" and len(node.input) == 2 and not node.domain \
                and elem.get(node.input[0]) in _MATMUL_TYPES:
            eq = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
            a_shape, b_shape = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a_shape is not None and b_shape is not None:
                plan = _plan(eq.decode() if isinstance(eq, bytes) else eq, a_shape, b_shape)
        if plan is None:
            nodes.append(node)
            continue
        em = Emitter(f"{node.output[0]}/as_matmul")  # output names are unique, node names not always
        _rewrite(node, plan, em)
        nodes.extend(em.nodes)
        graph.initializer.extend(em.inits)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count
