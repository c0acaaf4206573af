"""QuantizeAnnotate: mark the layers that will run in int8 and where activations are observed.

Needs: a float32 Relax module as the ONNX importer gives it (weights as constants,
``keep_params_in_input=False``), NCHW/OIHW conv2d; layers named at import
(``tvm_compress.layers``; unnamed ones are called ``<kind>_<index>``). Runs first in the int8
flow, before ``Calibrate`` and ``QuantizeRealize``, and before ``LegalizeOps``; rewrites every
Relax function of the module.

Layers are conv2d (plain, grouped, depthwise) and matmul/dense whose weight is a constant. The
pass wraps each kept layer's weight in a ``weight`` marker and puts one ``observe`` marker on the
tensor that feeds it. The observed tensor is found by walking back through ops that keep a
quantized value exact (max-pool, reshape, flatten, transpose), so that a conv -> relu -> max-pool
-> conv chain is observed once and can stay in int8 from one layer to the next. The followers of a
layer (bias add, relu/clip, residual add) are left in place: QuantizeRealize keeps them in the
epilogue of the integer kernel, where FuseOps fuses them with the requantize.

The markers are identities, so the annotated module still computes the float model. Layer names,
kinds and shapes go to the module attribute ``tvm_compress.quantize`` for the later passes and the
report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.errors import PassOptionError

from tvm_compress import relax_utils as ru
from tvm_compress.layers import layer_name, with_layer
from tvm_compress.relax_utils import relax_functions
from tvm_compress.specs import binary_layers, sparse_layers

from . import _quant_common as qc

LAYER_KINDS = ("conv2d", "grouped_conv2d", "depthwise_conv2d", "matmul")


@dataclass(frozen=True)
class QuantizeAnnotateConfig:
    """Which layers to quantize.

    ops: layer kinds to quantize, out of ``conv2d``, ``grouped_conv2d``, ``depthwise_conv2d``,
        ``matmul`` (dense/Gemm/MatMul with a constant weight).
    skip: layers to keep in float, by name or by index (position among the candidate layers, in
        graph order, as the report lists them).
    skip_first / skip_last: keep the first / last candidate layer in float.
    """

    ops: Tuple[str, ...] = LAYER_KINDS
    skip: Tuple[Union[str, int], ...] = ()
    skip_first: bool = False
    skip_last: bool = False

    def __post_init__(self):
        for kind in self.ops:
            if kind not in LAYER_KINDS:
                raise PassOptionError(
                    f"unknown layer kind {kind!r} in quantize ops; choose from {', '.join(LAYER_KINDS)}"
                )


def _anchor_patterns():
    weight = is_const()
    conv = is_op("relax.nn.conv2d")(wildcard(), weight)
    # Gemm(transB=1) imports as matmul(x, permute_dims(W)); MatMul with an initializer as matmul(x, W).
    mm_weight = is_const() | is_op("relax.permute_dims")(is_const())
    matmul = is_op("relax.matmul")(wildcard(), mm_weight)
    return conv, matmul


# Ops whose output has exactly the quantization of their input: a quantized tensor passes through.
_PASSTHROUGH_OPS = tuple(
    tvm.ir.Op.get(name)
    for name in (
        "relax.nn.max_pool2d",
        "relax.reshape",
        "relax.flatten",
        "relax.permute_dims",
        "relax.squeeze",
        "relax.expand_dims",
    )
)


_RESHAPE = tvm.ir.Op.get("relax.reshape")
_FLATTEN = tvm.ir.Op.get("relax.flatten")


def is_passthrough(call) -> bool:
    return isinstance(call, relax.Call) and any(call.op.same_as(op) for op in _PASSTHROUGH_OPS)


def _conv_kind(call: relax.Call) -> Optional[str]:
    groups = int(call.attrs.groups)
    if groups == 1:
        return "conv2d"
    w_shape = ru.tensor_shape(call.args[1])
    if w_shape[1] == 1:
        return "depthwise_conv2d"
    return "grouped_conv2d"


class _Layer:
    def __init__(self, index, kind, binding_var, call, weight: np.ndarray, source):
        self.index = index
        self.kind = kind
        self.binding_var = binding_var
        self.call = call
        self.weight = weight  # numpy, in the layout the integer op uses (OIHW, or [K, N])
        self.source = source  # the Var whose value gets observed
        self.name = ""
        self.status = "int8"
        self.reason = ""
        self.flattened = False  # a dense layer reading a flattened feature map (``_flattens_a_map``)


def _flattens_a_map(call: relax.Call) -> bool:
    """A reshape/flatten that merges a 4-D map's channels with its pixels (``[N, C, H, W]``
    -> ``[N, C*H*W]``, H*W > 1): the rows of a dense weight after it follow the map's layout."""
    if not (call.op.same_as(_RESHAPE) or call.op.same_as(_FLATTEN)):
        return False
    src, out = ru.static_shape(call.args[0]), ru.static_shape(call)
    return src is not None and out is not None and len(src) == 4 and src[2] * src[3] > 1 \
        and list(out) == [src[0], src[1] * src[2] * src[3]]


