"""Fold: constant per-channel element-wise ops into the weights and bias of the layer next to them.

Needs: Relax dataflow blocks as the importer emits them (the pass folds constant subgraphs first,
so a bias reshaped by the importer is a constant). Layers: conv1d, conv2d (any groups, NCHW or
NHWC, any kernel layout), conv2d_transpose (one group) and matmul, each with a constant weight.

Runs by default right after import, before every compression pass (``compile(fold=True)``,
``--no-fold`` turns it off), so pruning, low-rank and quantization see the folded weights and
calibrate one bias instead of a chain. Exact up to float rounding.

After a layer ``y``: ``y + k``, ``y - k``, ``k - y``, ``y * k``, ``y / k`` and inference batch
norm, for ``k`` a scalar or a constant per output channel, fold into ``W`` (scale per output
channel) and one bias add. Before a layer ``x``: ``x * k``, ``x / k`` and batch norm per input
channel fold into ``W`` along its input channels (a zero pad stays zero); a shift (``x + k``)
only where the layer pads nothing, since the pad would not see it.

After ``quantize`` (``--passes quantize,fold``) the same chains fold into the int8 layers'
rescale: ``astype(acc) * m`` (``quantize_realize``'s int32 -> float step, ``m`` = input scale x
weight scale per output channel) followed by ``* k`` / ``+ k`` ... becomes ``astype(acc) * (m *
s) + bias`` with one bias add (the zero-point correction included); the int8 weights stay as
quantized. Ops before an int8 layer are not folded (its input is quantized first).

Refused, with the reason in the report (``pass_reports.fold.refused``): constants that vary over
other axes than the channels (onnxruntime #12498 folded such a constant as if per channel), a
shift before a zero-padded or transposed convolution, division by a zero. Values read by more
than one op stay (the unfolded value is still needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.errors import PassOptionError
from tvm_compress.layers import LAYER_OPS, OP_CONV1D, OP_CONV2D, OP_CONV2D_T, OP_MATMUL, layer_name
from tvm_compress.pass_registry import PassEnv, PassPreset, register_pass
from tvm_compress.relax_utils import const_value, emit_like, is_constant, relax_functions, tensor_shape

from ._affine import MULTIPLY, Refusal, Step, arith_step, batch_norm_step, channel_vector

_ASTYPE = tvm.ir.Op.get("relax.astype")


@dataclass(frozen=True)
class FoldConfig:
    """skip: layers (names) whose neighbours are left unfolded."""

    skip: Tuple[str, ...] = ()


class _Layer:
    """A layer's weight as ``[O, I, taps...]`` (float64), with where its channels are."""

    int8 = False

    def __init__(self, call: relax.Call):
        self.call = call
        self.name = layer_name(call) or next(k for op, k in LAYER_OPS.items() if call.op.same_as(op))
        w = const_value(call.args[1])
        self.dtype = w.dtype
        self.vector_bias = call.op.same_as(OP_MATMUL)
        if call.op.same_as(OP_MATMUL):
            self.perm = (1, 0)
            self.groups, self.in_axis, self.out_axis = 1, -1, -1
            self.no_shift_in = None
        else:
            attrs = call.attrs
            layout = str(attrs.kernel_layout)
            self.perm = (layout.index("O"), layout.index("I"),
                         *(i for i, c in enumerate(layout) if c not in "OI"))
            self.groups = int(attrs.groups)
            self.in_axis = str(attrs.data_layout).index("C")
            self.out_axis = str(attrs.out_layout or attrs.data_layout).index("C")
            if call.op.same_as(OP_CONV2D_T):
                self.no_shift_in = "a shift before a transposed convolution (its output pixels sum different numbers of taps)"
            elif any(int(p) for p in attrs.padding):
                self.no_shift_in = "a shift before a zero-padded convolution (the padding would not see it)"
            else:
                self.no_shift_in = None
        self.w = w.astype(np.float64).transpose(self.perm)
        self.in_shape = tensor_shape(call.args[0])

    def _in_index(self) -> np.ndarray:
        """[O, I]: the input channel each weight column reads (groups)."""
        o, i = self.w.shape[:2]
        return (np.arange(o) // (o // self.groups))[:, None] * i + np.arange(i)[None, :]

    def fold(self, s_in, t_in, s_out, t_out) -> Tuple[np.ndarray, np.ndarray]:
        """Weight (original layout and dtype) and bias [O] of
        ``layer(x * s_in + t_in) * s_out + t_out`` as ``layer'(x) + bias``."""
        taps = (1,) * (self.w.ndim - 2)
        idx = self._in_index()
        w = self.w * s_in[idx].reshape(*idx.shape, *taps)
        contrib = (self.w.reshape(*idx.shape, -1).sum(-1) * t_in[idx]).sum(1)
        w = w * s_out.reshape(-1, 1, *taps)
        bias = contrib * s_out + t_out
        return w.transpose(np.argsort(self.perm)).astype(self.dtype), bias


class _Int8Layer:
    """The rescale ``astype(acc) * m`` of a realized int8 layer (``acc``: conv2d or matmul of
    an integer constant weight into int32): what follows it folds into ``m``."""

    int8 = True
    no_shift_in = None
    in_axis, in_shape = 0, (1,)  # nothing before it folds: its input is quantized first

    def __init__(self, call: relax.Call, acc: relax.Call, m: np.ndarray, axis: int):
        self.call, self.m, self.out_axis = call, m, axis
        self.vector_bias = acc.op.same_as(OP_MATMUL)
        self.name = layer_name(call) or layer_name(acc) or ("matmul" if self.vector_bias else "conv2d")
        self.dtype = const_value(call.args[1]).dtype

    def fold(self, s_in, t_in, s_out, t_out) -> Tuple[np.ndarray, np.ndarray]:
        """The rescale of ``(astype(acc) * m) * s_out + t_out`` and its bias [O]."""
        dims = [1] * len(self.call.ty.shape)
        dims[self.out_axis] = len(self.m)
        m = self.m * s_out
        return m.reshape([len(m)] if self.vector_bias else dims).astype(self.dtype), t_out


def _as_int8_layer(call, bindings) -> Optional[_Int8Layer]:
    if not (isinstance(call, relax.Call) and call.op.same_as(MULTIPLY) and is_constant(call.args[1])
            and str(call.ty.dtype).startswith("float")):
        return None
    cast = bindings.get(call.args[0])
    acc = bindings.get(cast.args[0]) if isinstance(cast, relax.Call) and cast.op.same_as(_ASTYPE) else None
    if not (isinstance(acc, relax.Call) and (acc.op.same_as(OP_CONV2D) or acc.op.same_as(OP_MATMUL))
            and is_constant(acc.args[1]) and str(acc.args[1].ty.dtype) in ("int8", "uint8")
            and str(acc.ty.dtype) == "int32"):
        return None
    shape = _shape(call)
    if shape is None:
        return None
    axis = -1 if acc.op.same_as(OP_MATMUL) else str(acc.attrs.out_layout or acc.attrs.data_layout).index("C")
    m = channel_vector(call.args[1], shape, axis)
    return None if isinstance(m, str) else _Int8Layer(call, acc, m, axis)


def _as_layer(call) -> Optional[_Layer]:
    if not (isinstance(call, relax.Call) and len(call.args) == 2 and is_constant(call.args[1])):
        return None
    if call.op.same_as(OP_MATMUL):
        ok = len(call.args[1].ty.shape) == 2 and len(call.args[0].ty.shape) >= 1
    elif call.op.same_as(OP_CONV2D_T):
        ok = int(call.attrs.groups) == 1
    else:
        ok = call.op.same_as(OP_CONV1D) or call.op.same_as(OP_CONV2D)
    if not ok or str(call.args[1].ty.dtype) not in ("float32", "float16", "float64"):
        return None
    try:
        return _Layer(call)
    except (TypeError, ValueError, AttributeError):  # symbolic shapes
        return None


@dataclass
class _Plan:
    layer: _Layer
    var: relax.Var
    source: relax.Expr  # the input the folded layer reads
    result: relax.Var  # the var the folded layer's output replaces
    s_in: np.ndarray
    t_in: np.ndarray
    s_out: np.ndarray
    t_out: np.ndarray
    before: List[str] = field(default_factory=list)
    after: List[str] = field(default_factory=list)
    removed: List[relax.Var] = field(default_factory=list)  # folded bindings after the layer
    refused: List[Refusal] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        # A lone bias add is already the folded form.
        return bool(self.before) or self.after not in ([], ["add"])


def _shape(var) -> Optional[List[int]]:
    try:
        return tensor_shape(var)
    except (TypeError, ValueError, AttributeError):
        return None


def _bn_items(bn_var, bindings, users):
    """(the reader of item 0, the other readers) when every reader of a batch norm is a
    TupleGetItem and only item 0 is used further; else None."""
    items = users.get(bn_var, [])
    main = [u for u in items if isinstance(bindings.get(u), relax.TupleGetItem) and bindings[u].index == 0]
    rest = [u for u in items if u not in main]
    if len(main) != 1 or not all(isinstance(bindings.get(u), relax.TupleGetItem) and not users.get(u)
                                 and isinstance(u, relax.DataflowVar) for u in rest):
        return None
    return main[0], rest


def _plans(block, skip) -> Dict[relax.Var, _Plan]:
    bindings = {b.var: b.value for b in block.bindings}
    users = relax.analysis.udchain(block)
    plans: Dict[relax.Var, _Plan] = {}
    for b in block.bindings:
        layer = _as_layer(b.value) or _as_int8_layer(b.value, bindings)
        out_shape = _shape(b.var)
        if layer is None or out_shape is None or layer.name in skip:
            continue
        o, c = out_shape[layer.out_axis], layer.in_shape[layer.in_axis]
        plans[b.var] = _Plan(layer, b.var, b.value.args[0], b.var, np.ones(c), np.zeros(c), np.ones(o), np.zeros(o))
    claimed = set()
    for var, plan in plans.items():  # after each layer first: exact whatever the padding
        _follow(plan, bindings, users)
        claimed.update(plan.removed)
    for plan in plans.values():
        _trace_back(plan, bindings, users, claimed)
    return plans


def _follow(plan: _Plan, bindings, users) -> None:
    layer, cur = plan.layer, plan.var
    shape = _shape(cur)
    while isinstance(cur, relax.DataflowVar) and len(users.get(cur, [])) == 1:
        nxt = users[cur][0]
        value = bindings.get(nxt)
        step, removed, new = arith_step(value, cur, shape, layer.out_axis), [nxt], nxt
        if step is None:
            step = batch_norm_step(value, shape[layer.out_axis], layer.out_axis, len(shape))
            if isinstance(step, Step):
                items = _bn_items(nxt, bindings, users)
                if items is None:
                    return
                new = items[0]
                removed = [nxt, *items[1], new]
        if step is None or _shape(new) != shape:
            return
        if isinstance(step, Refusal):
            plan.refused.append(step)
            return
        plan.s_out, plan.t_out = plan.s_out * step.scale, plan.t_out * step.scale + step.shift
        plan.after.append(step.op)
        plan.removed.extend(removed)
        plan.result = cur = new


def _trace_back(plan: _Plan, bindings, users, claimed) -> None:
    layer, x = plan.layer, plan.source
    shape = layer.in_shape
    while isinstance(x, relax.DataflowVar) and len(users.get(x, [])) == 1 and x not in claimed:
        value = bindings.get(x)
        if isinstance(value, relax.TupleGetItem) and value.index == 0 and bindings.get(value.tuple_value) is not None:
            bn_var = value.tuple_value
            bn = bindings[bn_var]
            items = _bn_items(bn_var, bindings, users)
            if items is None or not isinstance(bn_var, relax.DataflowVar):
                return
            step = batch_norm_step(bn, shape[layer.in_axis], layer.in_axis, len(shape))
            src = bn.args[0] if isinstance(step, (Step, Refusal)) else None
        elif isinstance(value, relax.Call) and len(value.args) == 2:
            src = next((a for a in value.args if not is_constant(a)), None)
            step = arith_step(value, src, shape, layer.in_axis) if src is not None else None
        else:
            return
        if step is None or _shape(src) != shape:
            return
        if isinstance(step, Refusal):
            plan.refused.append(step)
            return
        t_in = step.shift * plan.s_in + plan.t_in
        if layer.no_shift_in and np.any(t_in != 0):
            plan.refused.append(Refusal(step.op, layer.no_shift_in))
            return
        plan.s_in, plan.t_in = step.scale * plan.s_in, t_in
        plan.before.insert(0, step.op)
        plan.source = x = src


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod, skip):
        super().__init__(mod)
        self.skip_layers = skip
        self.plans: Dict[relax.Var, _Plan] = {}
        self.gone = set()
        self.done: List[_Plan] = []
        self.refused: List[Tuple[str, Refusal]] = []

    def visit_dataflow_block_(self, block):
        plans = {v: p for v, p in _plans(block, self.skip_layers).items()}
        for p in plans.values():
            self.refused.extend((p.layer.name, r) for r in p.refused)
        plans = {v: p for v, p in plans.items() if p.changes}
        self.plans.update(plans)
        for p in plans.values():
            self.gone.update(p.removed)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        if binding.var in self.gone:
            return
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        layer, call, bb = plan.layer, plan.layer.call, self.builder_
        w, bias = layer.fold(plan.s_in, plan.t_in, plan.s_out, plan.t_out)
        y = relax.Call(call.op, [self.visit_expr(plan.source), relax.const(w)], call.attrs, call.ty_args, call.span)
        out_shape = _shape(plan.var)
        if plan.after or np.any(bias != 0):
            y = bb.emit(y, plan.var.name)
            dims = [1] * len(out_shape)
            dims[layer.out_axis] = len(bias)
            shape = [len(bias)] if layer.vector_bias else dims
            y = relax.op.add(y, relax.const(bias.reshape(shape).astype(str(plan.var.ty.dtype))))
        new = emit_like(bb, plan.result, y)
        self.set_var_remap(plan.result, new)
        if plan.result is not plan.var:
            self.set_var_remap(plan.var, new)
        self.done.append(plan)


