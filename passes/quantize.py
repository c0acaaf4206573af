"""Quantize: QuantizeAnnotate -> Calibrate -> QuantizeRealize as one pass, and the ``quantize``
preset with its CLI flags.

A model that already holds QuantizeLinear/DequantizeLinear pairs (ONNX QDQ from another tool)
skips annotation and calibration and goes straight to QuantizeRealize.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import tvm
from tvm import relax

from tvm_compress.calib_data import CalibDataConfig
from tvm_compress.layers import op_kind
from tvm_compress.pass_registry import PassEnv, PassPreset, register_pass
from tvm_compress.relax_utils import relax_functions

from . import _quant_common as qc
from ._quant_stats import ACT_DTYPES, METHODS
from .calibrate import Calibrate, CalibrateConfig
from .quantize_annotate import LAYER_KINDS, QuantizeAnnotate, QuantizeAnnotateConfig
from .quantize_realize import QuantizeRealize, QuantizeRealizeConfig


_ONNX_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class QuantizeConfig(CalibDataConfig):
    """All options of the int8 flow (see QuantizeAnnotateConfig and CalibrateConfig); the
    calibration data ones are shared (``CalibDataConfig``)."""

    calib_method: str = "percentile"
    calib_percentile: float = 99.99
    activation_dtype: str = "auto"
    quant_ops: Tuple[str, ...] = LAYER_KINDS
    quant_skip: Tuple[str, ...] = ()
    quant_skip_first: bool = False
    quant_skip_last: bool = False
    max_error: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    eval_samples: int = 256
    speed_table: Optional[str] = None
    slow_layers: str = "report"

    def __post_init__(self):
        # Build the sub-configs once so that bad options fail before any work.
        self.annotate_config()
        self.calibrate_config()
        self.realize_config()

    def needs_calibration(self, model) -> bool:
        # a QDQ model carries its own quantization
        return not any(n.op_type in _ONNX_QDQ for n in model.graph.node)

    def realize_config(self) -> QuantizeRealizeConfig:
        return QuantizeRealizeConfig(speed_table=self.speed_table, slow_layers=self.slow_layers)

    def annotate_config(self) -> QuantizeAnnotateConfig:
        return QuantizeAnnotateConfig(
            ops=tuple(self.quant_ops), skip=tuple(self.quant_skip), skip_first=bool(self.quant_skip_first),
            skip_last=bool(self.quant_skip_last),
        )

    def calibrate_config(self) -> CalibrateConfig:
        return CalibrateConfig(
            calib=self.calib, method=self.calib_method, percentile=float(self.calib_percentile),
            max_samples=int(self.calib_samples), activation_dtype=self.activation_dtype,
            image_size=self.calib_size, mean=tuple(self.calib_mean), std=tuple(self.calib_std),
            layout=self.calib_layout, bgr=bool(self.calib_bgr), max_error=self.max_error,
            max_accuracy_drop=self.max_accuracy_drop, eval_samples=int(self.eval_samples),
        )


def _has_qdq(mod: tvm.IRModule) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and (expr.op.same_as(qc.OP_DEQUANTIZE) or expr.op.same_as(qc.OP_QUANTIZE)):
            found.append(expr)

    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="Quantize")
class Quantize:
    """Annotate -> Calibrate -> Realize, or Realize alone for a model that is already QDQ.

    Needs: a float Relax module from the importer (layers named by ``tvm_compress.layers``);
    runs after the float rewrites (pruning, low-rank, and by default folding; a ``fold`` named
    after it folds into the int8 rescales) and before lowering. Target
    facts come from ``env.facts``: int8 activations only when the target's int8 kernels take
    no uint8; conv weights fit int16 pair sums where its kernels add them so (``int8_pair_sums``)."""

    def __init__(self, config: Optional[QuantizeConfig] = None, env: Optional[PassEnv] = None):
        self.config = config or QuantizeConfig()
        self.env = env or PassEnv()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        env = self.env
        if _has_qdq(mod):
            env.log("quantize: the model already has QuantizeLinear/DequantizeLinear: realizing its "
                    "own quantization (no calibration)")
            mod = QuantizeRealize(self.config.realize_config(), log=env.log)(mod)
        else:
            annotated = QuantizeAnnotate(self.config.annotate_config())(mod)
            mod = Calibrate(self._calibrate_config(), log=env.log)(annotated)
            mod = QuantizeRealize(self.config.realize_config(), log=env.log)(mod)
        report = qc.read_report(mod)
        conv3d = _count_kind(mod, "conv3d")
        if conv3d:
            report["float_conv3d"] = conv3d
        env.report["quantize"] = report
        _log_summary(report, env.log)
        return qc.strip_report(mod)

    def _calibrate_config(self) -> CalibrateConfig:
        config = self.config.calibrate_config()
        facts = self.env.facts
        if config.activation_dtype == "auto" and "uint8" not in facts.int8_act_dtypes:
            self.env.log(f"quantize: int8 activations: the target's {facts.int8_dot} kernels take no uint8")
            config = dataclasses.replace(config, activation_dtype="int8")
        if facts.int8_pair_sums:
            config = dataclasses.replace(config, weight_pairs=True)
        return config


def _count_kind(mod: tvm.IRModule, kind: str) -> int:
    """Calls of layer kind ``kind`` (``tvm_compress.layers.op_kind``) in the module."""
    found = []
    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, lambda e: found.append(e) if op_kind(e) == kind else None)
    return len(found)


def _log_summary(report: dict, log) -> None:
    layers = report.get("layers", [])
    n8 = sum(1 for l in layers if l.get("status") == "int8")
    log(f"quantize: {n8} of {len(layers)} layers in int8")
    if report.get("float_conv3d"):
        log(f"quantize: {report['float_conv3d']} 3-d convolutions stay float (no int8 conv3d kernel)")
    for l in layers:
        if l.get("status") != "int8":
            log(f"quantize: {l.get('name')} stays {l.get('status')}: {l.get('reason')}")
    if "speed_table" not in report:
        log("quantize: per-layer int8 speed not checked (no --quant-speed-table for this target)")
    wb = report.get("weight_bytes", {})
    if "ratio" in wb:
        log(f"quantize: weight bytes {wb['total']} ({wb['ratio']:.3f}x of float {wb['float_total']})")


def _names(text: str):
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def add_arguments(group) -> None:
    group.add_argument("--calib-method", dest="calib_method", choices=METHODS,
                       help="activation range method (default percentile)")
    group.add_argument("--calib-percentile", dest="calib_percentile", type=float, metavar="P",
                       help="percentile of |x| kept by --calib-method percentile (default 99.99)")
    group.add_argument("--quant-act-dtype", dest="activation_dtype", choices=ACT_DTYPES,
                       help="activations: auto (uint8 zero point 0 when non-negative, else int8), "
                            "int8 (symmetric), uint8 (asymmetric)")
    group.add_argument("--quant-ops", dest="quant_ops", type=_names, metavar="KINDS",
                       help=f"layer kinds to quantize (default all: {','.join(LAYER_KINDS)})")
    group.add_argument("--quant-skip", dest="quant_skip", type=_names, metavar="LAYERS",
                       help="layers kept in float, by name or index, comma-separated")
    group.add_argument("--quant-skip-first", dest="quant_skip_first", action="store_true", default=None,
                       help="keep the first quantizable layer in float")
    group.add_argument("--quant-skip-last", dest="quant_skip_last", action="store_true", default=None,
                       help="keep the last quantizable layer in float")
    group.add_argument("--max-error", dest="max_error", type=float, metavar="E",
                       help="keep the most sensitive layers in float until the outputs' relative L2 error "
                            "against float is <= E")
    group.add_argument("--max-accuracy-drop", dest="max_accuracy_drop", type=float, metavar="P",
                       help="keep the most sensitive layers in float until top-1 drops <= P points "
                            "(labelled --calib data)")
    group.add_argument("--quant-speed-table", dest="speed_table", metavar="JSON",
                       help="measured per-layer float/int8 kernel times on the target, each kernel "
                            "with its tail where the table has them (scripts/bench_int8.py writes one): "
                            "layers slower in int8 are reported")
    group.add_argument("--quant-slow-layers", dest="slow_layers", choices=("report", "float"),
                       help="layers measured slower in int8: realize and report them (default), "
                            "or keep them float")
    group.add_argument("--eval-samples", dest="eval_samples", type=int, metavar="N",
                       help="samples used to measure error/accuracy for the fallback (default 256)")


PRESET = register_pass(
    PassPreset(
        name="quantize",
        help="int8: annotate conv/matmul, calibrate activation ranges, realize int8 x int8 -> int32 "
             "compute (or realize an imported QDQ model)",
        config_cls=QuantizeConfig,
        make=Quantize,
        add_arguments=add_arguments,
        lossy=True,
        reads_calibration=True,
        runs_after=("prune", "lowrank"),  # fold: before (into weights) or after (into int8 rescales)
        order_reason="quantization is calibrated on the float model the other rewrites leave",
    )
)