def _find_layers(func: relax.Function, first_index: int = 0) -> List[_Layer]:
    conv_pat, mm_pat = _anchor_patterns()
    var2val = relax.analysis.get_var2val(func)
    layers: List[_Layer] = []

    for block in func.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            call = binding.value
            kind = None
            weight = None
            if conv_pat.match(call):
                attrs = call.attrs
                if (
                    str(attrs.data_layout) != "NCHW"
                    or str(attrs.kernel_layout) != "OIHW"
                    or str(attrs.out_layout) != "NCHW"
                ):
                    continue
                kind = _conv_kind(call)
                weight = ru.const_value(call.args[1])
            elif mm_pat.match(call, var2val):
                w_expr = call.args[1]
                w_val = var2val.get(w_expr, w_expr) if isinstance(w_expr, relax.Var) else w_expr
                if ru.is_constant(w_val):
                    weight = ru.const_value(w_val)
                else:
                    axes = w_val.attrs.axes
                    inner = w_val.args[0]
                    inner = var2val.get(inner, inner) if isinstance(inner, relax.Var) else inner
                    weight = ru.const_value(inner)
                    axes = list(range(weight.ndim))[::-1] if axes is None else [int(a) for a in axes]
                    weight = np.transpose(weight, axes)
                if weight.ndim != 2:
                    continue
                kind = "matmul"
            if kind is None:
                continue
            data = call.args[0]
            if ru.tensor_dtype(data) != "float32" or str(weight.dtype) != "float32":
                continue
            if str(call.ty.dtype) != "float32":
                continue
            source, flattened = data, False
            while isinstance(source, relax.Var) and is_passthrough(var2val.get(source)):
                flattened = flattened or _flattens_a_map(var2val[source])
                source = var2val[source].args[0]
            if not isinstance(source, relax.Var):
                continue
            layer = _Layer(first_index + len(layers), kind, binding.var, call, weight, source)
            layer.flattened = kind == "matmul" and flattened
            layer.name = layer_name(call) or f"{kind}_{layer.index}"
            layers.append(layer)
    return layers


@mutator
class _Annotator(PyExprMutator):
    def __init__(self, mod, layers: List[_Layer], sources: Dict, params: List):
        super().__init__(mod)
        self.layer_by_var = {layer.binding_var: layer for layer in layers if layer.status == "int8"}
        self.sources = sources  # source Var -> point id
        self.param_sources = [p for p in params if p in sources]
        self.observed_params = set()

    def _observe_params(self, binding):
        # A model input is observed where it is first needed, so every later use sees the marker.
        for param in self.param_sources:
            if param in self.observed_params:
                continue
            used = [v for v in relax.analysis.free_vars(binding.value) if v.same_as(param)]
            if used:
                self.observed_params.add(param)
                obs = self.builder_.emit(qc.observe(param, self.sources[param]), "obs_" + param.name)
                self.set_var_remap(param, obs)

    def visit_var_binding_(self, binding):
        self._observe_params(binding)
        layer = self.layer_by_var.get(binding.var)
        if layer is not None:
            call = layer.call
            data = self.visit_expr(call.args[0])
            weight = self.builder_.emit(qc.mark_weight(ru.const(layer.weight), layer.index), "w")
            # Named, so the later passes and the report join on the layer's name.
            new_call = with_layer(relax.Call(call.op, [data, weight], call.attrs, call.ty_args), layer.name)
            new_var = ru.emit_like(self.builder_, binding.var, new_call)
            self.set_var_remap(binding.var, new_var)
        else:
            super().visit_var_binding_(binding)
        point = self.sources.get(binding.var)
        if point is not None:
            new_var = self.get_var_remap(binding.var)
            new_var = binding.var if new_var is None else new_var
            obs = ru.emit_like(self.builder_, binding.var, qc.observe(new_var, point), "obs")
            self.set_var_remap(binding.var, obs)


