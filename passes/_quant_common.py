"""Shared pieces of the int8 flow (QuantizeAnnotate -> Calibrate -> QuantizeRealize).

The three passes talk through the IR itself:

* after QuantizeAnnotate, activation observation points are
  ``R.call_pure_packed("tvm_compress.quant.observe", x, R.prim_value(point_id))`` and weights of
  the layers to quantize are wrapped in ``R.call_pure_packed("tvm_compress.quant.weight", w,
  R.prim_value(layer_id))``; both are identities, so the annotated module still runs in float;
* after Calibrate, they are plain ``R.quantize``/``R.dequantize`` (QDQ) pairs with fixed scales,
  the same form the ONNX importer gives for QuantizeLinear/DequantizeLinear models;
* QuantizeRealize turns QDQ around conv2d/matmul into integer compute.

Facts the user should see (layer names, scales, errors, fallbacks) travel in the module attribute
``REPORT_ATTR`` as a JSON string; ``read_report``/``write_report`` access it.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import ExternFuncPattern, is_op, wildcard

from tvm_compress import errors as _errors

# Errors raised inside a pass cross the FFI; registered classes come back as themselves (not as
# RuntimeError), so the CLI can print them as one line.
for _cls in vars(_errors).values():
    if isinstance(_cls, type) and issubclass(_cls, _errors.TvmCompressError):
        tvm_ffi.register_error(_cls)

OBSERVE_FUNC = "tvm_compress.quant.observe"
WEIGHT_FUNC = "tvm_compress.quant.weight"
REPORT_ATTR = "tvm_compress.quantize"


# Both markers are identities at run time, so an annotated module can be compiled and run as is.
@tvm.register_global_func(OBSERVE_FUNC, override=True)
def _observe_identity(x, _point_id):
    return x


@tvm.register_global_func(WEIGHT_FUNC, override=True)
def _weight_identity(w, _layer_id):
    return w


OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
OP_MATMUL = tvm.ir.Op.get("relax.matmul")
OP_QUANTIZE = tvm.ir.Op.get("relax.quantize")
OP_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def observe_pattern():
    """``observe(x, id)``: the marker QuantizeAnnotate puts on an activation."""
    return is_op("relax.call_pure_packed")(ExternFuncPattern(OBSERVE_FUNC), wildcard(), wildcard())


def weight_pattern():
    """``weight(w, layer)``: the marker QuantizeAnnotate puts on a weight constant."""
    return is_op("relax.call_pure_packed")(ExternFuncPattern(WEIGHT_FUNC), wildcard(), wildcard())


def observe(x: relax.Expr, point_id: int) -> relax.Expr:
    return relax.call_pure_packed(OBSERVE_FUNC, x, relax.prim_value(point_id), ty_args=x.ty)


def mark_weight(w: relax.Expr, layer_id: int) -> relax.Expr:
    return relax.call_pure_packed(WEIGHT_FUNC, w, relax.prim_value(layer_id), ty_args=w.ty)


def marker_id(call: relax.Call) -> int:
    """The point or layer id of an observe/weight marker call."""
    return int(call.args[2].value) if len(call.args) > 2 else int(call.args[1].value)


def marker_arg(call: relax.Call) -> relax.Expr:
    # call_pure_packed(ExternFunc, x, id): the callee is args[0].
    return call.args[1]









def read_report(mod: tvm.IRModule) -> Dict[str, Any]:
    attrs = mod.attrs
    if attrs is not None and REPORT_ATTR in attrs:
        return json.loads(str(attrs[REPORT_ATTR]))
    return {}


def write_report(mod: tvm.IRModule, report: Dict[str, Any]) -> tvm.IRModule:
    return mod.with_attr(REPORT_ATTR, json.dumps(report))


def strip_report(mod: tvm.IRModule) -> tvm.IRModule:
    attrs = mod.attrs
    if attrs is None or REPORT_ATTR not in attrs:
        return mod
    rest = {k: attrs[k] for k in attrs.keys() if k != REPORT_ATTR}
    return tvm.IRModule(dict(mod.functions_items()), attrs=rest or None)
