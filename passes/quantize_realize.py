"""QuantizeRealize: rewrite QDQ (fake-quantized) conv2d/matmul into integer compute.

Needs: a module with ``R.quantize``/``R.dequantize`` around conv2d/matmul, from ``Calibrate`` or
from an imported ONNX QDQ model (QuantizeLinear/DequantizeLinear). Runs last in the int8 flow,
before ``LegalizeOps``/``FuseOps`` (the driver's lowering), which must follow for the fusion below.
Rewrites every Relax function; the integer calls keep the layer's name (``tvm_compress.layers``),
and the report joins on it.

For ``conv2d(dequantize(xq, sx, zx), dequantize(wq, sw, 0))`` (and the same for matmul) with
int8/uint8 ``xq``, per-tensor ``sx``/``zx``, int8 constant ``wq`` and per-channel or per-tensor
``sw``, the pass emits

    acc = conv2d(xq, wq, out_dtype="int32")          # int8 x int8 -> int32 accumulation
    y   = astype(acc, "float32") * (sx * sw) [+ zero-point correction]

and leaves the layer's followers (bias add, relu/clip, residual add) and the next
``R.quantize`` as they are: they are element-wise, so FuseOps puts them all into the conv's kernel
(the requantize is fused into the producing kernel; the int32 accumulator never reaches memory).
``dequantize`` is moved past max-pool/reshape/flatten/transpose so those run on int8, and a
``quantize(dequantize(x))`` with the same parameters is dropped, so consecutive quantized layers
hand int8 tensors to each other with no dequantize/quantize pair between them.

Zero points: a non-zero activation zero point becomes an explicit pad with that value (so zero
padding stays exact) and a per-channel correction ``-zx * sum(wq)``; weights must have zero
points of 0 (symmetric), otherwise the layer stays fake-quantized and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.errors import PassOptionError

from tvm_compress import relax_utils as ru
from tvm_compress.layers import layer_name, with_layer
from tvm_compress.relax_utils import relax_functions

from . import _quant_common as qc
from .quantize_annotate import is_passthrough


@dataclass(frozen=True)
class QuantizeRealizeConfig:
    """ops: layer kinds to realize (``conv2d``, ``matmul``); others stay as they came.

    keep_float: layer indices (in graph order of the quantized layers) left fake-quantized.
    speed_table: JSON of measured per-layer kernel times on the target (``scripts/bench_int8.py``
        writes one: ``{"target": ..., "layers": {key: {"float_ms": f, "int8_ms": q, "layer":
        name}}}``, keys from ``layer_key``). A layer's entry is the one with its name, else the
        one with its shape key (a table measured on another model). Layers that ran slower in
        int8 are reported (and logged). Where an entry also has ``float_segment_ms`` and
        ``int8_segment_ms`` (the layer's kernel and the kernels after it up to the next layer's:
        a tail one build fuses into the conv and the other runs apart), those are compared.
    slow_layers: ``report`` (default: realize them anyway, say so) or ``float`` (keep them float).
    """

    ops: tuple = ("conv2d", "matmul")
    keep_float: tuple = ()
    speed_table: Optional[str] = None
    slow_layers: str = "report"

    def __post_init__(self):
        for kind in self.ops:
            if kind not in ("conv2d", "matmul"):
                raise PassOptionError(f"unknown realize op {kind!r}; choose from conv2d, matmul")
        if self.slow_layers not in ("report", "float"):
            raise PassOptionError(f"slow_layers must be 'report' or 'float', got {self.slow_layers!r}")

    def load_speed_table(self) -> dict:
        if not self.speed_table:
            return {}
        import json
        from pathlib import Path

        from tvm_compress.errors import DataError

        path = Path(self.speed_table)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"int8 speed table {path} cannot be read ({type(err).__name__})") from None
        if not isinstance(table, dict) or not isinstance(table.get("layers"), dict):
            raise DataError(f"int8 speed table {path} has no 'layers' mapping")
        return table


def layer_key(kind: str, weight_shape, out_shape) -> str:
    """Shape key of a layer in a speed table: op, weight shape (OIHW or [K, N]), output shape."""
    return f"{kind}:w{'x'.join(str(int(d)) for d in weight_shape)}:o{'x'.join(str(int(d)) for d in out_shape)}"


def _dq_pattern(data=None):
    return is_op("relax.dequantize")(data or wildcard(), is_const(), is_const())


def _patterns():
    x = _dq_pattern()
    w = _dq_pattern(is_const())
    conv = is_op("relax.nn.conv2d")(x, w)
    matmul = is_op("relax.matmul")(x, w)
    return conv, matmul


@mutator
class _Realizer(PyExprMutator):
    def __init__(self, mod, config: QuantizeRealizeConfig):
        super().__init__(mod)
        self.config = config
        self.conv_pat, self.mm_pat = _patterns()
        self.dq_pat = _dq_pattern()
        self.q_pat = is_op("relax.quantize")(wildcard(), is_const(), is_const())
        self.perm_pat = is_op("relax.permute_dims")(_dq_pattern(is_const()))
        self.layers: List[dict] = []
        self.speed_table = config.load_speed_table()
        # Entries are found by layer name (a table measured on this model), else by shape key.
        self.speed_by_name = {v["layer"]: v for v in self.speed_table.get("layers", {}).values()
                              if isinstance(v, dict) and "layer" in v}
        self.slow: List[str] = []
        self._speed = None

    # -- helpers -------------------------------------------------------------------------------
    def _bound(self, expr):
        """The value bound to ``expr`` in the function being built (or ``expr`` itself)."""
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if value is not None:
                return value
        return expr

    def _var2val(self, call) -> Dict:
        out = {}
        for arg in call.args:
            if isinstance(arg, relax.Var):
                value = self.lookup_binding(arg)
                if value is not None:
                    out[arg] = value
        return out

    def _per_tensor_dq(self, expr):
        dq = self._bound(expr)
        if not (isinstance(dq, relax.Call) and self.dq_pat.match(dq)):
            return None
        if ru.scalar_value(dq.args[1]) is None or ru.scalar_value(dq.args[2]) is None:
            return None
        return dq

    # -- rewrites ------------------------------------------------------------------------------
    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.Call):
            new_call = self.visit_expr(value)
            new = None
            if isinstance(new_call, relax.Call):
                if self.perm_pat.match(new_call, self._var2val(new_call)):
                    new = self._fold_weight_transpose(new_call)
                elif is_passthrough(new_call):
                    new = self._push_dequantize(new_call)
                elif self.q_pat.match(new_call):
                    new = self._cancel_pair(new_call)
                elif self.conv_pat.match(new_call, self._var2val(new_call)):
                    new = self._realize("conv2d", new_call)
                elif self.mm_pat.match(new_call, self._var2val(new_call)):
                    new = self._realize("matmul", new_call)
                else:
                    self._note_unrealized(new_call)
            if new is not None:
                self.set_var_remap(binding.var, ru.emit_like(self.builder_, binding.var, new))
                return
        super().visit_var_binding_(binding)

    def _push_dequantize(self, call):
        dq = self._per_tensor_dq(call.args[0])
        if dq is None:
            return None
        inner = relax.Call(call.op, [dq.args[0]] + list(call.args[1:]), call.attrs, call.ty_args)
        inner = self.builder_.emit(inner)
        return relax.op.dequantize(inner, dq.args[1], dq.args[2], axis=-1, out_dtype=str(call.ty.dtype))

    def _fold_weight_transpose(self, call):
        dq = self._bound(call.args[0])
        w = ru.const_value(dq.args[0])
        axes = call.attrs.axes
        axes = list(range(w.ndim))[::-1] if axes is None else [int(a) for a in axes]
        axis = int(dq.attrs.axis) % w.ndim
        scale, zp = ru.const_value(dq.args[1]), ru.const_value(dq.args[2])
        return relax.op.dequantize(
            ru.const(np.ascontiguousarray(np.transpose(w, axes))), ru.const(scale), ru.const(zp),
            axis=axes.index(axis), out_dtype=str(dq.attrs.out_dtype),
        )

    def _cancel_pair(self, call):
        dq = self._per_tensor_dq(call.args[0])
        if dq is None or ru.scalar_value(call.args[1]) is None or ru.scalar_value(call.args[2]) is None:
            return None
        same = (
            np.float32(ru.scalar_value(dq.args[1])) == np.float32(ru.scalar_value(call.args[1]))
            and int(ru.scalar_value(dq.args[2])) == int(ru.scalar_value(call.args[2]))
            and ru.tensor_dtype(dq.args[0]) == str(call.attrs.out_dtype)
        )
        if not same:
            return None
        return dq.args[0]

    def _weight_ok(self, wdq, out_axis: int):
        """(int8 weights, per-out-channel scale vector) or a reason string."""
        wq = ru.const_value(wdq.args[0])
        if str(wq.dtype) != "int8":
            return f"weight dtype {wq.dtype} is not int8"
        zp = ru.const_value(wdq.args[2])
        if np.any(zp != 0):
            return "weight zero point is not 0 (asymmetric weights)"
        scale = ru.const_value(wdq.args[1]).astype("float32")
        n_out = wq.shape[out_axis]
        if scale.size == 1:
            scale = np.full(n_out, scale.reshape(()).item(), "float32")
        elif int(wdq.attrs.axis) % wq.ndim != out_axis or scale.size != n_out:
            return "weight scales are not per output channel"
        return wq, scale.reshape(-1)

    def _act_ok(self, xdq):
        xq = xdq.args[0]
        dtype = ru.tensor_dtype(xq)
        if dtype not in ("int8", "uint8"):
            return f"activation dtype {dtype} is not int8/uint8"
        if ru.scalar_value(xdq.args[1]) is None or ru.scalar_value(xdq.args[2]) is None:
            return "activation is not quantized per tensor"
        return xq, float(ru.scalar_value(xdq.args[1])), int(ru.scalar_value(xdq.args[2])), dtype

    def _skip(self, kind: str, call=None) -> Optional[str]:
        if kind not in self.config.ops:
            return f"{kind} not in realize ops"
        index = len(self.layers)
        if index in self.config.keep_float or str(index) in self.config.keep_float:
            return "kept float by keep_float"
        self._speed = None
        if call is not None and self.speed_table:
            key = layer_key(kind, self._weight_shape(call), ru.tensor_shape(call))
            entry = self.speed_by_name.get(layer_name(call)) or self.speed_table["layers"].get(key)
            segment = bool(entry and entry.get("int8_segment_ms") and entry.get("float_segment_ms"))
            f_key, q_key = ("float_segment_ms", "int8_segment_ms") if segment else ("float_ms", "int8_ms")
            if entry and entry.get(q_key) and entry.get(f_key):
                f_ms, q_ms = float(entry[f_key]), float(entry[q_key])
                self._speed = {"float_ms": f_ms, "int8_ms": q_ms, "speedup": f_ms / q_ms,
                               "measured": "kernel and tail" if segment else "kernel"}
                if q_ms > f_ms:
                    what = "this layer (its kernel and tail)" if segment else "this shape"
                    msg = (f"int8 measured slower than float for {what} on "
                           f"{self.speed_table.get('target', 'the target')}: {q_ms:.4g} ms vs {f_ms:.4g} ms")
                    self.slow.append(msg)
                    self._speed["note"] = msg
                    if self.config.slow_layers == "float":
                        return msg + " (kept float)"
        return None

    def _weight_shape(self, call):
        wdq = self._bound(call.args[1])
        shape = ru.tensor_shape(wdq.args[0])
        axis = int(wdq.attrs.axis) % len(shape)
        if call.op.same_as(qc.OP_MATMUL) and len(shape) == 2 and axis == 0:
            shape = shape[::-1]  # imported Gemm weight [N, K] before its transpose is folded
        return shape

    def _record(self, kind, call, xinfo, scale, status, reason=""):
        index = len(self.layers)
        entry = {"index": index, "name": layer_name(call) or f"{kind}_{index}", "op": kind,
                 "status": status, "reason": reason,
                 "weight_shape": ru.tensor_shape(self._bound(call.args[1]).args[0])}
        if xinfo is not None and not isinstance(xinfo, str):
            entry.update(input_dtype=xinfo[3], input_scale=xinfo[1], input_zero_point=xinfo[2])
        if scale is not None and not isinstance(scale, str):
            entry.update(weight_scale_min=float(scale.min()), weight_scale_max=float(scale.max()))
        if self._speed is not None:
            entry["speed"] = dict(self._speed)
        self.layers.append(entry)

    def _realize(self, kind: str, call):
        """``kind``(dequantize(xq), dequantize(wq)) -> int32 ``kind``(xq, wq), rescaled to float
        per output channel; the new calls keep the layer's name."""
        xdq, wdq = self._bound(call.args[0]), self._bound(call.args[1])
        reason = self._skip(kind, call)
        wq_shape = ru.tensor_shape(wdq.args[0])
        if kind == "conv2d":
            attrs = call.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
                reason = reason or "conv2d layout is not NCHW/OIHW"
            winfo = self._weight_ok(wdq, 0)
            # per output channel: axis 1 of NCHW outputs; a conv's reduction axes of OIHW
            channel_shape, reduce_axes = (1, -1, 1, 1), (1, 2, 3)
        else:
            winfo = self._weight_ok(wdq, 1) if len(wq_shape) == 2 else "matmul weight is not 2-d"
            channel_shape, reduce_axes = (-1,), 0
        xinfo = self._act_ok(xdq)
        reason = reason or (xinfo if isinstance(xinfo, str) else None) or (
            winfo if isinstance(winfo, str) else None)
        if reason:
            self._record(kind, call, xinfo, None if isinstance(winfo, str) else winfo[1], "float", reason)
            return self._float_layer(call, wdq)
        xq, sx, zx, _ = xinfo
        wq, sw = winfo
        acc = self._conv_acc(call, xq, wq, zx) if kind == "conv2d" else \
            relax.op.matmul(xq, ru.const(wq), out_dtype="int32")
        acc = self.builder_.emit(with_layer(acc, call), "acc")
        mult = (sx * sw).astype("float32")
        acc_f = self.builder_.emit(relax.op.astype(acc, "float32"))
        y = with_layer(relax.op.multiply(acc_f, ru.const(mult.reshape(channel_shape))), call)
        if zx != 0:
            corr = (-float(zx) * mult * wq.astype("int64").sum(axis=reduce_axes)).astype("float32")
            y = with_layer(relax.op.add(self.builder_.emit(y), ru.const(corr.reshape(channel_shape))), call)
        self._record(kind, call, xinfo, sw, "int8")
        return y

    @staticmethod
    def _float_layer(call, wdq):
        """A layer kept float: its weight ``dequantize(wq)`` as a float constant of the same
        values, so the float kernel reads a constant weight (the target's float layout hooks
        take it, and no per-call dequantize of the weight runs) while computing exactly what
        the fake-quantized layer computes."""
        wq = ru.const_value(wdq.args[0]).astype("int32")
        scale = ru.const_value(wdq.args[1]).astype("float32")
        zp = ru.const_value(wdq.args[2]).astype("int32")
        shape = [1] * wq.ndim
        shape[int(wdq.attrs.axis) % wq.ndim] = -1

        def along_axis(v):
            return v.reshape(shape) if v.size > 1 else v.reshape(())

        # The legalized dequantize's arithmetic: (int - zp) in integers, cast, times the scale.
        w = (wq - along_axis(zp)).astype("float32") * along_axis(scale)
        w = ru.const(w.astype(str(wdq.attrs.out_dtype)))
        return with_layer(relax.Call(call.op, [call.args[0], w, *call.args[2:]], call.attrs, call.ty_args), call)

    def _conv_acc(self, call, xq, wq, zx):
        attrs = call.attrs
        padding = [int(p) for p in attrs.padding]
        data = xq
        if zx != 0 and any(padding):
            # Zero padding in real values is zx in the quantized domain.
            top, left, bottom, right = padding
            data = self.builder_.emit(relax.op.nn.pad(xq, [0, 0, 0, 0, top, bottom, left, right],
                                                      pad_value=float(zx)))
            padding = [0, 0, 0, 0]
        return relax.op.nn.conv2d(
            data, ru.const(wq), strides=attrs.strides, padding=padding, dilation=attrs.dilation,
            groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32",
        )

    def _note_unrealized(self, call):
        """A conv2d/matmul fed by dequantize that no rule took: it computes in float."""
        if not (call.op.same_as(qc.OP_CONV2D) or call.op.same_as(qc.OP_MATMUL)):
            return
        fed = [self._bound(a) for a in call.args]
        if any(isinstance(a, relax.Call) and self.dq_pat.match(a) for a in fed):
            kind = "conv2d" if call.op.same_as(qc.OP_CONV2D) else "matmul"
            w = fed[1]
            shape = ru.tensor_shape(w.args[0] if isinstance(w, relax.Call) and self.dq_pat.match(w) else w)
            index = len(self.layers)
            self.layers.append({"index": index, "name": layer_name(call) or f"{kind}_{index}",
                                "op": kind, "status": "float", "weight_shape": shape,
                                "reason": "dequantized input but no constant int8 weight / scale: "
                                          "stays fake-quantized (float compute)"})


