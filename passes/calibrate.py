"""Calibrate: run the annotated float model on calibration data and fix activation ranges.

Needs: a module after ``QuantizeAnnotate`` (observe/weight markers), calibration data (a
``--calib`` path, in-memory arrays, or ``random`` on request). Runs between QuantizeAnnotate and
QuantizeRealize, before ``LegalizeOps``; compiles and runs on the host CPU whatever the target.

The pass compiles a calibration copy of ``main`` in which every observed activation is an extra
output, runs it batch by batch, and picks each activation's range by ``minmax``, ``percentile``
or ``entropy`` (KL divergence over a histogram). Weights get per-output-channel symmetric int8.
The result is a QDQ module: ``R.dequantize(R.quantize(x))`` on activations, ``R.dequantize`` of
int8 constants on weights. It still computes in float (fake quantization) until QuantizeRealize.

With ``max_error`` or ``max_accuracy_drop`` the pass measures each layer's sensitivity (the
model's output error with only that layer in int8) and keeps the most sensitive layers in float
until the budget holds; the report says which and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.errors import DataError, PassOptionError

from tvm.relax.dpl import rewrite_call

from tvm_compress import relax_utils as ru
from tvm_compress.relax_utils import copy_module, relax_functions

from . import _quant_common as qc
from tvm_compress.calib_data import Preprocess, load_calibration
from tvm_compress.console import Progress
from ._host import flatten, host_run, rebuild, with_outputs
from ._quant_stats import ACT_DTYPES, METHODS, Observer, qparams, weight_qparams


@dataclass(frozen=True)
class CalibrateConfig:
    """Calibration data, range method and the accuracy budget.

    calib: ``file.npz[:key]``, ``file.npy``, a folder of images, or ``"random"`` (warns: accuracy
        unknown). None: the pass needs ``dataset=`` arrays.
    method: ``minmax``, ``percentile`` or ``entropy``.
    percentile: for ``percentile``, the share of |x| kept (99.99 clips the top 0.01 %).
    num_bins: histogram bins over |x| for percentile/entropy.
    max_samples: calibration samples used at most.
    activation_dtype: ``auto`` (uint8 with zero point 0 for non-negative tensors, symmetric int8
        otherwise), ``int8`` (symmetric), ``uint8`` (asymmetric, zero point from the range).
    image_size, mean, std, layout, bgr: preprocessing of uint8 arrays and images (x/255, then
        (x - mean) / std per channel; size (h, w) defaults to the model input's).
    max_error: keep the most sensitive layers in float until the relative L2 error of the outputs
        against the float model is at most this (e.g. 0.02).
    max_accuracy_drop: same, until top-1 accuracy (percentage points, needs labels) drops at most
        this much.
    eval_samples: calibration samples used to measure error/accuracy for the fallback.
    weight_pairs: quantize conv and dense weights to fit int16 pair sums (``weight_qparams``,
        ``_pair_layers``); set from the target's ``int8_pair_sums`` by ``Quantize``, not a user option.
    """

    calib: Optional[str] = None
    method: str = "percentile"
    percentile: float = 99.99
    num_bins: int = 16384
    max_samples: int = 256
    activation_dtype: str = "auto"
    image_size: Optional[Tuple[int, int]] = None
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    bgr: bool = False
    max_error: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    eval_samples: int = 256
    weight_pairs: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise PassOptionError(
                f"unknown calibration method {self.method!r}; choose from {', '.join(METHODS)}"
            )
        if not 50.0 < float(self.percentile) <= 100.0:
            raise PassOptionError(f"calibration percentile must be in (50, 100], got {self.percentile}")
        if self.activation_dtype not in ACT_DTYPES:
            raise PassOptionError(
                f"unknown activation dtype {self.activation_dtype!r}; choose from {', '.join(ACT_DTYPES)}"
            )
        if self.layout not in ("NCHW", "NHWC"):
            raise PassOptionError(f"calibration layout must be NCHW or NHWC, got {self.layout!r}")
        if int(self.num_bins) < 256:
            raise PassOptionError(f"calibration num_bins must be at least 256, got {self.num_bins}")
        if int(self.max_samples) < 1:
            raise PassOptionError(f"calibration max_samples must be at least 1, got {self.max_samples}")
        if self.max_error is not None and not float(self.max_error) > 0:
            raise PassOptionError(f"max_error must be > 0, got {self.max_error}")
        if self.max_accuracy_drop is not None and not float(self.max_accuracy_drop) >= 0:
            raise PassOptionError(f"max_accuracy_drop must be >= 0, got {self.max_accuracy_drop}")
        if self.max_error is not None and self.max_accuracy_drop is not None:
            raise PassOptionError("give either max_error or max_accuracy_drop, not both")

    @property
    def preprocess(self) -> Preprocess:
        size = tuple(int(v) for v in self.image_size) if self.image_size else None
        return Preprocess(size, tuple(self.mean), tuple(self.std), self.layout, self.bgr)


# Samples on which the per-layer errors of the final int8 choice are measured.
ERROR_SAMPLES = 8


# ---- the calibration copy: observed activations become outputs --------------------------------

@mutator
class _CalibrationCopy(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.observe = qc.observe_pattern()
        self.weight = qc.weight_pattern()
        self.outputs: List[Tuple[int, relax.Var]] = []

    def visit_var_binding_(self, binding):
        value = binding.value
        if self.observe.match(value):
            x = self.visit_expr(qc.marker_arg(value))
            # A non-dataflow binding inside the dataflow block: visible after it, as an output.
            out = self.builder_.emit_output(x)
            self.outputs.append((qc.marker_id(value), out))
            self.set_var_remap(binding.var, out)
        elif self.weight.match(value):
            new = self.builder_.emit(qc.marker_arg(value))
            self.set_var_remap(binding.var, new)
        else:
            super().visit_var_binding_(binding)


def calibration_module(mod: tvm.IRModule) -> Tuple[tvm.IRModule, List[int]]:
    """``main`` without markers, returning (original outputs, (observed activations...))."""
    copier = _CalibrationCopy(mod)
    func = copier.visit_expr(mod["main"])
    ids = [pid for pid, _ in copier.outputs]
    func = with_outputs(func, [v for _, v in copier.outputs])
    copier.builder_.update_func(mod.get_global_var("main"), func)
    new_mod = copier.builder_.get()
    return qc.strip_report(new_mod), ids


# ---- QDQ emission -------------------------------------------------------------------------------

def _pair_layers(layers) -> frozenset:
    """Layers whose weights fit the int16 pair sums: those the pair-summing dot kernels run
    (plain and grouped convs, dense layers), but depthwise convs (exact taps) and dense layers
    reading a flattened feature map, whose rows the channels-last rewrite reorders
    (``_FlattenIntoWeights``): pairs fitted in this order would not be its kernel's pairs, and
    the bit they cost would buy nothing."""
    return frozenset(l["index"] for l in layers
                     if l["op"] != "depthwise_conv2d" and not l.get("flattened_input", False))


def weight_axis(op_kind: str) -> int:
    # conv2d weights are OIHW, matmul weights [K, N]: the output channel axis.
    return 1 if op_kind == "matmul" else 0


@mutator
class _QDQEmitter(PyExprMutator):
    """observe -> quantize/dequantize, weight -> dequantize(int8 constant).

    With ``mask`` (a float32 [num_layers] var), each layer's QDQ is blended with its float value by
    mask[layer] so that one compiled module evaluates any subset of layers in int8.
    """

    def __init__(self, mod, point_params: Dict[int, Tuple[float, int, str]], point_layer: Dict[int, int],
                 layer_kind: Dict[int, str], int8_layers, mask=None, expose_points=False, weight_pairs=()):
        super().__init__(mod)
        self.expose_points = expose_points
        self.weight_pairs = weight_pairs
        self.exposed: List[Tuple[int, relax.Var]] = []
        self.observe = qc.observe_pattern()
        self.weight = qc.weight_pattern()
        self.point_params = point_params
        self.point_layer = point_layer
        self.layer_kind = layer_kind
        self.int8_layers = set(int8_layers)
        self.mask = mask
        self.weight_info: Dict[int, dict] = {}

    def _blend(self, x, xq, layer: int):
        m = self.builder_.emit(relax.op.take(self.mask, relax.const(layer, "int64")))
        diff = self.builder_.emit(relax.op.subtract(xq, x))
        return relax.op.add(x, relax.op.multiply(diff, m))

    def visit_var_binding_(self, binding):
        value = binding.value
        if self.observe.match(value):
            pid = qc.marker_id(value)
            x = self.visit_expr(qc.marker_arg(value))
            params = self.point_params.get(pid)
            if params is None:
                if not isinstance(binding.var, relax.DataflowVar):
                    x = self.builder_.emit_output(x)
                self.set_var_remap(binding.var, x)
                return
            scale, zp, dtype = params
            s = relax.const(np.float32(scale), "float32")
            z = relax.const(zp, dtype)
            q = self.builder_.emit(relax.op.quantize(x, s, z, axis=-1, out_dtype=dtype), "q")
            dq = relax.op.dequantize(q, s, z, axis=-1, out_dtype="float32")
            if self.mask is not None:
                dq = self._blend(x, self.builder_.emit(dq), self.point_layer[pid])
            new = ru.emit_like(self.builder_, binding.var, dq, "dq")
            if self.expose_points:
                new = self.builder_.emit_output(new) if isinstance(new, relax.DataflowVar) else new
                self.exposed.append((pid, new))
            self.set_var_remap(binding.var, new)
        elif self.weight.match(value):
            layer = qc.marker_id(value)
            w_expr = qc.marker_arg(value)
            if layer not in self.int8_layers:
                self.set_var_remap(binding.var, self.builder_.emit(w_expr))
                return
            w = ru.const_value(w_expr)
            axis = weight_axis(self.layer_kind[layer])
            wq, ws = weight_qparams(w, axis, layer in self.weight_pairs)
            self.weight_info[layer] = {"scale": ws, "axis": axis}
            dq = relax.op.dequantize(
                relax.const(wq, "int8"), relax.const(ws, "float32"), relax.const(0, "int8"), axis=axis
            )
            if self.mask is not None:
                dq = self._blend(w_expr, self.builder_.emit(dq), layer)
            self.set_var_remap(binding.var, self.builder_.emit(dq, "w"))
        else:
            super().visit_var_binding_(binding)


def emit_qdq(mod, point_params, point_layer, layer_kind, int8_layers, with_mask=False,
             expose_points=False, weight_pairs=()):
    """The QDQ module; ``with_mask``: an extra ``qmask`` input blends each layer in or out;
    ``expose_points``: main also returns the dequantized activations (for measuring errors);
    ``weight_pairs``: the layers whose weights fit int16 pair sums (``weight_qparams``, ``_pair_layers``)."""
    mask = None
    if with_mask:
        n = max(layer_kind) + 1 if layer_kind else 1
        mask = relax.Var("qmask", relax.TensorType((n,), "float32"))
    emitter = _QDQEmitter(mod, point_params, point_layer, layer_kind, int8_layers, mask, expose_points,
                          weight_pairs)
    func = emitter.visit_expr(mod["main"])
    if mask is not None:
        func = rebuild(func, func.body, list(func.params) + [mask])
    if expose_points:
        func = with_outputs(func, [v for _, v in emitter.exposed])
    emitter.builder_.update_func(mod.get_global_var("main"), func)
    new_mod = _strip_markers(emitter.builder_.get(), keep="main")
    if expose_points:
        return new_mod, [pid for pid, _ in emitter.exposed]
    return new_mod, emitter.weight_info


def _strip_markers(mod: tvm.IRModule, keep: str) -> tvm.IRModule:
    """Markers left in functions other than ``keep`` (calibration runs ``main`` only, so their
    layers stay float) become the values they mark."""
    pattern = qc.observe_pattern() | qc.weight_pattern()
    mod = copy_module(mod)
    for gv, func in relax_functions(mod):
        if gv.name_hint != keep:
            mod[gv] = rewrite_call(pattern, lambda call, _m: qc.marker_arg(call), func)
    return mod


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).astype("float64")) / max(np.linalg.norm(b.astype("float64")), 1e-12))


# ---- the pass -----------------------------------------------------------------------------------

@tvm.transform.module_pass(opt_level=0, name="Calibrate")
class Calibrate:
    """Fix activation ranges from calibration data; emit a QDQ (fake-quantized) module."""

    def __init__(self, config: Optional[CalibrateConfig] = None, dataset=None,
                 log: Optional[Callable[[str], None]] = None):
        self.config = config or CalibrateConfig()
        self.dataset = dataset  # arrays instead of config.calib: {input: (N, ...)} (+ "labels")
        self.log = log or (lambda msg: None)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        cfg = self.config
        report = qc.read_report(mod)
        if "layers" not in report:
            raise PassOptionError("Calibrate needs a module annotated by QuantizeAnnotate first")
        layers = report["layers"]
        points = report["points"]
        func = mod["main"]
        inputs = [(p.name, ru.tensor_shape(p), ru.tensor_dtype(p)) for p in func.params]
        if not points:
            self.log("quantize: no layer to quantize; calibration skipped")
            return mod
        data = load_calibration(self.dataset if self.dataset is not None else cfg.calib, inputs,
                                cfg.preprocess, int(cfg.max_samples), self.log)
        if data.count == 0:
            raise DataError("calibration data is empty")
        if cfg.max_accuracy_drop is not None and data.labels is None:
            raise DataError("max_accuracy_drop needs labelled calibration data (labels in the .npz)")

        calib_mod, ids = calibration_module(mod)
        for l in layers:
            if l["status"] == "int8" and l["input_point"] not in ids:
                l["status"], l["reason"] = "float", "outside main, which calibration runs"
        run = host_run(calib_mod)
        batch = int(inputs[0][1][0]) if inputs[0][1] else 1
        observers = {pid: Observer(int(cfg.num_bins)) for pid in ids}
        names = [n for n, _, _ in inputs]
        float_outputs: List[List[np.ndarray]] = []
        n_eval = min(data.count, int(cfg.eval_samples))
        n_err = min(data.count, ERROR_SAMPLES)
        float_points: Dict[int, List[np.ndarray]] = {pid: [] for pid in ids}

        def sweep(hist: bool):
            seen, step = 0, max(batch, data.count // 4)
            what = "histograms" if hist else "ranges"
            for feed, idx in data.batches(batch):
                if seen and seen % step < batch:
                    self.log(Progress(f"quantize: calibration {what}: {seen}/{data.count} samples"))
                outs = run(*[feed[n] for n in names])
                model_out, observed = outs[0], outs[1]
                for pid, arr in zip(ids, observed):
                    # a short tail batch repeats samples: use only the real ones
                    arr = arr[: len(idx)] if arr.ndim and arr.shape[0] == batch else arr
                    (observers[pid].update_hist if hist else observers[pid].update_range)(arr)
                    if not hist and seen < n_err:
                        float_points[pid].append(arr)
                if not hist and seen < max(n_eval, n_err):
                    float_outputs.append([o[: len(idx)] for o in flatten(model_out)])
                seen += len(idx)
            return seen

        count = sweep(hist=False)
        self.log(f"quantize: calibration ranges from {count} samples ({data.source})")
        if cfg.method != "minmax":
            sweep(hist=True)
        point_params = {}
        point_stats = {}
        for pid, obs in observers.items():
            levels = 256 if (cfg.activation_dtype != "int8" and obs.min >= 0) else 128
            lo, hi = obs.clip_range(cfg.method, float(cfg.percentile), levels)
            point_params[pid] = qparams(lo, hi, cfg.activation_dtype)
            point_stats[pid] = {"min": obs.min, "max": obs.max, "clip": [lo, hi]}

        layer_kind = {l["index"]: l["op"] for l in layers}
        pairs = _pair_layers(layers) if cfg.weight_pairs else frozenset()
        point_layer = {p["id"]: p["layers"][0] for p in points if p["layers"]}
        int8 = [l["index"] for l in layers if l["status"] == "int8"]
        fallback_info = None
        if cfg.max_error is not None or cfg.max_accuracy_drop is not None:
            from ._quant_fallback import choose_fallback

            masked, _ = emit_qdq(mod, point_params, point_layer, layer_kind, int8, with_mask=True,
                                 weight_pairs=pairs)
            fallback_info = choose_fallback(
                qc.strip_report(masked), data, batch, names, float_outputs, n_eval, int8,
                {l["index"]: l["name"] for l in layers}, cfg, self.log,
            )
            for l in layers:
                if l["index"] in fallback_info["float_layers"]:
                    l["status"] = "float"
                    l["reason"] = fallback_info["reasons"][l["index"]]
            int8 = [l["index"] for l in layers if l["status"] == "int8"]

        used_points = {l["input_point"] for l in layers if l["status"] == "int8"}
        final_params = {pid: p for pid, p in point_params.items() if pid in used_points}
        new_mod, weight_info = emit_qdq(mod, final_params, point_layer, layer_kind, int8,
                                        weight_pairs=pairs)

        errors = self._measure_errors(mod, final_params, point_layer, layer_kind, int8, data, batch,
                                      names, float_points, float_outputs, n_err, pairs)
        for l in layers:
            l.pop("sensitivity", None)
            if l.get("input_point") in errors["points"] and l["status"] == "int8":
                l["input_error"] = errors["points"][l["input_point"]]
            if fallback_info is not None:
                l["sensitivity"] = fallback_info["sensitivity"].get(l["index"])
            if l["status"] != "int8":
                continue
            s, z, dt = point_params[l["input_point"]]
            ws = weight_info[l["index"]]["scale"]
            l["input_quant"] = {"dtype": dt, "scale": float(s), "zero_point": int(z)}
            l["weight_quant"] = {
                "dtype": "int8", "per_channel_axis": weight_info[l["index"]]["axis"],
                "scale_min": float(ws.min()), "scale_max": float(ws.max()), "channels": int(ws.size),
            }
        for p in points:
            p["stats"] = point_stats.get(p["id"])
            if p["id"] in final_params:
                s, z, dt = final_params[p["id"]]
                p["quant"] = {"dtype": dt, "scale": float(s), "zero_point": int(z)}
        report["calibration"] = {
            "method": cfg.method,
            "percentile": cfg.percentile if cfg.method == "percentile" else None,
            "samples": count,
            "source": data.source,
            "random": data.random,
            "activation_dtype": cfg.activation_dtype,
        }
        report["output_error"] = errors["output"]
        report["error_samples"] = n_err
        self.log(f"quantize: simulated int8 output error {errors['output']:.4g} (relative L2, {n_err} samples)")
        if fallback_info is not None:
            report["fallback"] = {k: v for k, v in fallback_info.items() if k not in ("reasons", "sensitivity")}
        return qc.write_report(new_mod, report)

    def _measure_errors(self, mod, params, point_layer, layer_kind, int8, data, batch, names,
                        float_points, float_outputs, n_err, weight_pairs=()) -> dict:
        """Relative L2 error of each quantized layer's input and of the outputs (all chosen
        layers int8, simulated) against the float model."""
        exposed, pids = emit_qdq(mod, params, point_layer, layer_kind, int8, expose_points=True,
                                 weight_pairs=weight_pairs)
        run = host_run(qc.strip_report(exposed))
        got_points: Dict[int, List[np.ndarray]] = {pid: [] for pid in pids}
        got_out: List[List[np.ndarray]] = []
        seen = 0
        for feed, idx in data.batches(batch, limit=n_err):
            res = run(*[feed[n] for n in names])
            got_out.append([o[: len(idx)] for o in flatten(res[0])])
            for pid, arr in zip(pids, res[1]):
                got_points[pid].append(arr[: len(idx)] if arr.ndim and arr.shape[0] == batch else arr)
            seen += len(idx)
        points = {}
        for pid in pids:
            if float_points.get(pid):
                a = np.concatenate([x.reshape(-1) for x in got_points[pid]])
                b = np.concatenate([x.reshape(-1) for x in float_points[pid]])
                points[pid] = _rel(a, b[: a.size])
        out_err = 0.0
        for k in range(len(got_out[0]) if got_out else 0):
            a = np.concatenate([o[k].reshape(-1) for o in got_out])
            b = np.concatenate([o[k].reshape(-1) for o in float_outputs])[: a.size]
            out_err = max(out_err, _rel(a, b))
        return {"points": points, "output": out_err}
