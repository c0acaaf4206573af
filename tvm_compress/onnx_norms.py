"""Group norms exported as ``Reshape -> InstanceNormalization -> Reshape`` with one group, or one
group per channel -> ``ReduceMean``/``Sub``/``Mul``/``Div``/``Sqrt`` on the map itself.

PyTorch exports ``GroupNorm(G, C)`` that way: the map reshaped to ``[N, G, -1]``, an instance
norm (scale 1, bias 0 per group), the result reshaped back, then the affine ``Mul``/``Add`` per
channel. The reshapes merge the channels with the positions in channels-first order, so a
channels-last build transposes the map back before every norm (ConvTasNet's global layer norms:
48 transposes of 1M elements, 77 of its 216 ms; wav2vec2's first GroupNorm). With one group the
statistics run over every axis but the batch, with one group per channel over each channel's
positions: reductions over axes of the map itself, which Relax's layout conversion moves with
the map, and no reshape. The same arithmetic; the sums in another order.

Runs in ``prepare_onnx`` after shapes are inferred, like the recurrent unrolling and the einsum
rewrite; onnxruntime still runs the original model. Group norms with 1 < G < C groups (a reshape
that splits the channels) stay as they are.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import onnx
from onnx import helper

from .onnx_rnn import Emitter, all_nodes, graph_constants, graph_shapes


def _match(reshape, nodes_by_input, consts, shapes) -> Optional[tuple]:
    """(instance norm, reshape back, reduced axes, scale, bias) when ``reshape`` starts such a
    group norm, else None."""
    users = nodes_by_input.get(reshape.output[0], [])
    if reshape.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "InstanceNormalization":
        return None
    norm = users[0]
    back = nodes_by_input.get(norm.output[0], [])
    if len(back) != 1 or back[0].op_type != "Reshape" or norm.input[0] != reshape.output[0]:
        return None
    x_shape, grouped = shapes.get(reshape.input[0]), shapes.get(reshape.output[0])
    if x_shape is None or grouped is None or -1 in x_shape or len(x_shape) < 3 or len(grouped) != 3 \
            or shapes.get(back[0].output[0]) != x_shape or grouped[0] != x_shape[0]:
        return None
    scale, bias = consts.get(norm.input[1]), consts.get(norm.input[2])
    if scale is None or bias is None:
        return None
    if grouped[1] == 1:
        axes, shape = list(range(1, len(x_shape))), ()
    elif grouped[1] == x_shape[1]:
        axes, shape = list(range(2, len(x_shape))), (x_shape[1],) + (1,) * (len(x_shape) - 2)
    else:
        return None
    return norm, back[0], axes, scale.reshape(shape), bias.reshape(shape)


def group_norms_unfolded(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every such group norm of ``model``'s main graph with float input and
    known shapes; returns how many."""
    graph = model.graph
    if not any(n.op_type == "InstanceNormalization" for n in graph.node):
        return 0
    shapes = graph_shapes(graph, {})
    consts = graph_constants(graph, {})
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes_by_input: dict = {}
    for node in graph.node:
        for name in node.input:
            nodes_by_input.setdefault(name, []).append(node)
    uses = Counter(name for node in all_nodes(graph) for name in node.input)  # If/Loop bodies too
    uses.update(o.name for o in graph.output)
    plans, dropped = {}, set()
    for node in graph.node:
        found = _match(node, nodes_by_input, consts, shapes) if elem.get(node.input[0] if node.input else "") \
            == onnx.TensorProto.FLOAT else None
        if found is None or uses[node.output[0]] != 1 or uses[found[0].output[0]] != 1:
            continue
        norm, back = found[:2]
        plans[id(back)] = (node, *found)
        dropped.update({id(node), id(norm)})
    if not plans:
        return 0
    out = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if id(node) not in plans:
            out.append(node)
            continue
        reshape, norm, back, axes, scale, bias = plans[id(node)]
        em = Emitter(f"{norm.output[0]}/unfolded")  # output names are unique, node names not always
        eps = next((helper.get_attribute_value(a) for a in norm.attribute if a.name == "epsilon"), 1e-5)

        def mean(x: str) -> str:
            if opset >= 18:
                return em.op("ReduceMean", [x, em.const(np.array(axes, np.int64))], keepdims=1)
            return em.op("ReduceMean", [x], axes=axes, keepdims=1)

        x = reshape.input[0]
        centred = em.op("Sub", [x, mean(x)])
        var = mean(em.op("Mul", [centred, centred]))
        std = em.op("Sqrt", [em.op("Add", [var, em.const(np.array(eps, np.float32))])])
        affine = not (np.all(scale == 1) and np.all(bias == 0))
        y = em.op("Div", [centred, std], None if affine else back.output[0])
        if affine:
            y = em.op("Mul", [y, em.const(scale.astype(np.float32))])
            em.op("Add", [y, em.const(bias.astype(np.float32))], back.output[0])
        out.extend(em.nodes)
        graph.initializer.extend(em.inits)
    del graph.node[:]
    graph.node.extend(out)
    return len(plans)