def _merge_report(report: dict, realized: List[dict], weight_bytes: Dict[str, int]) -> dict:
    layers = report.get("layers")
    if layers:
        # Joined by layer name: annotate named every layer it marked, realize reads the names
        # back from the calls.
        by_name = {r["name"]: r for r in realized}
        for l in layers:
            r = by_name.pop(l["name"], None)
            if r is None or l["status"] != "int8":
                continue
            l["realized"] = r["status"] == "int8"
            if "speed" in r:
                l["speed"] = r["speed"]
            if r["status"] != "int8":
                l["status"], l["reason"] = "fake-quant", r["reason"]
        if by_name:  # QDQ layers annotate did not make (an imported QDQ part)
            report["realize_layers"] = list(by_name.values())
    else:
        report["layers"] = list(realized)
        report["source"] = "imported QDQ model"
    total = int(sum(weight_bytes.values()))
    report["weight_bytes"] = {"by_dtype": weight_bytes, "total": total}
    if report.get("float_weight_bytes"):
        report["weight_bytes"]["float_total"] = int(report["float_weight_bytes"])
        report["weight_bytes"]["ratio"] = total / float(report["float_weight_bytes"])
    report["realized_layers"] = sum(1 for r in realized if r["status"] == "int8")
    return report


@tvm.transform.module_pass(opt_level=0, name="QuantizeRealize")
class QuantizeRealize:
    """Turn QDQ conv2d/matmul into int8 x int8 -> int32 compute with a fused requantize."""

    def __init__(self, config: Optional[QuantizeRealizeConfig] = None, log=None):
        self.config = config or QuantizeRealizeConfig()
        self.log = log or (lambda msg: None)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        realizer = _Realizer(mod, self.config)
        funcs = relax_functions(mod)
        for gv, func in funcs:
            realizer.builder_.update_func(gv, realizer.visit_expr(func))
        new_mod = realizer.builder_.get()
        new_mod = relax.transform.DeadCodeElimination([gv.name_hint for gv, _ in funcs])(new_mod)
        report = _merge_report(qc.read_report(mod), realizer.layers, ru.constant_bytes(new_mod))
        for msg in realizer.slow:
            self.log(f"quantize: warning: {msg}")
        if realizer.speed_table:
            report["speed_table"] = {"path": str(self.config.speed_table),
                                     "target": realizer.speed_table.get("target"),
                                     "slower_in_int8": len(realizer.slow)}
        return qc.write_report(new_mod, report)
