"""ONNX ``LSTM``, ``GRU`` and ``RNN`` nodes -> their time steps in plain ONNX ops, before import.

TVM 0.27's Relax ONNX importer has no converter for the recurrent ops, so speech, keyword
spotting and CRNN text models were refused. With the input shapes fixed (``prepare_onnx``),
a sequence has a static length, and a recurrent node is that many steps of matmuls and
element-wise gates: the input projection of every step is one ``MatMul`` over the whole
sequence, then each step adds the hidden state's ``MatMul`` and runs the gates (ONNX's
equations, gate order ``iofc`` / ``zrh``; a plain ``RNN`` is one tanh gate). The result is ordinary dense layers and
element-wise ops, which every pass and kernel here already takes (``quantize`` makes the
projections int8 dense layers).

Runs in ``prepare_onnx`` after shape subgraphs are folded and shapes inferred; onnxruntime
still runs the original model, so verification compares against its own recurrent kernels.
A node left as it is (weights computed at run time, a ``sequence_lens`` shorter than the
sequence, ``clip``, ``input_forget``, activations other than sigmoid, tanh and relu (those with
alpha or beta), an unknown input shape) is then refused as an unsupported op, naming it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}
# The activations the unrolled cells take (ONNX names them in lower or mixed case): those with no
# alpha or beta.
_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class Emitter:
    """New nodes and initializers of one graph, named under ``prefix`` (unique per node)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self._n = 0
        self._consts: Dict[Tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._consts:
            name = self._name(hint)
            self.inits.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs, out: Optional[str] = None, **attrs) -> str:
        out = out or self._name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def slice(self, x: str, start: int, end: int, axis: int = -1) -> str:
        return self.op("Slice", [x, self.const(np.array([start], np.int64)), self.const(np.array([end], np.int64)),
                                 self.const(np.array([axis], np.int64))])

    def pick(self, x: str, index: int, axis: int = 0) -> str:
        """``x[index]`` along ``axis``, that axis dropped."""
        return self.op("Gather", [x, self.const(np.array(index, np.int64))], axis=axis)

    def reshape(self, x: str, shape, out: Optional[str] = None) -> str:
        return self.op("Reshape", [x, self.const(np.array(shape, np.int64))], out)

    def step(self, proj: str, t: int, start: int, end: int, shape) -> str:
        """``proj[t, :, start:end]`` as ``shape`` (one step's columns of the projection)."""
        cut = self.op("Slice", [proj, self.const(np.array([t, start], np.int64)),
                                self.const(np.array([t + 1, end], np.int64)), self.const(np.array([0, 2], np.int64))])
        return self.reshape(cut, shape)


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list):
            v = [s.decode() if isinstance(s, bytes) else s for s in v]
        out[a.name] = v
    return out


def _plan(node: onnx.NodeProto, consts: Dict[str, np.ndarray], shapes: Dict[str, tuple]):
    """(the unrolling's inputs, None) when ``node`` can be unrolled, else (None, why not)."""
    a = _attrs(node)
    gates = _GATES[node.op_type]
    ins = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, seq = ins[:5]
    direction = a.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    acts = [s.lower() for s in a.get("activations", [])]
    if a.get("clip") is not None or a.get("input_forget", 0):
        return None, "clip and input_forget are not supported"
    acts = acts or _DEFAULT_ACTIVATIONS[node.op_type] * dirs
    if len(acts) != len(_DEFAULT_ACTIVATIONS[node.op_type]) * dirs or any(f not in _ACTIVATIONS for f in acts):
        return None, f"activations {', '.join(acts)} (only {', '.join(_ACTIVATIONS)} are supported)"
    if any(name and name not in consts for name in (w, r, b, ins[7] if node.op_type == "LSTM" else "")):
        return None, "its weights are computed at run time (constant weights only)"
    shape = shapes.get(x)
    if shape is None or len(shape) != 3 or any(int(d) <= 0 for d in shape):
        return None, "its input's shape is unknown (a fixed sequence length is needed)"
    layout = int(a.get("layout", 0))
    steps, batch = (shape[0], shape[1]) if layout == 0 else (shape[1], shape[0])
    if seq and (seq not in consts or not np.all(consts[seq] == steps)):
        return None, "sequence_lens differ from the sequence length"
    hidden = int(consts[r].shape[-1])
    weights = consts[w].astype(np.float32), consts[r].astype(np.float32)
    bias = consts[b].astype(np.float32) if b else np.zeros((dirs, 2 * gates * hidden), np.float32)
    peep = consts[ins[7]].astype(np.float32) if node.op_type == "LSTM" and ins[7] else None
    states = ins[5:7] if node.op_type == "LSTM" else ins[5:6]
    acts = [_ACTIVATIONS[f] for f in acts]
    return (a, x, weights, bias, peep, states, int(steps), int(batch), hidden, dirs, layout, acts), None


