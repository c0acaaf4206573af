"""PackInt8Conv: int8 conv2d and matmul with a constant weight -> packed-weight dot-product kernel.

Needs: realized int8 convolutions (``QuantizeRealize``: ``R.nn.conv2d`` with int8/uint8 data, a
constant int8 weight, int32 output, NCHW/OIHW or, after ``Int8ChannelsLast``, NHWC/HWIO, groups 1,
depthwise, or groups whose width fits the lanes, ``int8_conv.group_weight``) and a target whose preset names a dot
kernel its CPU has (``features.int8_dot``: ``vpdpbusd`` on x86 AVX-512 VNNI, ``avxvnni`` on x86
AVX-VNNI, ``pmaddubsw`` (or the exact but slower ``pmaddwd``) on x86 AVX2, ``sdot`` on AArch64
``+dotprod``). On ``pmaddubsw`` a layer whose weights could saturate its int16 pair sums runs
the exact ``pmaddwd`` kernel instead (``int8_conv.layer_kernel``).
Runs before ``LegalizeOps``: each such call becomes a ``call_tir`` of ``int8_conv.packed_conv2d``
with the weight packed offline, marked out-element-wise fusable so FuseOps still fuses the
requantize epilogue into it. ``ScheduleInt8Conv`` must run after FuseTIR to schedule it.
Depthwise convolutions get a vector kernel (no dot instruction): along output columns in
NCHW, along channels in NHWC (on x86 two columns' taps per pair multiply-add,
``int8_conv.depthwise_tap_pairs``). An int8 ``matmul`` with a constant 2-d weight (a dense
layer) runs the 1x1 convolutions' kernel, its rows as pixels (``int8_conv.packed_matmul``). Other
convolutions (float, grouped ones whose width fits the lanes neither way, activations the kernel
cannot take) are left alone.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.errors import TargetError
from tvm_compress.specs import json_attr

from .int8_conv import (
    column_taps,
    depthwise_tap_pairs,
    group_weight,
    layer_kernel,
    pack_depthwise_weight,
    pack_weight,
    packed_conv2d,
    packed_depthwise_conv2d,
    packed_matmul,
    shift_compensation,
)
from .int8_intrin import KERNELS, DotKernel

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
# Module attribute (JSON): how many convolutions and dense layers each dot kernel runs, and the
# depthwise convolutions ({"pmaddubsw": 30, "pmaddwd": 2, "depthwise": 12}), for the compile report.
INT8_KERNELS_ATTR = "tvm_compress.int8_kernels"
_CONST = is_const()
_OUT_EWISE_FUSABLE = 4  # relax.transform's OpPatternKind kOutEWiseFusable


# (data, kernel, out) layouts the kernels take: NCHW as imported, NHWC after Int8ChannelsLast.
_LAYOUTS = (("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"))


def _oihw(w: np.ndarray, kernel_layout: str) -> np.ndarray:
    return w if kernel_layout == "OIHW" else np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def kernel_names(value: Union[None, str, Sequence[str]]) -> list:
    """``features.int8_dot`` (one kernel name or a preference list) as a checked list."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else [value]
    for name in [n for n in names if n is not None]:
        if name not in KERNELS:
            raise TargetError(f"int8_dot {name!r} is not one of {', '.join(KERNELS)}")
    return [n for n in names if n is not None]


def target_kernel(profile) -> Optional[DotKernel]:
    """The first kernel in the preset's ``features.int8_dot`` whose instructions the target's
    CPU has (None: no packed kernels)."""
    names = kernel_names(profile.features.get("int8_dot"))
    if not names:
        return None
    target = profile.tvm_target()
    for name in names:
        if tvm.target.codegen.target_has_features(list(KERNELS[name].cpu_features), target):
            return KERNELS[name]
    return None


