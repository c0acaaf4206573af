"""Inputs bound to values, and ``If`` nodes whose condition is then known, taken apart before import.

Exported models branch on things that are fixed once a deployment is: Silero VAD's published
``silero_vad.onnx`` picks its 8 kHz or 16 kHz network with ``If(sr == 16000)`` and computes its
LSTM weights inside the branches; TorchScript exports test ``x.shape[0] == 1``. TVM's importer
computes the nodes of both branches ahead of the Relax ``If`` (which then picks one's outputs),
so such a model pays for both networks, and the LSTM unroller needs constant weights.
``bind_inputs`` makes the inputs a user fixes (``--input-value``) initializers;
``inline_constant_ifs`` then replaces every top-level ``If`` whose condition follows from
constants and static shapes by the nodes of the branch it takes, repeating while inlined
branches expose more such ``If`` nodes.

Runs in ``prepare_onnx`` after the input shapes are fixed and before onnxruntime's folding
(whose own folding of such an ``If`` crashed onnxruntime 1.32 on Silero VAD). onnxruntime still
runs the original model, fed the bound values, as the reference.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Mapping, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_rnn import subgraphs

# Ops whose value is not a function of their inputs (or that hold graphs): never evaluated here.
_NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan"}
_MAX_CONE = 64  # nodes evaluated for one condition: shape arithmetic, not a network


def bind_inputs(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    """Turn the graph inputs named in ``values`` into initializers holding those values, in place
    (shapes and dtypes checked by the caller)."""
    keep = [i for i in model.graph.input if i.name not in values]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name, value in values.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def inline_constant_ifs(model: onnx.ModelProto) -> int:
    """Inline, in place, every top-level ``If`` whose condition is known; how many were."""
    inlined = 0
    while True:
        step = _inline_pass(model)
        if not step:
            return inlined
        inlined += step


def deciding_inputs(model: onnx.ModelProto) -> Dict[str, int]:
    """Graph inputs of one element (a sample rate, a flag) that top-level ``If`` conditions
    depend on, with how many ``If`` nodes each decides: ``--input-value`` candidates."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    small = {i.name for i in model.graph.input
             if all(d.HasField("dim_value") and d.dim_value == 1 for d in i.type.tensor_type.shape.dim)}
    found: Dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        seen, todo, names = set(), [node.input[0]], set()
        while todo and len(seen) < _MAX_CONE:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in small:
                names.add(name)
            elif name in producer:
                todo.extend(i for i in producer[name].input if i)
        for name in names:
            found[name] = found.get(name, 0) + 1
    return found


def _inline_pass(model: onnx.ModelProto) -> int:
    if not any(n.op_type == "If" for n in model.graph.node):
        return 0
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001  (conditions from constants alone still fold)
        inferred = model
    evaluator = _Evaluator(inferred)
    defined = Counter({i.name: 1 for i in [*model.graph.initializer, *model.graph.input]})
    for node in model.graph.node:
        defined.update(_names(node))
    nodes, inlined = [], 0
    for node in model.graph.node:
        cond = evaluator.value(node.input[0]) if node.op_type == "If" else None
        branch = None
        if cond is not None and cond.size == 1:
            taken = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == taken)
            outside = defined - _names(node)
            inner = {i.name for i in branch.initializer} | {o for n in branch.node for o in _names(n)}
            if len(branch.output) != len(node.output) or any(outside[n] for n in inner):
                branch = None  # a branch reusing an outer name: left to the importer
        if branch is None:
            nodes.append(node)
            continue
        nodes.extend(branch.node)
        model.graph.initializer.extend(branch.initializer)
        for k, (src, dst) in enumerate(zip(branch.output, node.output)):
            if dst:
                nodes.append(onnx.helper.make_node("Identity", [src.name], [dst],
                                                   name=f"{node.name or dst}/taken{k}"))
        inlined += 1
    if inlined:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return inlined


def _names(node: onnx.NodeProto) -> Counter:
    """Names ``node`` defines: its outputs, and everything defined inside its subgraphs."""
    names = Counter(o for o in node.output if o)
    for sub in subgraphs(node):
        names.update(i.name for i in [*sub.initializer, *sub.input])
        for inner in sub.node:
            names.update(_names(inner))
    return names


class _Evaluator:
    """Values that follow from initializers, ``Constant`` nodes and static shapes, evaluated
    node by node with onnx's reference implementation, on demand."""

    def __init__(self, model: onnx.ModelProto):
        self.opsets = list(model.opset_import)
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.known: Dict[str, Optional[np.ndarray]] = {
            i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.shapes: Dict[str, tuple] = {}
        for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            t = v.type.tensor_type
            if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
                self.shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
        for name, value in self.known.items():
            self.shapes[name] = value.shape
        self.budget = _MAX_CONE

    def value(self, name: str) -> Optional[np.ndarray]:
        self.budget = _MAX_CONE
        return self._value(name)

    def _value(self, name: str) -> Optional[np.ndarray]:
        if name in self.known:
            return self.known[name]
        self.known[name] = None  # a cycle or a failure reads as unknown
        node = self.producer.get(name)
        if node is None or node.op_type in _NOT_FOLDED or self.budget <= 0:
            return None
        self.budget -= 1
        result = self._shape_of(node) if node.op_type in ("Shape", "Size") else self._run(node)
        if result is not None:
            for out, val in zip([o for o in node.output if o], result):
                self.known[out] = val
        return self.known[name]

    def _shape_of(self, node: onnx.NodeProto):
        shape = self.shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return [np.array(shape[start:end], dtype=np.int64)]

    def _run(self, node: onnx.NodeProto):
        from onnx.reference import ReferenceEvaluator

        feeds = {}
        for name in node.input:
            if not name:
                continue
            val = self._value(name)
            if val is None:
                return None
            feeds[name] = val
        helper = onnx.helper
        graph = helper.make_graph(
            [node], "cone",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for n, v in feeds.items()],
            [helper.make_empty_tensor_value_info(o) for o in node.output if o])
        try:
            outs = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=self.opsets)).run(None, feeds)
        except Exception:  # noqa: BLE001  (an op the reference cannot run: the If stays)
            return None
        return [np.asarray(o) for o in outs]
