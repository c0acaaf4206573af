"""Float convolutions in channels-last layout (NHWC), a kernel hook of the CPU families.

A CPU kernel vectorizes its innermost loop. In NCHW that is a row of the feature map: a 10x10
map gives vectors of 10, a stride-2 depthwise conv loads every other float, and a 1x1 conv
loads one strided row per input channel. In NHWC the innermost loop is the channels: whole
vectors at any map size and stride, the weights' output channels loaded once per input
channel and shared by several output pixels (the default schedule's register tile), the
pattern onnxruntime's and XNNPACK's float kernels use. Numbers: docs/benchmarks.md.

``ChannelsLast`` runs before legalization, after the other hooks' rewrites (their int8, sparse
and binary kernels keep their own layouts: a module with any of them, or with an integer
convolution, is left alone). It hands the layout to Relax's ``ConvertLayout``, which moves
element-wise ops, pools, resizes and concats to NHWC with their convs and converts back only
where an op needs NCHW (reshape, the model's outputs). A conv with a wide kernel onto a few
output channels (an image generator's last 7x7 conv to RGB) fills few lanes in NHWC: it
stays NCHW between two transposes where the estimate says they cost less than they save.
Two rewrites first, or ``ConvertLayout`` would convert the activation back to NCHW and forth
around each such op: constants of one element in element-wise ops become scalars (it cannot
give a shape-(1,) constant a 4-d layout; 104 of them in the PP-OCRv4 detector's learnable
affine blocks), and ``clip`` becomes ``maximum``/``minimum`` (hard-sigmoid / hard-swish). The weights' transposes fold into
constants at legalization. After it, transpose/reshape chains that leave the elements in
order (a transpose back to NCHW and straight forward again) become one reshape
(``_CancelMoves``).
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import with_layer
from tvm_compress.relax_utils import const_value, copy_module, is_constant
from tvm_compress.specs import json_attr

from .base import KernelHook
from .cpu_schedule import vector_width
from .dense_columns import padded_columns, worth_padding_conv

_OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_OP_CONV3D = tvm.ir.Op.get("relax.nn.conv3d")
_CONVS = (_OP_CONV2D, _OP_CONV3D)
_OP_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_OP_RESHAPE = tvm.ir.Op.get("relax.reshape")
_OP_MATMUL = tvm.ir.Op.get("relax.matmul")
_OP_CLIP = tvm.ir.Op.get("relax.clip")
_OP_RESIZE2D = tvm.ir.Op.get("relax.image.resize2d")
_OP_SQUEEZE = tvm.ir.Op.get("relax.squeeze")
_ELEMENTWISE = tuple(tvm.ir.Op.get(f"relax.{n}") for n in ("add", "subtract", "multiply", "divide",
                                                            "maximum", "minimum", "power"))
LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv3d": ["NDHWC", "DHWIO"]}
LAYOUT_ATTR = "tvm_compress.conv_layout"
# A layout the compile flow timed ("NHWC" / "NCHW"): followed instead of the estimate.
PIN_ATTR = "tvm_compress.conv_layout_pin"
# The layout conversions at the model's edges and around ops that need NCHW cost time too.
MIN_GAIN = 1.2
# Below MIN_GAIN the estimate is no guide (docs/benchmarks.md: the classifier at 1.11x is 1.24x
# faster in NCHW, the detector at 960x960, 1.13x, 1.25x faster in NHWC): both layouts are timed
# where the target can be timed and the convs are worth two more builds: from 1M MACs (a
# VGG-style CNN at 32x32, 2.2M MACs, estimated 1.00x, ran 1.6x faster in NHWC with its pools
# fused into the convs).
MIN_TIMED_MACS = 1_000_000
# A transposed element costs as much as this many MACs at full vectors: CycleGAN's NHWC ->
# NCHW transpose with its reflect pad (4.4M elements) took 11.0 ms, its NCHW conv ran 60 MACs
# per ns (docs/benchmarks.md).
_MOVE_MACS = 128

# Relax has no layout rule for these element-wise ops of one tensor (ConvertLayout would convert
# back to NCHW and forth around each: 19 pairs of transposes in openWakeWord's embedding CNN,
# and its pools then not taken by the convs); their attributes do not name an axis: relu's rule.
for _name in ("relax.nn.leakyrelu", "relax.nn.softplus"):
    if tvm.ir.Op.get(_name).get_attr("FRelaxInferLayout") is None:
        tvm.ir.Op.get(_name).set_attr("FRelaxInferLayout", tvm.ir.Op.get("relax.nn.relu").get_attr("FRelaxInferLayout"))


@mutator
class _BeforeConvertLayout(PyExprMutator):
    """What ``ConvertLayout`` needs spelled otherwise: one-element constants of element-wise
    ops -> 0-d constants (same values, any layout), others of fewer dimensions than the map ->
    its rank; ``clip``, which it does not move, ->
    ``minimum(maximum(x, lo), hi)``; ``squeeze``'s negative axes -> their positive numbers (its
    layout rule fails with ``std::bad_alloc`` on them: Silero VAD's decoder, so every conv of the
    model stayed NCHW)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        rank = getattr(call.args[0].ty, "ndim", -1) if call.args else -1
        if (call.op.same_as(_OP_SQUEEZE) and rank > 0 and call.attrs.axis is not None
                and any(int(a) < 0 for a in call.attrs.axis)):
            return relax.op.squeeze(call.args[0], [int(a) % rank for a in call.attrs.axis])
        if call.op.same_as(_OP_CLIP) and all(isinstance(a, (tirx.IntImm, tirx.FloatImm)) for a in call.args[1:]):
            dtype = call.args[0].ty.dtype
            lo, hi = (relax.const(float(a.value), dtype) for a in call.args[1:])
            return relax.op.minimum(self.builder_.emit(relax.op.maximum(call.args[0], lo)), hi)
        if not any(call.op.same_as(op) for op in _ELEMENTWISE):
            return call
        rank = max(getattr(a.ty, "ndim", -1) for a in call.args)
        args = [self._constant_operand(a, rank) if is_constant(a) and len(a.value.shape) > 0 else a
                for a in call.args]
        return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)

    @staticmethod
    def _constant_operand(const, rank: int):
        """One element -> 0-d; fewer dimensions than the other operand -> leading 1s up to its
        rank (a GroupNorm's ``(C, 1)`` affine on an ``[N, C, L]`` map: ConvertLayout converts
        such an operand's layout only at the same rank; the map went back to channels-first)."""
        value = const_value(const)
        if value.size == 1 and value.ndim <= rank:  # (a (1, 1) constant on a 1-d map keeps its rank)
            return relax.const(value.reshape(()))
        return relax.const(value.reshape((1,) * (rank - value.ndim) + value.shape)) if value.ndim < rank else const


