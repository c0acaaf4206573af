"""Channel dependency groups of a Relax function, and the rewrite that removes channels.

A *group* is a set of channels that must be removed together: the output channels of one or
more producer layers (conv1d/conv2d with one group, matmul; constant weights) that meet in a
residual add, an element-wise product, or pass unchanged through activations, pooling,
resize, padding, depthwise convolutions, batch norm and transposes. A concatenation along the
channel axis lays several groups side by side; a flatten (NCHW -> [N, C*H*W]) repeats each
channel H*W times along the features a matmul reads. Any use this analysis does not
understand (an unknown op, a reshape that mixes channels, the function's result) *pins* the
groups it sees: their channels stay.

``ChannelGroups(func)`` runs the analysis; ``prune(func, keep)`` rewrites ``func`` with
``keep[group] = sorted channel indices to keep`` (groups left out keep everything): producer
weights lose output channels, consumer weights the matching inputs, per-channel constants and
depthwise weights the same channels, reshapes their new sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import layer_name, with_layer
from tvm_compress.relax_utils import const, const_value, emit_like, is_constant, tensor_shape


def _ops(*names):
    return tuple(tvm.ir.Op.get(f"relax.{n}") for n in names)


_CONV = _ops("nn.conv1d", "nn.conv2d")
_MATMUL = _ops("matmul")
_UNARY = _ops("nn.relu", "sigmoid", "tanh", "clip", "nn.silu", "nn.gelu", "nn.gelu_tanh",
              "nn.leakyrelu", "nn.softplus", "exp", "sqrt", "rsqrt", "negative", "abs", "square",
              "erf", "astype", "round", "floor", "ceil", "sign")
_BINARY = _ops("add", "subtract", "multiply", "divide", "maximum", "minimum", "power")
_SPATIAL = _ops("nn.max_pool1d", "nn.max_pool2d", "nn.avg_pool1d", "nn.avg_pool2d",
                "nn.adaptive_avg_pool1d", "nn.adaptive_avg_pool2d", "image.resize2d")
_PAD = _ops("nn.pad")
_CONCAT = _ops("concat")
_RESHAPE = _ops("reshape")
_PERMUTE = _ops("permute_dims")
_BATCH_NORM = _ops("nn.batch_norm")
_REDUCE = _ops("mean", "sum", "max", "min")


@dataclass
class Seg:
    group: int
    count: int
    repeat: int = 1  # features per channel, after a flatten


@dataclass
class Info:
    axis: int
    segs: List[Seg]

    @property
    def channels(self) -> int:
        return sum(s.count * s.repeat for s in self.segs)


@dataclass
class Producer:
    var: relax.Var
    call: relax.Call
    weight: np.ndarray  # conv: [O, I, ...]; matmul: [K, N]
    group: int

    @property
    def name(self) -> str:
        return layer_name(self.call) or self.var.name

    def out_norms(self, criterion: str) -> np.ndarray:
        w = self.weight if self.call.op in _CONV else self.weight.T
        w = w.reshape(w.shape[0], -1).astype(np.float64)
        return np.abs(w).sum(axis=1) if criterion == "l1" else np.sqrt((w * w).sum(axis=1))


@dataclass
class ChannelGroups:
    """The analysis of one function (see the module docstring)."""

    func: relax.Function
    parent: List[int] = field(default_factory=list)
    channels: List[int] = field(default_factory=list)
    pinned: set = field(default_factory=set)
    why: Dict[int, str] = field(default_factory=dict)  # group -> what pinned it first
    info: Dict[relax.Var, Info] = field(default_factory=dict)
    producers: List[Producer] = field(default_factory=list)
    # groups whose channels some layer reads (a consumer or a producer's own input)
    read_by: Dict[int, List[str]] = field(default_factory=dict)

    def __post_init__(self):
        self._where = ""
        for block in self.func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                self._where = f"read by {value.op.name}" if isinstance(value, relax.Call) and \
                    isinstance(value.op, tvm.ir.Op) else "read by a non-op binding"
                if isinstance(binding, relax.VarBinding):
                    self._binding(binding.var, value)
                else:
                    self._pin_expr(value)
        self._pin_expr(self.func.body.body, "the function's result")

    # -- union-find -----------------------------------------------------------------------
    def _new_group(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.channels.append(channels)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def _union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.channels[a] != self.channels[b]:
            self._pin_groups((a, b), "groups of different sizes meet")
            return
        self.parent[b] = a
        if b in self.pinned:
            self.pinned.add(a)

    def is_pinned(self, g: int) -> bool:
        return self.find(g) in {self.find(p) for p in self.pinned}

    def pin_reason(self, g: int) -> str:
        g = self.find(g)
        return next((self.why[p] for p in self.pinned if self.find(p) == g and p in self.why), "")

    def _pin_groups(self, groups, why: str) -> None:
        for g in groups:
            g = self.find(g)
            self.pinned.add(g)
            self.why.setdefault(g, why)

    def groups(self) -> Dict[int, List[Producer]]:
        """Prunable groups (not pinned, with producers) -> their producers."""
        out: Dict[int, List[Producer]] = {}
        for p in self.producers:
            g = self.find(p.group)
            if not self.is_pinned(g):
                out.setdefault(g, []).append(p)
        return out

    # -- helpers ----------------------------------------------------------------------------
    def _pin_info(self, info: Optional[Info], why: str = "") -> None:
        if info is not None:
            self._pin_groups([s.group for s in info.segs], why or self._where)

    def _pin_expr(self, expr, why: str = "") -> None:
        """Every tensor with channel info used by ``expr`` keeps its channels."""
        def visit(e):
            if isinstance(e, relax.Var):
                self._pin_info(self.info.get(e), why)

        relax.analysis.post_order_visit(expr, visit)

    def _same_segs(self, a: Info, b: Info) -> bool:
        if a.axis != b.axis or len(a.segs) != len(b.segs):
            return False
        if any((x.count, x.repeat) != (y.count, y.repeat) for x, y in zip(a.segs, b.segs)):
            return False
        for x, y in zip(a.segs, b.segs):
            self._union(x.group, y.group)
        return True

    # -- the rules ---------------------------------------------------------------------------
    def _binding(self, var, value) -> None:
        if isinstance(value, relax.TupleGetItem) and isinstance(value.tuple_value, relax.Var):
            src = self.info.get(value.tuple_value)
            if src is not None and value.index == 0:  # batch_norm's normalized output
                self.info[var] = src
            return
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            self._pin_expr(value)
            return
        op, args = value.op, list(value.args)
        ins = [self.info.get(a) if isinstance(a, relax.Var) else None for a in args]
        if op in _CONV and is_constant(args[1]):
            self._conv(var, value, ins[0])
        elif op in _MATMUL and len(args) == 2 and is_constant(args[1]) and len(args[1].value.shape) == 2:
            w = const_value(args[1])
            if ins[0] is not None:
                if ins[0].axis == len(tensor_shape(args[0])) - 1:
                    self.read_by_layer(ins[0], value)
                else:
                    self._pin_info(ins[0])
            g = self._new_group(w.shape[1])
            self.producers.append(Producer(var, value, w, g))
            self.info[var] = Info(len(tensor_shape(value)) - 1, [Seg(g, w.shape[1])])
        elif op in _UNARY and ins[0] is not None:
            self.info[var] = ins[0]
        elif op in _BINARY:
            self._binary(var, value, ins)
        elif op in _SPATIAL + _PAD and ins[0] is not None and self._keeps_channels(value, ins[0]):
            self.info[var] = ins[0]
        elif op in _REDUCE and ins[0] is not None and value.attrs.axis is not None:
            axes = [int(a) % len(tensor_shape(args[0])) for a in value.attrs.axis]
            if ins[0].axis in axes:
                self._pin_info(ins[0])
            else:  # over other axes (a squeeze-and-excite's spatial mean): channels stay
                shift = 0 if value.attrs.keepdims else sum(1 for a in axes if a < ins[0].axis)
                self.info[var] = Info(ins[0].axis - shift, ins[0].segs)
        elif op in _CONCAT:
            self._concat(var, value)
        elif op in _RESHAPE and ins[0] is not None:
            self._reshape(var, value, ins[0])
        elif op in _PERMUTE and ins[0] is not None:
            axes = value.attrs.axes
            axes = list(range(len(tensor_shape(args[0]))))[::-1] if axes is None else [int(a) for a in axes]
            self.info[var] = Info(axes.index(ins[0].axis), ins[0].segs)
        elif op in _BATCH_NORM and ins[0] is not None and all(is_constant(a) for a in args[1:]) \
                and int(value.attrs.axis) == ins[0].axis:
            self.info[var] = ins[0]  # the tuple; item 0 is read through TupleGetItem
        else:
            for info in ins:
                self._pin_info(info)
            for a in args:
                if isinstance(a, relax.Tuple):
                    self._pin_expr(a)

    def read_by_layer(self, info: Info, call) -> None:
        for s in info.segs:
            self.read_by.setdefault(self.find(s.group), []).append(layer_name(call) or "")

    def _conv(self, var, call, data: Optional[Info]) -> None:
        w = const_value(call.args[1])
        attrs = call.attrs
        layout_ok = str(attrs.data_layout) in ("NCHW", "NCW") and str(attrs.kernel_layout) in ("OIHW", "OIW")
        groups, out_c = int(attrs.groups), w.shape[0]
        in_c = tensor_shape(call.args[0])[1]
        if not layout_ok:
            self._pin_info(data)
            return
        if groups == 1:
            if data is not None:
                if data.axis == 1:
                    self.read_by_layer(data, call)
                else:
                    self._pin_info(data)
            g = self._new_group(out_c)
            self.producers.append(Producer(var, call, w, g))
            self.info[var] = Info(1, [Seg(g, out_c)])
        elif groups == in_c == out_c and w.shape[1] == 1 and data is not None and data.axis == 1:
            self.info[var] = data  # depthwise: channel c in, channel c out
        else:
            self._pin_info(data)

    def _binary(self, var, call, ins: Sequence[Optional[Info]]) -> None:
        out_shape = tensor_shape(call)
        known = [(a, i) for a, i in zip(call.args, ins) if i is not None]
        if not known:
            return
        ref = known[0][1]
        ok = all(len(tensor_shape(a)) == len(out_shape) and i.axis == ref.axis for a, i in known)
        ok = ok and all(self._same_segs(ref, i) for _, i in known[1:])
        axis = ref.axis
        for a, i in zip(call.args, ins):
            if i is not None or not ok:
                continue
            # a constant or an unknown tensor: per channel (sliced along), or broadcast (size 1)
            shape = tensor_shape(a) if not is_constant(a) else list(a.value.shape)
            aligned = axis - (len(out_shape) - len(shape))
            size = shape[aligned] if 0 <= aligned < len(shape) else 1
            if size == 1:
                continue
            if not (is_constant(a) and size == ref.channels and ref.channels == out_shape[axis]):
                ok = False
        if ok and out_shape[axis] == ref.channels:
            self.info[var] = ref
        else:
            for _, i in known:
                self._pin_info(i)

    def _keeps_channels(self, call, info: Info) -> bool:
        if call.op in _PAD:
            widths = [int(v) for v in call.attrs.pad_width]
            return widths[2 * info.axis] == widths[2 * info.axis + 1] == 0
        return info.axis == 1 and str(getattr(call.attrs, "layout", "NCHW")) in ("NCHW", "NCW")

    def _concat(self, var, call) -> None:
        fields = list(call.args[0].fields) if isinstance(call.args[0], relax.Tuple) else []
        infos = [self.info.get(f) if isinstance(f, relax.Var) else None for f in fields]
        if not fields or any(i is None for i in infos):
            for i in infos:
                self._pin_info(i)
            return
        axis = int(call.attrs.axis) % len(tensor_shape(call))
        if all(i.axis == axis for i in infos):
            self.info[var] = Info(axis, [s for i in infos for s in i.segs])
        elif all(self._same_segs(infos[0], i) for i in infos[1:]):
            self.info[var] = infos[0]
        else:
            for i in infos:
                self._pin_info(i)

    def _reshape(self, var, call, info: Info) -> None:
        src, dst = tensor_shape(call.args[0]), tensor_shape(call)
        # [N, C, *S] -> [N, C * prod(S)]: a flatten keeps channel c's features together.
        if info.axis == 1 and len(dst) == 2 and dst[0] == src[0] and dst[1] == int(np.prod(src[1:])):
            rest = int(np.prod(src[2:])) if len(src) > 2 else 1
            self.info[var] = Info(1, [Seg(s.group, s.count, s.repeat * rest) for s in info.segs])
        else:
            self._pin_info(info)


def positions(info: Info, groups: ChannelGroups, keep: Dict[int, np.ndarray]) -> Optional[np.ndarray]:
    """Indices kept along ``info``'s channel axis (None: nothing removed there)."""
    parts, offset, changed = [], 0, False
    for s in info.segs:
        kept = keep.get(groups.find(s.group))
        if kept is None:
            kept = np.arange(s.count)
        else:
            changed = True
        idx = offset + (kept[:, None] * s.repeat + np.arange(s.repeat)[None, :]).reshape(-1)
        parts.append(idx)
        offset += s.count * s.repeat
    return np.concatenate(parts) if changed else None


