"""The bit-packed binary kernels (``binary_kernels``) as a kernel hook of the CPU families.

Needs: layers marked in the module attribute ``BINARY_LAYERS_ATTR`` (the binary pass writes it)
whose weights are ``alpha * sign`` constants: conv2d (NCHW/OIHW, one group) and 2-d matmuls
``x @ W``. Runs before legalization and fusion (``BinaryLayers``):

- a layer with binary activations reads its input sign-packed (``bitpack``, which the sign
  before it fuses into) and becomes an XNOR/popcount kernel of int32 dots, then ``dot * alpha``
  in float; bias, batch norm and activation after it fuse into the kernel as its epilogue;
- the fused chain: where a binary convolution's output goes through per-channel constant
  scales and shifts into a sign read only by binary convolutions, the convolution becomes
  one kernel that compares each dot with an integer threshold and writes the next layer's
  packed input (``binary_conv2d_packed``); the float ops in between disappear;
- a layer with float activations (BWN) keeps its float kernel; its weight is stored as bits
  and alphas and unpacked by a small kernel at run time.

After fusion (``ScheduleBinary``) the kernels are vectorized over output channels and marked
scheduled, so tuning and the default schedules leave them alone. What each layer became goes
to the module attribute ``BINARY_KERNELS_ATTR`` for the compile report. Layers the kernels
cannot take stay as they are (the float computation of the binary layer) and are reported.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import OP_CONV2D, OP_MATMUL, layer_name, with_layer
from tvm_compress.relax_utils import const_value, emit_like, is_constant, relax_functions, tensor_shape
from tvm_compress.specs import binary_layers, json_attr

from .base import KernelHook
from .binary_kernels import (
    binary_conv2d,
    binary_conv2d_packed,
    binary_dense,
    bitpack,
    find_binary_blocks,
    pack_conv_weight,
    pack_dense_weight,
    schedule_binary,
    thresholds,
    unpack_weight,
)

BINARY_KERNELS_ATTR = "tvm_compress.binary_kernels"
_SIGN = tvm.ir.Op.get("relax.sign")
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable
_OPAQUE = 8


def _attr(call, name, default=None):
    return getattr(call.attrs, name, default)


def why_not(call: relax.Call) -> Optional[str]:
    """Why the binary kernels cannot run this layer (None: they can)."""
    if len(call.args) != 2 or not is_constant(call.args[1]):
        return "the weight is not a constant"
    data = call.args[0]
    try:
        shape = tensor_shape(data)
    except (TypeError, ValueError, tvm.TVMError):
        return "symbolic input shape"
    if str(data.ty.dtype) != "float32":
        return f"{data.ty.dtype} input"
    if call.op.same_as(OP_CONV2D):
        a = call.attrs
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return f"layout {a.data_layout}/{a.kernel_layout}"
        if int(a.groups) != 1:
            return f"{int(a.groups)} groups"
        return None
    if call.op.same_as(OP_MATMUL):
        if len(shape) != 2 or const_value(call.args[1]).ndim != 2:
            return "not a 2-d matmul"
        return None
    return "not a conv2d or matmul"


def _weight(call) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha per output channel, +1/-1 weight as [O, ...])."""
    w = const_value(call.args[1]).astype(np.float64)
    if call.op.same_as(OP_MATMUL):
        w = w.T
    alpha = np.abs(w).reshape(w.shape[0], -1).mean(axis=1)
    return alpha, np.where(w >= 0, 1.0, -1.0)


def _conv_geometry(call):
    a = call.attrs
    pad = [int(v) for v in a.padding]
    if len(pad) == 2:
        pad = pad * 2
    top, left, bottom, right = pad
    return ([int(v) for v in a.strides], (top, left, bottom, right), [int(v) for v in a.dilation])


class _Graph:
    """Bindings of one function: value of each var, and its users."""

    def __init__(self, func: relax.Function):
        self.value: Dict[relax.Var, relax.Expr] = {}
        self.users: Dict[relax.Var, List[relax.Var]] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    continue
                self.value[b.var] = b.value
                for arg in getattr(b.value, "args", []):
                    for v in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                        if isinstance(v, relax.Var):
                            self.users.setdefault(v, []).append(b.var)
        for v in _free_output_vars(func):
            self.users.setdefault(v, []).append(None)

    def call(self, var) -> Optional[relax.Call]:
        value = self.value.get(var)
        return value if isinstance(value, relax.Call) else None