def foldable_left(mod: tvm.IRModule) -> List[dict]:
    """Layers of ``mod`` next to constant element-wise ops ``Fold`` would still fold (what a
    fold leaves must be empty) and the ops."""
    left = []
    for _, func in relax_functions(mod):
        for block in getattr(func.body, "blocks", []):
            if isinstance(block, relax.DataflowBlock):
                left.extend({"layer": p.layer.name, "before": p.before, "after": p.after}
                            for p in _plans(block, ()).values() if p.changes)
    return left


@tvm.transform.module_pass(opt_level=0, name="Fold")
class Fold:
    """Fold constant per-channel element-wise ops into neighbouring layers (module docstring)."""

    def __init__(self, config: Optional[FoldConfig] = None, env: Optional[PassEnv] = None):
        self.config = config or FoldConfig()
        self.env = env or PassEnv()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = relax.transform.FoldConstant()(mod)
        folder = _Folder(mod, set(self.config.skip))
        names = set()
        for gv, func in relax_functions(mod):
            new = folder.visit_expr(func)
            folder.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
            names.update(_layer_names(func))
        unknown = sorted(set(self.config.skip) - names)
        if unknown:
            raise PassOptionError(f"fold: no layer named {unknown[0]!r}")
        ops = sum(len(p.before) + len(p.after) for p in folder.done)
        # Each folded layer keeps (at most) one bias add.
        removed = ops - sum(1 for p in folder.done if p.after or np.any(p.t_out != 0) or np.any(p.t_in != 0))
        self.env.report["fold"] = {
            "layers": [{"name": p.layer.name, "before": p.before, "after": p.after,
                        "into": "int8 rescale" if p.layer.int8 else "weights"} for p in folder.done],
            "ops_folded": ops,
            "ops_removed": removed,
            "refused": [{"layer": n, "op": r.op, "reason": r.reason} for n, r in folder.refused],
        }
        refused = f"; {len(folder.refused)} refused (see the report)" if folder.refused else ""
        int8 = sum(p.layer.int8 for p in folder.done)
        int8 = f" ({int8} into int8 rescales)" if int8 else ""
        self.env.log(f"fold: {ops} constant ops folded into {len(folder.done)} layers{int8}{refused}")
        return folder.builder_.get() if folder.done else mod


def _layer_names(func) -> set:
    names = set()
    relax.analysis.post_order_visit(
        func, lambda e: names.add(layer_name(e)) if isinstance(e, relax.Call) and layer_name(e) else None)
    return names


def add_arguments(group) -> None:
    group.add_argument("--fold-skip", dest="fold_skip", metavar="LAYERS",
                       type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
                       help="layers whose neighbouring constant ops are not folded")


def _config_from_args(args):
    from tvm_compress.pass_registry import make_config

    skip = getattr(args, "fold_skip", None)
    return make_config(PRESET, {"skip": skip} if skip else {})


PRESET = register_pass(
    PassPreset(
        name="fold",
        help="fold constant per-channel mul/add/sub/div and batch norm into neighbouring conv/matmul "
             "weights and biases (exact; runs by default after import, --no-fold turns it off)",
        config_cls=FoldConfig,
        make=Fold,
        add_arguments=add_arguments,
        config_from_args=_config_from_args,
        runs_before=("prune", "lowrank"),
        order_reason="the compression passes should see the folded weights",
    )
)