def _apply_skips(layers: List[_Layer], config: QuantizeAnnotateConfig, sparse=(), binary=()) -> None:
    names = {layer.name: layer for layer in layers}
    for layer in layers:
        if layer.name in sparse:
            layer.status, layer.reason = "float", "block-sparse (the sparse kernels are float32)"
        if layer.name in binary:
            layer.status, layer.reason = "float", "binary (1-bit kernels)"
    for item in config.skip:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            idx = int(item)
            if not 0 <= idx < len(layers):
                raise PassOptionError(
                    f"quantize skip index {idx} out of range: the model has {len(layers)} quantizable layers"
                )
            target = layers[idx]
        else:
            if item not in names:
                some = ", ".join(list(names)[:6])
                raise PassOptionError(f"quantize skip: no layer named {item!r} (layers: {some}, ...)")
            target = names[item]
        target.status, target.reason = "float", "skipped by --quant-skip"
    for layer in layers:
        if layer.kind not in config.ops and layer.status == "int8":
            layer.status, layer.reason = "float", f"layer kind {layer.kind} not in quantize ops"
    if layers and config.skip_first:
        layers[0].status, layers[0].reason = "float", "first layer kept in float (skip_first)"
    if layers and config.skip_last:
        layers[-1].status, layers[-1].reason = "float", "last layer kept in float (skip_last)"


@tvm.transform.module_pass(opt_level=0, name="QuantizeAnnotate")
class QuantizeAnnotate:
    """Mark conv2d/matmul layers for int8 and insert activation observation points."""

    def __init__(self, config: Optional[QuantizeAnnotateConfig] = None):
        self.config = config or QuantizeAnnotateConfig()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        funcs = relax_functions(mod)
        per_func, layers = [], []
        for gv, func in funcs:
            found = _find_layers(func, len(layers))
            per_func.append((gv, func, found))
            layers += found
        sparse = {n for n, m in sparse_layers(mod).items() if m.get("kernel") == "sparse"}
        _apply_skips(layers, self.config, sparse, set(binary_layers(mod)))

        # Points are numbered in graph order of the observed tensors (params first), function
        # by function.
        sources: Dict = {}
        for _, func, found in per_func:
            order = {v: i for i, v in enumerate(func.params)}
            for block in func.body.blocks:
                for binding in block.bindings:
                    order[binding.var] = len(order)
            observed = {l.source for l in found if l.status == "int8"}
            for var in sorted(observed, key=lambda v: order.get(v, 1 << 30)):
                sources[var] = len(sources)

        new_mod = mod
        for gv, func, found in per_func:
            annotator = _Annotator(new_mod, found, sources, list(func.params))
            annotator.builder_.update_func(gv, annotator.visit_expr(func))
            new_mod = annotator.builder_.get()
        new_mod = relax.transform.DeadCodeElimination([gv.name_hint for gv, _ in funcs])(new_mod)

        report = qc.read_report(mod)
        report.setdefault("float_weight_bytes", sum(ru.constant_bytes(mod).values()))
        report["layers"] = [
            {
                "index": layer.index,
                "name": layer.name,
                "op": layer.kind,
                "weight_shape": list(layer.weight.shape),
                "flattened_input": layer.flattened,
                "input_point": sources.get(layer.source) if layer.status == "int8" else None,
                "status": layer.status,
                "reason": layer.reason,
            }
            for layer in layers
        ]
        report["points"] = [
            {
                "id": pid,
                "shape": ru.tensor_shape(var),
                "layers": [
                    layer.index for layer in layers if layer.status == "int8" and layer.source.same_as(var)
                ],
            }
            for var, pid in sources.items()
        ]
        return qc.write_report(new_mod, report)