def _free_output_vars(func) -> List[relax.Var]:
    body = func.body.body
    return [v for v in (body.fields if isinstance(body, relax.Tuple) else [body]) if isinstance(v, relax.Var)]


def _affine_to(graph: _Graph, var, channels: int):
    """Walk from a sign's argument ``var`` back through single-use per-channel constant ops to
    the layer output they apply to: (layer var, scale, shift) or None."""
    from tvm_compress.passes._affine import Step, arith_step

    scale, shift = np.ones(channels), np.zeros(channels)
    while True:
        call = graph.call(var)
        if call is None:
            return None
        if call.op.same_as(OP_CONV2D):
            return var, scale, shift
        src = next((a for a in call.args if isinstance(a, relax.Var)), None)
        if src is None or len(graph.users.get(src, [])) != 1:
            return None
        try:
            shape = tensor_shape(src)
        except (TypeError, ValueError, tvm.TVMError):
            return None
        if len(shape) != 4 or shape[1] != channels:
            return None
        step = arith_step(call, src, shape, 1)
        if not isinstance(step, Step):
            return None
        # out = step(src) composed after what is already collected
        scale, shift = scale * step.scale, scale * step.shift + shift
        var = src


@mutator
class _Binarize(PyExprMutator):
    def __init__(self, mod, func, marks: Dict[str, dict]):
        super().__init__(mod)
        self.marks = marks
        self.graph = _Graph(func)
        self.done: Dict[str, dict] = {}  # layer -> what it became (or why it stays float)
        self.count = 0  # layers rewritten
        self.packed: Dict[relax.Var, relax.Var] = {}  # sign var -> its packed form, made upstream
        self.chains: Dict[relax.Var, Tuple[relax.Var, np.ndarray, np.ndarray]] = {}  # conv var -> chain
        self._plan()

    def _layer(self, var):
        call = self.graph.call(var)
        if call is None or not (call.op.same_as(OP_CONV2D) or call.op.same_as(OP_MATMUL)):
            return None, None
        name = layer_name(call)
        mark = self.marks.get(name) if name else None
        if mark is None:
            return None, None
        reason = why_not(call)
        if reason is not None:
            self.done[name] = {"kernel": f"float (the kernels cannot take it: {reason})"}
            return None, None
        return call, mark

    def _binary_conv_user(self, var) -> bool:
        call, mark = self._layer(var) if var is not None else (None, None)
        return call is not None and mark["activations"] == "binary" and call.op.same_as(OP_CONV2D)

    def _plan(self):
        """Chains: binary conv -> per-channel affine -> sign read only by binary convolutions."""
        for var, value in self.graph.value.items():
            if not (isinstance(value, relax.Call) and value.op.same_as(_SIGN)):
                continue
            users = self.graph.users.get(var, [])
            if not users or not all(self._binary_conv_user(u) for u in users):
                continue
            shape = tensor_shape(var)
            if len(shape) != 4 or not isinstance(value.args[0], relax.Var):
                continue
            found = _affine_to(self.graph, value.args[0], shape[1])
            if found is None:
                continue
            conv_var, scale, shift = found
            if self._binary_conv_user(conv_var) and len(self.graph.users.get(conv_var, [])) == 1:
                self.chains[conv_var] = (var, scale, shift)

    def _packed_input(self, data_var, call):
        if data_var in self.packed:
            return self.packed[data_var], "packed by the previous layer's kernel"
        x = self.visit_expr(call.args[0])
        return self.builder_.emit(self.builder_.call_te(bitpack, x, primfunc_name_hint="bitpack")), "packed here"

    def visit_var_binding_(self, binding):
        call, mark = self._layer(binding.var)
        if call is None:
            super().visit_var_binding_(binding)
            return
        name, bb = layer_name(call), self.builder_
        alpha, signs = _weight(call)
        conv = call.op.same_as(OP_CONV2D)
        out_ch = signs.shape[0]
        record = {"op": "conv2d" if conv else "matmul"}
        if mark["activations"] != "binary":
            packed = pack_conv_weight(signs) if conv else pack_dense_weight(signs)
            shape = tuple(signs.shape) if conv else tuple(signs.shape[::-1])
            x = self.visit_expr(call.args[0])
            # The layer's input rides along unread: with constant arguments only, the lowering's
            # FoldConstant would unpack the weight at compile time and store it as float again.
            w = bb.emit(bb.call_te(lambda _x, p, a: unpack_weight(p, a, shape, conv), x, relax.const(packed),
                                   relax.const(alpha.astype("float32")), primfunc_name_hint="unpack_binary_weight"))
            new = relax.Call(call.op, [x, w], call.attrs, call.ty_args, call.span)
            record.update(kernel="float (1-bit weights unpacked at run time)")
            self.set_var_remap(binding.var, emit_like(bb, binding.var, new))
            self.done[name] = record
            self.count += 1
            return
        xp, how = self._packed_input(call.args[0], call)
        record.update(kernel="xnor-popcount", input=how)
        if conv:
            channels = tensor_shape(call.args[0])[1]
            geometry = _conv_geometry(call)
            wp = relax.const(pack_conv_weight(signs))
            chain = self.chains.get(binding.var)
            if chain is not None:
                sign_var, scale, shift = chain
                sgn, thr = thresholds(scale * alpha, shift)
                packed = bb.emit(bb.call_te(
                    lambda a, b, s, t: binary_conv2d_packed(a, b, s, t, channels, *geometry),
                    xp, wp, relax.const(sgn), relax.const(thr),
                    primfunc_name_hint="binary_conv2d_packed", primfunc_attrs={"op_pattern": _OPAQUE}))
                self.packed[sign_var] = packed
                record.update(output="bit-packed for the next binary layer (fused chain)")
            dot = bb.emit(with_layer(bb.call_te(
                lambda a, b: binary_conv2d(a, b, channels, *geometry), xp, wp,
                primfunc_name_hint="binary_conv2d", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), name))
            a_shape = (1, out_ch, 1, 1)
        else:
            features = tensor_shape(call.args[0])[1]
            dot = bb.emit(with_layer(bb.call_te(
                lambda a, b: binary_dense(a, b, features), xp, relax.const(pack_dense_weight(signs)),
                primfunc_name_hint="binary_dense", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE}), name))
            a_shape = (out_ch,)
        record.setdefault("output", "float (scale, bias and activation fused into the kernel)")
        y = relax.op.multiply(relax.op.astype(dot, "float32"), relax.const(alpha.reshape(a_shape).astype("float32")))
        self.set_var_remap(binding.var, emit_like(bb, binding.var, y))
        self.done[name] = record
        self.count += 1


