"""HardSwishAsHardSigmoid: hard-swish expressions in the ONNX definition's form, without a division.

Needs: Relax as imported. Exported models spell hard-swish ``x * relu6(x + 3) / 6`` in element-wise
ops (Paddle's export: ``Add``, ``Clip``, ``Mul``, ``Div``: ``(x * clamp(x + 3, 0, 6)) / 6``; the
importer's own ``HardSwish``: ``x * (clip(x + 3, 0, 6) / 6)``; the clamp as ``clip`` or as
``maximum``/``minimum``). Each becomes ``x * clip(x * (1/6) + 0.5, 0, 1)``, the operator's
definition in the ONNX spec (``x * HardSigmoid<alpha=1/6, beta=0.5>(x)``), which onnxruntime
evaluates for ``HardSwish``. The two forms agree to an ulp; the cost differs by the division: a
``vdivps`` per 8 values on AVX2 (one per 4-5 cycles, the rest of a conv epilogue a few
instructions per cycle) in every hard-swish epilogue (MobileNetV3, PP-LCNet, the PP-OCR models)
whose division ``Fold`` cannot move into a neighbouring layer (14 of the PP-OCRv4 detector's 24),
and the multiply-add replaces the add.

Runs right after import with the other canonicalizations, before the compression passes (a
quantized model requantizes the same expression its float twin computes).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from tvm_compress.relax_utils import copy_module, scalar_value


def _patterns():
    """(x, offset, low, high, divisor) patterns and the pattern of the whole expression."""
    x, offset, low, high, divisor = wildcard(), is_const(), wildcard(), wildcard(), is_const()
    z = is_op("relax.add")(x, offset)
    gate = (is_op("relax.clip")(z, low, high)
            | is_op("relax.minimum")(is_op("relax.maximum")(z, low), high)
            | is_op("relax.maximum")(is_op("relax.minimum")(z, high), low))
    product = is_op("relax.multiply")(x, gate) | is_op("relax.multiply")(gate, x)
    scaled = is_op("relax.divide")(gate, divisor)
    whole = (is_op("relax.divide")(product, divisor)
             | is_op("relax.multiply")(x, scaled) | is_op("relax.multiply")(scaled, x))
    return (x, offset, low, high, divisor), whole


def _value(expr):
    """A scalar constant's or a clip bound's value as a float, else None."""
    if isinstance(expr, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return float(expr.value)
    value = scalar_value(expr)
    return None if value is None else float(value)


@tvm.transform.module_pass(opt_level=0, name="HardSwishAsHardSigmoid")
class HardSwishAsHardSigmoid:
    """Rewrite the importer's HardSwish expressions of every Relax function (see the module
    docstring); other expressions of the same shape (another offset or bound) stay."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        (x_p, *const_ps), pattern = _patterns()

        def rewrite(expr, matches):
            dtype = str(expr.ty.dtype)
            if [_value(matches[p]) for p in const_ps] != [3.0, 0.0, 6.0, 6.0] or dtype not in ("float32", "float16"):
                return expr
            x = matches[x_p]
            gate = relax.op.add(relax.op.multiply(x, relax.const(np.array(1.0 / 6.0, dtype), dtype)),
                                relax.const(np.array(0.5, dtype), dtype))
            return relax.op.multiply(x, relax.op.clip(gate, 0, 1))

        out = mod
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = rewrite_call(pattern, rewrite, func)
                if not new.same_as(func):
                    out = copy_module(mod) if out is mod else out
                    out[gv] = new
        return out