@mutator
class _Packer(PyExprMutator):
    def __init__(self, mod, kernel: DotKernel):
        super().__init__(mod)
        self.kernel = kernel
        self.count = 0
        self.kernels: Counter = Counter()  # convolutions per kernel name (and "depthwise")

    def _kind(self, call) -> Optional[str]:
        """``conv`` / ``depthwise`` when the packed kernels can take this conv2d, else None."""
        attrs = call.attrs
        data, weight = call.args
        if not (
            _CONST.match(weight)
            and weight.value.dtype == "int8"
            and str(data.ty.dtype) in self.kernel.act_dtypes
            and str(attrs.out_dtype) == "int32"
            and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) in _LAYOUTS
            and all(isinstance(d, tvm.tirx.IntImm) for d in data.ty.shape)
        ):
            return None
        groups, channels = int(attrs.groups), int(data.ty.shape[attrs.data_layout.index("C")])
        oc, icg = _oihw(weight.value.numpy(), attrs.kernel_layout).shape[:2]
        if groups == 1:
            return "conv"
        if groups == channels == oc and icg == 1:
            return "depthwise"
        grouped = group_weight(np.zeros((oc, icg, 1, 1), np.int8), groups, self.kernel.lanes)
        if grouped is not None and grouped[0].shape[1] % self.kernel.depth == 0:
            return "grouped"
        return None  # other grouped convolutions keep the generic kernels

    def _matmul(self, call):
        """A packed kernel for ``matmul(x, W)`` with a constant 2-d int8 ``W`` (else None)."""
        data, weight = call.args
        if not (
            _CONST.match(weight)
            and weight.value.dtype == "int8"
            and len(weight.value.shape) == 2
            and str(data.ty.dtype) in self.kernel.act_dtypes
            and str(call.attrs.out_dtype) == "int32"
            and data.ty.ndim >= 2
            and all(isinstance(d, tvm.tirx.IntImm) for d in data.ty.shape)
            and sum(int(d) != 1 for d in list(data.ty.shape)[:-1]) <= 2  # a map of rows (matmul_map)
        ):
            return None
        self.count += 1
        kernel, args = self._dot_args(data, np.ascontiguousarray(weight.value.numpy().T)[:, :, None, None])
        return self.builder_.call_te(
            packed_matmul, *args, kernel.name,
            primfunc_name_hint="int8_matmul", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE},
        )

    def _dot_args(self, data, w: np.ndarray, kw: int = 0):
        """The dot kernel that runs OIHW ``w`` exactly (``layer_kernel``; on ``column_taps``
        when ``kw``) and the packed call's first arguments: data, packed weight, the shift's
        correction, output channels."""
        kernel = layer_kernel(column_taps(w, self.kernel.depth) if kw else w, self.kernel)
        wk = column_taps(w, kernel.depth) if kw else w
        self.kernels[kernel.name] += 1
        shift = kernel.shift(str(data.ty.dtype))
        comp = relax.const(shift_compensation(wk, shift)) if shift else None
        return kernel, [data, relax.const(pack_weight(wk, kernel)), comp, int(w.shape[0])]

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_MATMUL):
            packed = self._matmul(call)
            return call if packed is None else packed
        if not call.op.same_as(_CONV2D):
            return call
        kind = self._kind(call)
        if kind is None:
            return call
        data, weight = call.args
        attrs = call.attrs
        w = _oihw(weight.value.numpy(), attrs.kernel_layout)
        layout = str(attrs.data_layout)
        geometry = (
            [int(v) for v in attrs.strides],
            [int(v) for v in attrs.padding],
            [int(v) for v in attrs.dilation],
            self.kernel.name,
            layout,
        )
        self.count += 1
        if kind == "depthwise":
            pairs = layout == "NHWC" and depthwise_tap_pairs(
                self.kernel, [int(v) for v in data.ty.shape], *w.shape[2:], geometry[1], geometry[0], geometry[2])
            args = [data, relax.const(pack_depthwise_weight(w, self.kernel, layout, pairs))]
            geometry = (*geometry, int(w.shape[3]))
            self.kernels["depthwise"] += 1
        elif kind == "grouped":
            w, group_out = group_weight(w, int(attrs.groups), self.kernel.lanes)
            kernel, args = self._dot_args(data, w)
            args[-1] = int(weight.value.shape[attrs.kernel_layout.index("O")])
            geometry = (*geometry[:3], kernel.name, layout, 0, group_out)
        else:
            # One input channel: a pixel and its right neighbours as its channels (column_taps).
            kw = int(w.shape[3]) if w.shape[1] == 1 and w.shape[3] > 1 else 0
            kernel, args = self._dot_args(data, w, kw)
            geometry = (*geometry[:3], kernel.name, layout, kw)
        return self.builder_.call_te(
            packed_depthwise_conv2d if kind == "depthwise" else packed_conv2d,
            *args,
            *geometry,
            primfunc_name_hint="int8_conv",
            primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE},
        )


@tvm.transform.module_pass(opt_level=0, name="PackInt8Conv")
class PackInt8Conv:
    """Replace eligible int8 convolutions and matmuls by packed-weight kernels for ``kernel``."""

    def __init__(self, kernel: DotKernel):
        self.kernel = kernel

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        packer = _Packer(mod, self.kernel)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                new = packer.visit_expr(func)
                packer.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        if not packer.count:
            return mod
        return packer.builder_.get().with_attr(INT8_KERNELS_ATTR, json.dumps(dict(packer.kernels), sort_keys=True))


def int8_kernels(mod: tvm.IRModule) -> dict:
    """Convolutions and dense layers per packed kernel ``PackInt8Conv`` left in ``mod`` ({}: none)."""
    return json_attr(mod, INT8_KERNELS_ATTR, {})