def _lane_use(extent: int, lanes: int, strided: bool = False) -> float:
    """Fraction of the vector units' lanes doing useful work when the innermost loop has
    ``extent`` iterations, vectorized as the default schedule does (``vector_width``). A row
    that is not a whole number of registers costs one more masked op on AVX-512 (16 lanes),
    and one op per power-of-two piece elsewhere (7 floats on AVX2: 4 + 2 + 1)."""
    width = vector_width(extent, lanes) or 1
    full, rest = divmod(width, lanes)
    ops = full + (0 if rest == 0 else 1 if lanes >= 16 else bin(rest).count("1"))
    use = width / (ops * lanes)
    # A strided row is gathered lane by lane: a stride-2 depthwise conv measured 3.6x slower
    # in NCHW than in NHWC (docs/benchmarks.md).
    return use / 4 if strided else use


def _convs(func: relax.Function):
    """(float NCHW conv2d and NCDHW conv3d calls, whether anything else rules the rewrite out:
    another conv, or a TIR kernel (int8, sparse, binary) on a map computed from a conv's output.
    A kernel that is not computed from one, such as the importer's reflection pad of an STFT's
    input, runs in the imported layout before the first transpose; one on a pooled vector reads
    no map. An If's branches are walked binding by binding, each on its own."""
    convs, other = [], []
    after_conv = set()  # variables computed from a conv's output

    def reads(expr, names) -> bool:
        found = []
        relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, relax.Var)
                                        and e in names else None)
        return bool(found)

    def walk(blocks) -> None:
        for block in blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.If):  # each branch on its own
                    bodies = [b for b in (value.true_branch, value.false_branch) if isinstance(b, relax.SeqExpr)]
                    for branch in bodies:
                        walk(branch.blocks)
                    if any(reads(b.body, after_conv) for b in bodies):
                        after_conv.add(binding.var)
                    continue
                calls = []
                relax.analysis.post_order_visit(value, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                                else None)
                here = [c for c in calls if any(c.op.same_as(op) for op in _CONVS)]
                for c in here:
                    ok = c.args[0].ty.dtype == "float32" and c.attrs.data_layout in ("NCHW", "NCDHW")
                    (convs if ok else other).append(c)
                downstream = bool(here) or reads(value, after_conv)
                if downstream:
                    # a TIR kernel on a conv's output: its own layout, the rewrite is not for it;
                    # unless it reads no map (an int8 classifier after the pooling of a video
                    # model whose conv3ds stay float)
                    other.extend(c for c in calls if c.op.same_as(_OP_CALL_TIR) and _reads_a_map(c))
                    after_conv.add(binding.var)

    walk(func.body.blocks)
    return convs, bool(other)