@tvm.transform.module_pass(opt_level=0, name="BinaryLayers")
class BinaryLayers:
    """Run the layers the binary pass marked on bit-packed XNOR/popcount kernels."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        marks = binary_layers(mod)
        if not marks:
            return mod
        done: Dict[str, dict] = {}
        rewritten = 0
        for gv, func in relax_functions(mod):
            rewriter = _Binarize(mod, func, marks)
            new = rewriter.visit_expr(func)
            done.update(rewriter.done)
            if rewriter.count:
                rewritten += rewriter.count
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
                mod = rewriter.builder_.get()
        for name in marks:
            done.setdefault(name, {"kernel": "float (the kernels cannot take it)"})
        if rewritten:
            # a fused chain leaves its producer's int32 kernel unused: not compiled
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod.with_attr(BINARY_KERNELS_ATTR, json.dumps(done, sort_keys=True))


@tvm.transform.module_pass(opt_level=0, name="ScheduleBinary")
class ScheduleBinary:
    """Schedule every fused function holding a binary kernel (after FuseTIR)."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch = s_tir.Schedule(func)
            blocks = find_binary_blocks(sch)
            if not blocks:
                continue
            for block in blocks:
                schedule_binary(sch, block, self.lanes)
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return mod


def binary_kernels(mod) -> Dict[str, dict]:
    """What ``BinaryLayers`` made of each marked layer ({} when it did not run)."""
    return json_attr(mod, BINARY_KERNELS_ATTR, {})


class BinaryKernels(KernelHook):
    name = "binary"
    feature = None  # offered on every preset of the family; the binary pass marks the layers

    def rewrites(self, profile):
        return [BinaryLayers()]

    def schedules(self, profile):
        from .base import get_family

        return [ScheduleBinary(get_family(profile.family).vector_lanes(profile))]

    def facts(self, profile):
        return {"binary_kernels": True}


BINARY = BinaryKernels()