def prune(mod: tvm.IRModule, gv, groups: ChannelGroups, keep: Dict[int, np.ndarray]) -> relax.Function:
    """``groups.func`` with the channels outside ``keep`` removed (see the module docstring)."""
    return _Pruner(mod, groups, keep).visit_expr(groups.func)


@mutator
class _Pruner(PyExprMutator):
    def __init__(self, mod, groups: ChannelGroups, keep):
        super().__init__(mod)
        self.groups = groups
        self.keep = keep

    def _pos(self, var) -> Optional[np.ndarray]:
        info = self.groups.info.get(var) if isinstance(var, relax.Var) else None
        return None if info is None else positions(info, self.groups, self.keep)

    def visit_var_binding_(self, binding):
        new = self._rewrite(binding.var, binding.value)
        if new is None:
            super().visit_var_binding_(binding)
            return
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))

    def _rewrite(self, var, call):
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return None
        op, args = call.op, list(call.args)
        out_pos, in_pos = self._pos(var), self._pos(args[0]) if args else None
        if op in _CONV and is_constant(args[1]) and (out_pos is not None or in_pos is not None):
            w = const_value(args[1])
            attrs = call.attrs
            depthwise = int(attrs.groups) > 1
            if out_pos is not None:
                w = w[out_pos]
            if in_pos is not None and not depthwise:
                w = w[:, in_pos]
            data = self.visit_expr(args[0])
            conv = relax.op.nn.conv2d if op.same_as(_CONV[1]) else relax.op.nn.conv1d
            new = conv(data, const(np.ascontiguousarray(w)), strides=attrs.strides, padding=attrs.padding,
                       dilation=attrs.dilation, groups=len(out_pos) if depthwise else 1,
                       data_layout=attrs.data_layout, kernel_layout=attrs.kernel_layout,
                       out_layout=attrs.out_layout, out_dtype=attrs.out_dtype or None)
            return with_layer(new, call)
        if op in _MATMUL and len(args) == 2 and is_constant(args[1]) and (out_pos is not None or in_pos is not None):
            w = const_value(args[1])
            if in_pos is not None:
                w = w[in_pos]
            if out_pos is not None:
                w = w[:, out_pos]
            new = relax.op.matmul(self.visit_expr(args[0]), const(np.ascontiguousarray(w)),
                                  out_dtype=call.attrs.out_dtype or None)
            return with_layer(new, call)
        if op in _BINARY and out_pos is not None:
            info = self.groups.info[var]
            out_shape = tensor_shape(call)
            new_args = []
            for a in args:
                if is_constant(a):
                    value = const_value(a)
                    aligned = info.axis - (len(out_shape) - value.ndim)
                    if 0 <= aligned < value.ndim and value.shape[aligned] == out_shape[info.axis]:
                        value = np.take(value, out_pos, axis=aligned)
                    new_args.append(const(np.ascontiguousarray(value)))
                else:
                    new_args.append(self.visit_expr(a))
            return relax.Call(op, new_args, call.attrs, call.ty_args)
        if op in _BATCH_NORM and in_pos is not None:
            params = [const(np.ascontiguousarray(const_value(a)[in_pos])) for a in args[1:]]
            return relax.Call(op, [self.visit_expr(args[0]), *params], call.attrs, call.ty_args)
        if op in _RESHAPE and out_pos is not None:
            shape = tensor_shape(call)
            shape[self.groups.info[var].axis] = len(out_pos)
            return relax.op.reshape(self.visit_expr(args[0]), shape)
        return None