def _reads_a_map(kernel: relax.Call) -> bool:
    """Whether a ``call_tir`` reads an activation of rank 4 or more (its constants, such as an
    int8 weight in panels, do not count)."""
    args = kernel.args[1].fields if isinstance(kernel.args[1], relax.Tuple) else [kernel.args[1]]
    return any(getattr(a.ty, "ndim", 0) >= 4 and not is_constant(a) for a in args)


def _macs(conv: relax.Call) -> float:
    weight = [int(d) for d in conv.args[1].ty.shape]
    return float(np.prod([int(d) for d in conv.ty.shape]) * np.prod(weight[1:]))


def _channel_use(channels: int, macs: float, lanes: int) -> float:
    """``_lane_use`` of the channels in NHWC, padded to whole registers where ``PadDenseColumns``
    pads them (257 STFT bins -> 264)."""
    use = _lane_use(channels, lanes)
    if worth_padding_conv(channels, macs, lanes):
        use = max(use, channels / padded_columns(channels, lanes))
    return use


def channels_last_gain(func: relax.Function, lanes: int) -> float:
    """Estimated time of the function's convs in NCHW over their time after the rewrite (MACs
    divided by the lanes each layout keeps busy); 0 when the rewrite does not apply."""
    convs, other = _convs(func)
    if not convs or other:
        return 0.0
    nchw = nhwc = 0.0
    for call in convs:
        times = _times(call, lanes)
        nchw += times[0]
        # a conv that stays NCHW (``_stays_nchw``) costs its NCHW time in the rewritten model
        nhwc += times[0] if _stays_nchw(call, lanes) else times[1]
    return nchw / nhwc


def _times(call: relax.Call, lanes: int):
    """A conv's (NCHW, NHWC) time estimates: MACs over the fraction of lanes in use."""
    out = [int(d) for d in call.ty.shape]
    macs = _macs(call)
    return (macs / _lane_use(out[-1], lanes, strided=int(call.attrs.strides[-1]) > 1),
            macs / _channel_use(out[1], macs, lanes))


_OP_EXPAND = tvm.ir.Op.get("relax.expand_dims")
_MOVES = (_OP_PERMUTE, _OP_RESHAPE, _OP_SQUEEZE, _OP_EXPAND)