def _unroll(node: onnx.NodeProto, plan, em: Emitter) -> None:
    a, x, (w, r), bias, peep, states, steps, batch, hidden, dirs, layout, acts = plan
    lstm = node.op_type == "LSTM"
    gates = _GATES[node.op_type]
    before_reset = int(a.get("linear_before_reset", 0))
    if layout:
        x = em.op("Transpose", [x], perm=[1, 0, 2])
    outs = list(node.output) + [""] * (3 - len(node.output))
    ys, finals = [], [[] for _ in states]
    per_dir = len(acts) // dirs
    for d in range(dirs):
        # f (gates), g (candidate), h (LSTM's output): tanh/sigmoid by default
        mine = acts[d * per_dir:(d + 1) * per_dir]
        f_act, g_act, h_act = (mine + mine[-1:] * 2)[:3]
        wb, rb = bias[d, :gates * hidden], bias[d, gates * hidden:]
        # every step's input projection at once: [T, B, I] x [I, G*H]
        proj = em.op("MatMul", [x, em.const(np.ascontiguousarray(w[d].T), "W")])
        # GRU with linear_before_reset: the reset gate scales Rb_h, so it stays out of the projection
        in_bias = np.concatenate([wb[:2 * hidden] + rb[:2 * hidden], wb[2 * hidden:]]) \
            if node.op_type == "GRU" and before_reset else wb + rb
        proj = em.op("Add", [proj, em.const(in_bias, "B")])
        rt = np.ascontiguousarray(r[d].T)  # [H, G*H]
        prev = [em.pick(s, d, axis=1 if layout else 0) if s else None for s in states]
        seq = [None] * steps
        for t in (range(steps) if (a.get("direction", "forward") == "forward" or (dirs == 2 and d == 0))
                  else range(steps - 1, -1, -1)):
            xt = em.pick(proj, t) if gates == 1 else None
            h = prev[0]
            if gates == 1:  # RNN: h_t = f(x W + h_{t-1} R + b)
                h = em.op(f_act, [xt if h is None else em.op("Add", [xt, em.op("MatMul", [h, em.const(rt, "R")])])])
                prev = [h]
            elif lstm:
                # Each gate adds its own slice of the step's projection (GRU's too): a slice
                # with one consumer is fused into the gates' kernel, where one gather of the
                # step feeding the matmul's epilogue stayed a kernel call of its own.
                hr = None if h is None else em.op("MatMul", [h, em.const(rt, "R")])
                gi, go, gf, gc = (em.step(proj, t, k * hidden, (k + 1) * hidden, [batch, hidden]) for k in range(4))
                if hr is not None:
                    gi, go, gf, gc = (em.op("Add", [g, em.slice(hr, k * hidden, (k + 1) * hidden)])
                                      for k, g in enumerate((gi, go, gf, gc)))
                c = prev[1]
                if peep is not None and c is not None:
                    gi = em.op("Add", [gi, em.op("Mul", [c, em.const(peep[d, :hidden], "P")])])
                    gf = em.op("Add", [gf, em.op("Mul", [c, em.const(peep[d, 2 * hidden:], "P")])])
                i, f = em.op(f_act, [gi]), em.op(f_act, [gf])
                cand = em.op("Mul", [i, em.op(g_act, [gc])])
                c = cand if c is None else em.op("Add", [em.op("Mul", [f, c]), cand])
                if peep is not None:
                    go = em.op("Add", [go, em.op("Mul", [c, em.const(peep[d, hidden:2 * hidden], "P")])])
                h = em.op("Mul", [em.op(f_act, [go]), em.op(h_act, [c])])
                prev = [h, c]
            else:
                zr_x, hx = (em.step(proj, t, a, b, [batch, b - a]) for a, b in ((0, 2 * hidden), (2 * hidden, 3 * hidden)))
                if h is not None:
                    hr = em.op("MatMul", [h, em.const(rt if before_reset else np.ascontiguousarray(rt[:, :2 * hidden]), "R")])
                zr = em.op(f_act, [zr_x if h is None else
                                       em.op("Add", [zr_x, em.slice(hr, 0, 2 * hidden) if before_reset else hr])])
                z, rg = em.slice(zr, 0, hidden), em.slice(zr, hidden, 2 * hidden)
                if before_reset:  # r * (h W_h + Rb_h)
                    rbh = em.const(rb[2 * hidden:], "Rb")
                    hh = rbh if h is None else em.op("Add", [em.slice(hr, 2 * hidden, 3 * hidden), rbh])
                    pre = em.op("Add", [hx, em.op("Mul", [rg, hh])])
                else:  # (r * h) W_h; Rb_h is in the projection's bias
                    pre = hx if h is None else em.op("Add", [hx, em.op("MatMul", [
                        em.op("Mul", [rg, h]), em.const(np.ascontiguousarray(rt[:, 2 * hidden:]), "R")])])
                cand = em.op(g_act, [pre])
                # h_t = (1 - z) * cand + z * h_{t-1} = cand + z * (h_{t-1} - cand)
                h = em.op("Sub", [cand, em.op("Mul", [z, cand])]) if h is None else \
                    em.op("Add", [cand, em.op("Mul", [z, em.op("Sub", [h, cand])])])
                prev = [h]
            seq[t] = h
        ys.append(seq)
        for k, s in enumerate(prev):
            finals[k].append(em.reshape(s, [1, batch, hidden]))
    if outs[0]:
        steps_y = [em.op("Concat", [em.reshape(ys[d][t], [1, 1, batch, hidden]) for d in range(dirs)], axis=1)
                   if dirs > 1 else em.reshape(ys[0][t], [1, 1, batch, hidden]) for t in range(steps)]
        y = em.op("Concat", steps_y, axis=0) if steps > 1 else steps_y[0]
        _output(em, y, outs[0], [2, 0, 1, 3] if layout else None)
    for k, parts in enumerate(finals):
        if outs[k + 1]:
            _output(em, em.op("Concat", parts, axis=0) if dirs > 1 else parts[0], outs[k + 1],
                    [1, 0, 2] if layout else None)