@mutator
class _CancelMoves(PyExprMutator):
    """A chain of transposes and reshapes that leaves the elements in their order (a transpose
    back to NCHW that ``ConvertLayout`` put before an op, and the transpose to NHWC after it; a
    permutation that is the identity) -> one reshape of the chain's source, or the source: no
    copy kernel. Checked by running the chain on the element indices."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not any(call.op.same_as(op) for op in _MOVES) or not _static(call):
            return call
        chain, src = [call], call.args[0]
        while True:
            value = self.lookup_binding(src) if isinstance(src, relax.Var) else None
            if not (isinstance(value, relax.Call) and any(value.op.same_as(op) for op in _MOVES)
                    and _static(value)):
                break
            chain.append(value)
            src = value.args[0]
        if len(chain) == 1 and not call.op.same_as(_OP_PERMUTE) or not _static_tensor(src):
            return call
        index = np.arange(int(np.prod(_shape(src)))).reshape(_shape(src))
        for step in reversed(chain):
            index = (index.transpose([int(a) for a in step.attrs.axes] if step.attrs.axes is not None
                                     else list(range(index.ndim))[::-1])
                     if step.op.same_as(_OP_PERMUTE) else index.reshape(_shape(step)))
        if not np.array_equal(index.ravel(), np.arange(index.size)):
            return call
        if tuple(_shape(src)) == tuple(_shape(call)):
            return src
        return relax.op.reshape(src, _shape(call))


@mutator
class _TransposeBeforeUpsample(PyExprMutator):
    """``permute_dims(resize2d(x_nhwc), [0, 3, 1, 2])`` of a resize that enlarges the map ->
    ``resize2d(permute_dims(x_nhwc, [0, 3, 1, 2]))`` in NCHW: the transpose moves the smaller
    map, and a segmentation head's upsampled output is written in the order it is stored
    (LR-ASPP's 8x upsampling to its NCHW output read its NHWC input by gathers). Exact: a
    resize computes each channel alone, the same arithmetic in either layout."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_PERMUTE) or call.attrs.axes is None \
                or [int(a) for a in call.attrs.axes] != [0, 3, 1, 2]:
            return call
        resize = self.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else None
        if not (isinstance(resize, relax.Call) and resize.op.same_as(_OP_RESIZE2D) and _static(resize)
                and str(resize.attrs.layout) == "NHWC"):
            return call
        if np.prod(_shape(resize)) <= np.prod(_shape(resize.args[0])):
            return call
        a = resize.attrs
        x = self.builder_.emit(relax.op.permute_dims(resize.args[0], [0, 3, 1, 2]))
        return with_layer(relax.op.image.resize2d(
            x, resize.args[1], [float(v) for v in a.roi], "NCHW", a.method, a.coordinate_transformation_mode,
            a.rounding_method, float(a.cubic_alpha), int(a.cubic_exclude), float(a.extrapolation_value),
            a.out_dtype or None), resize)


def _shape(expr) -> list:
    return [int(d) for d in expr.ty.shape]


def _static_tensor(expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and ty.shape is not None and all(
        isinstance(d, tirx.IntImm) for d in ty.shape)


def _static(call) -> bool:
    return _static_tensor(call) and _static_tensor(call.args[0])


@mutator
class _FlattenIntoWeights(PyExprMutator):
    """``matmul(reshape(permute_dims(x_nhwc, [0, 3, 1, 2]), [N, C*H*W]), W)`` with a constant
    ``W`` -> ``matmul(reshape(x_nhwc, [N, H*W*C]), W')``, ``W'`` the rows of ``W`` in HWC order:
    a classifier's flatten after NHWC convs costs no transpose kernel."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_OP_MATMUL) or len(call.ty.shape) != 2:
            return call
        flat = self._bound(call.args[0], _OP_RESHAPE)
        nchw = self._bound(flat.args[0], _OP_PERMUTE) if flat is not None else None
        weight = self._constant_2d(call.args[1])
        if nchw is None or weight is None or [int(a) for a in nchw.attrs.axes] != [0, 3, 1, 2]:
            return call
        n, h, w, c = (int(d) for d in nchw.args[0].ty.shape)
        if [int(d) for d in flat.ty.shape] != [n, c * h * w] or weight.shape[0] != c * h * w:
            return call
        rows = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        x = self.builder_.emit(relax.op.reshape(nchw.args[0], [n, h * w * c]))
        return with_layer(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight[rows])),
                                          out_dtype=call.attrs.out_dtype or None), call)

    def _bound(self, expr, op):
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return value if isinstance(value, relax.Call) and value.op.same_as(op) else None

    def _constant_2d(self, expr):
        """A constant 2-D weight, also behind the ``permute_dims`` the ONNX importer adds for Gemm."""
        if is_constant(expr):
            return const_value(expr) if len(expr.ty.shape) == 2 else None
        turned = self._bound(expr, _OP_PERMUTE)
        if turned is not None and is_constant(turned.args[0]) and len(turned.args[0].ty.shape) == 2:
            return const_value(turned.args[0]).T
        return None


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """Float NCHW conv2d (and the ops around them) -> NHWC with HWIO weights, in functions
    whose convs are estimated ``min_gain`` times faster so (``channels_last_gain``) for
    vectors of ``lanes`` float32. What it decided: module attribute ``LAYOUT_ATTR``."""

    def __init__(self, lanes: int, min_gain: float = MIN_GAIN):
        self.lanes = lanes
        self.min_gain = min_gain

    def _layouts(self, call: relax.Call) -> dict:
        """``ConvertLayout``'s layouts for ``call``: NHWC unless ``_stays_nchw``."""
        if _stays_nchw(call, self.lanes):
            return {**LAYOUTS, "relax.nn.conv2d": ["NCHW", "OIHW"]}
        return LAYOUTS

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        gains = {gv: channels_last_gain(f, self.lanes) for gv, f in mod.functions_items()
                 if isinstance(f, relax.Function)}
        pin = str(mod.attrs[PIN_ATTR]) if mod.attrs is not None and PIN_ATTR in mod.attrs else None
        timed = _timed(mod)
        names = [gv for gv, g in gains.items() if (g > 0 if pin == "NHWC" else g >= self.min_gain and pin != "NCHW")]
        gain = max(gains.values(), default=0.0)
        if not names:
            if not gain:
                return mod
            why = (f"timed: {timed}" if pin == "NCHW" and timed else "pinned" if pin == "NCHW"
                   else f"channels-last estimated {gain:.2f}x, below {self.min_gain}x")
            return mod.with_attr(LAYOUT_ATTR, json.dumps({"layout": "NCHW", "estimated_gain": round(gain, 3),
                                                          "reason": why}))
        try:
            converted = copy_module(mod)
            for gv in names:
                converted[gv] = _BeforeConvertLayout().visit_expr(converted[gv])
            # ConvertLayout runs on every function: take back only the chosen ones.
            converted = relax.transform.ConvertLayout({}, self._layouts)(converted)
            out = copy_module(mod)
            for gv in names:
                # Every conv NHWC but the few ``_stays_nchw`` keeps: a conv whose rows filled
                # the vectors better than its channels had stayed NCHW between two transposes,
                # and the transposes cost more than it saved (MobileNetV3-Large 3.87 -> 3.16
                # ms, the PP-OCRv4 detector 7.30 -> 6.35 ms with every conv NHWC;
                # docs/benchmarks.md); only a wide kernel onto a few channels gains enough.
                func = converted[gv]
                func = _TransposeBeforeUpsample(tvm.IRModule({gv: func})).visit_expr(func)
                func = _CancelMoves(tvm.IRModule({gv: func})).visit_expr(func)
                # The transposes the flatten no longer reads are dropped.
                out[gv] = relax.analysis.remove_all_unused(_FlattenIntoWeights(converted).visit_expr(func))
            out = relax.transform.Normalize()(out)
        except Exception as err:  # noqa: BLE001  (an op ConvertLayout cannot move: stays NCHW)
            why = f"channels-last rewrite failed ({type(err).__name__}); kept NCHW"
            return mod.with_attr(LAYOUT_ATTR, json.dumps({"layout": "NCHW", "estimated_gain": round(gain, 3),
                                                          "reason": why}))
        layouts = [c.attrs.data_layout for gv in names for op in _CONVS for c in _calls(out[gv], op)]
        info = {"layout": "NHWC", "estimated_gain": round(gain, 3),
                "nhwc_convs": layouts.count("NHWC") + layouts.count("NDHWC"),
                "nchw_convs": layouts.count("NCHW") + layouts.count("NCDHW")}
        if pin == "NHWC":
            info["reason"] = f"timed: {timed}" if timed else "pinned"
        return out.with_attr(LAYOUT_ATTR, json.dumps(info))


def _stays_nchw(call: relax.Call, lanes: int) -> bool:
    """Whether a float conv2d is estimated faster in NCHW, with a transpose of its input and
    of its output, than in NHWC: a wide kernel onto a few output channels (CycleGAN's last
    7x7 conv, 64 -> 3 channels: 3 of 16 lanes in NHWC, 30.8 ms; 10.3 ms in NCHW plus 11.0 ms
    for the transposes)."""
    if not (call.op.same_as(_OP_CONV2D) and _static(call) and int(call.attrs.groups) == 1
            and call.args[0].ty.dtype == "float32" and call.attrs.data_layout == "NCHW"):
        return False
    nchw, nhwc = _times(call, lanes)
    moved = float(np.prod(_shape(call.args[0])) + np.prod(_shape(call)))
    return nchw + moved * _MOVE_MACS < nhwc / MIN_GAIN


def _timed(mod: tvm.IRModule) -> str:
    """The compile flow's timing of both layouts, as text ('' when it timed none)."""
    from tvm_compress.pipeline import measured_choices

    times = measured_choices(mod).get(CHANNELS_LAST_NAME, {}).get("times_ms", {})
    return ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())


def _calls(func, op) -> list:
    found = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(op) else None)
    return found