def _output(em: Emitter, value: str, name: str, perm) -> None:
    """``value`` under the node's output ``name`` (transposed to ``layout = 1``'s order)."""
    if perm:
        em.op("Transpose", [value], name, perm=perm)
    else:
        em.op("Identity", [value], name)


def graph_shapes(graph: onnx.GraphProto, into: Dict[str, tuple]) -> Dict[str, tuple]:
    """``into`` updated with the shape of every input, value, output and initializer of
    ``graph`` by name (-1 for a dimension with no value)."""
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            into[v.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    for init in graph.initializer:
        into[init.name] = tuple(init.dims)
    return into


def graph_constants(graph: onnx.GraphProto, into: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``into`` updated with the value of every initializer and Constant node of ``graph``."""
    for init in graph.initializer:
        into[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            into[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return into


def _expand_graph(graph: onnx.GraphProto, consts: Dict[str, np.ndarray], shapes: Dict[str, tuple],
                  counts: Dict[str, int], refused: Dict[str, str]) -> None:
    consts = graph_constants(graph, dict(consts))
    shapes = graph_shapes(graph, dict(shapes))
    nodes: List[onnx.NodeProto] = []
    replaced = set()  # inputs of unrolled nodes: their weights, unused after
    for node in graph.node:
        for sub in subgraphs(node):  # If / Loop bodies see the outer graph's names
            _expand_graph(sub, consts, shapes, counts, refused)
        plan, why = _plan(node, consts, shapes) if node.op_type in _DEFAULT_ACTIVATIONS else (None, None)
        if plan is None:
            if why:
                refused[node.name or node.output[0]] = why
            nodes.append(node)
            continue
        em = Emitter(f"{node.name or node.output[0]}/unrolled{sum(counts.values())}")
        _unroll(node, plan, em)
        nodes.extend(em.nodes)
        graph.initializer.extend(em.inits)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        replaced.update(node.input)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in all_nodes(graph) for name in n.input}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    if len(keep) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def expand_recurrent(model: onnx.ModelProto) -> Tuple[Dict[str, int], Dict[str, str]]:
    """Unroll, in place, every LSTM/GRU/RNN node of ``model`` (and of its If/Loop bodies) that has
    constant weights and a static sequence length. Returns how many of each op were unrolled,
    and why each other one was not (by node name)."""
    counts: Dict[str, int] = {}
    refused: Dict[str, str] = {}
    if any(n.op_type in _DEFAULT_ACTIVATIONS for n in all_nodes(model.graph)):
        _expand_graph(model.graph, {}, {}, counts, refused)
    return counts, refused


def all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of the graphs its nodes hold (If branches, Loop bodies)."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def subgraphs(node: onnx.NodeProto) -> List[onnx.GraphProto]:
    """The graphs ``node`` holds as attributes (If branches, Loop and Scan bodies)."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]