def conv_layout(mod: tvm.IRModule) -> dict:
    """What ``ChannelsLast`` decided for the module ({}: it had no float conv to decide on)."""
    return json_attr(mod, LAYOUT_ATTR, {})


CHANNELS_LAST_NAME = "channels_last"


class ChannelsLastKernels(KernelHook):
    """On unless a preset sets ``features.channels_last = false``."""

    name = CHANNELS_LAST_NAME
    feature = "channels_last"
    default_on = True

    def rewrites(self, profile):
        return [ChannelsLast(KernelHook.lanes(profile))]

    def candidates(self, mod, profile):
        """Both layouts, when the estimate is below ``MIN_GAIN`` (no guide there) and the float
        convs have ``MIN_TIMED_MACS`` or more."""
        if mod.attrs is not None and PIN_ATTR in mod.attrs:
            return {}
        funcs = [f for _, f in mod.functions_items() if isinstance(f, relax.Function)]
        gain = max((channels_last_gain(f, KernelHook.lanes(profile)) for f in funcs), default=0.0)
        if not 0 < gain < MIN_GAIN or sum(_conv_macs(f) for f in funcs) < MIN_TIMED_MACS:
            return {}
        # The estimate's choice first (below MIN_GAIN: NCHW): the flow keeps it unless NHWC is
        # clearly faster.
        return {layout: mod.with_attr(PIN_ATTR, layout) for layout in ("NCHW", "NHWC")}


def _conv_macs(func: relax.Function) -> float:
    return sum(_macs(call) for call in _convs(func)[0])


CHANNELS_LAST = ChannelsLastKernels()
