"""Binary: 1-bit weights (and activations) for chosen conv2d / matmul layers.

Needs: Relax after import and ``fold`` (batch norms folded: a trained binary layer's weight is
then ``alpha * sign`` per output channel). Runs before ``quantize`` (which leaves binary layers
in float) and must run where the layers' weights are constants.

Each chosen layer's weight becomes ``alpha * sign(W)``, one ``alpha`` per output channel
(mean ``|W|``, the L2-closest binary weight, as in XNOR-Net); a layer whose weight already has
that form (a binarized network's) is unchanged. Binary activations: the layer reads
``sign(x)``; a layer that does not already read a sign gets ``binarize_activation`` (+1 where
``x >= 0``, else -1: unlike ``Sign``, a 0 becomes +1, as in the packed kernels) (post-training
binarization, which costs accuracy: see docs/binary.md). With ``weights_only`` (BWN) activations stay float.
The pass writes the module attribute ``BINARY_LAYERS_ATTR``; the target's binary kernel hook
runs those layers on bit-packed XNOR/popcount kernels and fuses binary chains (see
``tvm_compress.targets.binary_hook``). A target without the hook runs the float computation
the binary layers equal.

Layer choice: ``auto`` takes the layers whose input is already a sign (or a reshape of one):
a binarized network exported with its sign ops; ``all`` every conv2d / matmul with a constant
weight; or a list of layer names. ``skip_first`` / ``skip_last`` keep the model's first / last
layer float (the usual practice: they hold few weights and much of the accuracy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.errors import PassOptionError
from tvm_compress.layers import OP_CONV2D, OP_MATMUL, layer_name
from tvm_compress.pass_registry import PassEnv, PassPreset, register_pass
from tvm_compress.relax_utils import const_value, emit_like, is_constant, relax_functions
from tvm_compress.specs import BINARY_LAYERS_ATTR

_SIGN = tvm.ir.Op.get("relax.sign")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_WORD = 32


@dataclass(frozen=True)
class BinaryConfig:
    """layers: ``"auto"``, ``"all"`` or layer names. weights_only: float activations (BWN).
    skip_first / skip_last: the model's first / last layer stays float."""

    layers: Union[str, Tuple[str, ...]] = "auto"
    weights_only: bool = False
    skip_first: bool = False
    skip_last: bool = False

    def __post_init__(self):
        if isinstance(self.layers, str) and self.layers not in ("auto", "all"):
            raise PassOptionError(f"--binary-layers: expected auto, all or layer names, got {self.layers!r}")
        if not isinstance(self.layers, str) and not self.layers:
            raise PassOptionError("--binary-layers: no layer named")


def _layers(func: relax.Function) -> List[Tuple[relax.Var, relax.Call]]:
    """(var, call) of the conv2d / matmul layers with a constant float weight, in graph order."""
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if (isinstance(call, relax.Call) and (call.op.same_as(OP_CONV2D) or call.op.same_as(OP_MATMUL))
                    and len(call.args) == 2 and is_constant(call.args[1]) and layer_name(call)
                    and const_value(call.args[1]).dtype == np.float32):
                out.append((b.var, call))
    return out


def _reads_sign(expr, var2val) -> bool:
    """``expr`` is a sign, or a reshape of one: its values are -1, 0 or +1."""
    while isinstance(expr, relax.Var) and expr in var2val:
        value = var2val[expr]
        if not isinstance(value, relax.Call):
            return False
        if value.op.same_as(_SIGN):
            return True
        if not value.op.same_as(_RESHAPE):
            return False
        expr = value.args[0]
    return False


def _binarize(call) -> Tuple[np.ndarray, np.ndarray, float]:
    """(binary weight alpha * sign, alpha, relative L2 error of it against W)."""
    w = const_value(call.args[1]).astype(np.float64)
    per_out = w.T if call.op.same_as(OP_MATMUL) else w  # [O, ...]
    flat = per_out.reshape(per_out.shape[0], -1)
    alpha = np.abs(flat).mean(axis=1)
    binary = np.where(flat >= 0, 1.0, -1.0) * alpha[:, None]
    err = float(np.linalg.norm(binary - flat) / max(np.linalg.norm(flat), 1e-30))
    binary = binary.reshape(per_out.shape)
    return (binary.T if call.op.same_as(OP_MATMUL) else binary).astype(np.float32), alpha, err


def _packed_bytes(call) -> Tuple[int, int]:
    """(float32 weight bytes, bytes as packed bits + one float32 alpha per output channel)."""
    w = const_value(call.args[1])
    if call.op.same_as(OP_MATMUL):
        k, o = w.shape
        return w.nbytes, 4 * (-(-k // _WORD) * o + o)
    o, c = w.shape[:2]
    taps = int(np.prod(w.shape[2:]))
    return w.nbytes, 4 * (taps * -(-c // _WORD) * o + o)


def binarize_activation(x: relax.Expr) -> relax.Expr:
    """+1 where ``x >= 0``, else -1: a sign whose zero is +1, as a packed bit holds it (ONNX
    ``Sign`` gives 0 for 0, common after a ReLU), so the float computation and the kernels agree."""
    dtype = str(x.ty.dtype)
    return relax.op.where(relax.op.greater_equal(x, relax.const(0, dtype)),
                          relax.const(1, dtype), relax.const(-1, dtype))


@mutator
class _Rewrite(PyExprMutator):
    def __init__(self, mod, plans: Dict[relax.Var, dict]):
        super().__init__(mod)
        self.plans = plans

    def visit_var_binding_(self, binding):
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        call = binding.value
        x = self.visit_expr(call.args[0])
        if plan["add_sign"]:
            x = self.builder_.emit(binarize_activation(x))
        new = relax.Call(call.op, [x, relax.const(plan["weight"])], call.attrs, call.ty_args, call.span)
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))


@tvm.transform.module_pass(opt_level=0, name="binary")
class Binary:
    """Binarize the chosen layers (see the module docstring)."""

    def __init__(self, config: Optional[BinaryConfig] = None, env: Optional[PassEnv] = None):
        self.config = config or BinaryConfig()
        self.env = env or PassEnv()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        cfg, env = self.config, self.env
        mod = relax.transform.FoldConstant()(mod)  # transposed weights become plain constants
        funcs = relax_functions(mod)
        layers = [(gv, func, var, call) for gv, func in funcs for var, call in _layers(func)]
        names = [layer_name(call) for *_, call in layers]
        if not isinstance(cfg.layers, str):
            unknown = [n for n in cfg.layers if n not in names]
            if unknown:
                raise PassOptionError(f"--binary-layers: no conv2d/matmul layer named {unknown[0]!r}; "
                                      f"layers: {', '.join(names) or 'none'}")
        skip = set()
        if cfg.skip_first and names:
            skip.add(names[0])
        if cfg.skip_last and names:
            skip.add(names[-1])
        marks, report, plans_by_func = {}, {}, {}
        for gv, func, var, call in layers:
            name = layer_name(call)
            var2val = relax.analysis.get_var2val(func)
            reads_sign = _reads_sign(call.args[0], var2val)
            if name in skip or (cfg.layers == "auto" and not reads_sign) or (
                    not isinstance(cfg.layers, str) and name not in cfg.layers):
                continue
            weight, alpha, err = _binarize(call)
            binary_acts = not cfg.weights_only
            plans_by_func.setdefault(gv, {})[var] = {"weight": weight, "add_sign": binary_acts and not reads_sign}
            marks[name] = {"activations": "binary" if binary_acts else "float"}
            float_bytes, packed = _packed_bytes(call)
            report[name] = {
                "activations": marks[name]["activations"],
                "sign_added": binary_acts and not reads_sign,
                "weight_error": round(err, 6),
                "float_bytes": int(float_bytes),
                "packed_bytes": int(packed),
                "bits_per_weight": round(8 * packed / (float_bytes / 4), 3),
            }
        if not marks:
            why = ("no layer reads a sign (auto finds the layers of a binarized network); "
                   "name layers with --binary-layers NAMES or take all") if cfg.layers == "auto" else \
                "every chosen layer is skipped"
            raise PassOptionError(f"binary: {why}")
        for gv, func in funcs:
            plans = plans_by_func.get(gv)
            if plans:
                rewriter = _Rewrite(mod, plans)
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
                mod = rewriter.builder_.get()
        kernel = "xnor-popcount" if env.facts.binary_kernels else \
            f"none on {env.facts.target or 'this target'} (runs the equal float computation)"
        float_total = sum(r["float_bytes"] for r in report.values())
        packed_total = sum(r["packed_bytes"] for r in report.values())
        env.report["binary"] = {"layers": report, "kernels": kernel, "float_bytes": float_total,
                                "packed_bytes": packed_total}
        exact = sum(1 for r in report.values() if r["weight_error"] < 1e-6)
        stored = (f"weights {float_total / 1024:.1f} KiB -> {packed_total / 1024:.1f} KiB as bits"
                  if env.facts.binary_kernels else f"weights stay float32 here ({packed_total / 1024:.1f} KiB as bits)")
        env.log(f"binary: {len(report)} layers ({exact} already binary), {stored}; kernels: {kernel}")
        return mod.with_attr(BINARY_LAYERS_ATTR, json.dumps(marks, sort_keys=True))


def _names(text: str):
    text = str(text).strip()
    if text in ("auto", "all"):
        return text
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(group) -> None:
    group.add_argument("--binary-layers", dest="binary_layers", type=_names, metavar="LAYERS|auto|all",
                       help="layers made binary: auto (those that read a sign, default), all, or names")
    group.add_argument("--binary-weights-only", dest="binary_weights_only", action="store_true", default=None,
                       help="1-bit weights, float activations (BWN)")
    group.add_argument("--binary-skip-first", dest="binary_skip_first", action="store_true", default=None,
                       help="keep the model's first layer float")
    group.add_argument("--binary-skip-last", dest="binary_skip_last", action="store_true", default=None,
                       help="keep the model's last layer float")


def _config_from_args(args):
    from tvm_compress.pass_registry import make_config

    values = vars(args)
    options = {f: values[f"binary_{f}"] for f in ("layers", "weights_only", "skip_first", "skip_last")
               if values.get(f"binary_{f}") is not None}
    return make_config(PRESET, options)


PRESET = register_pass(
    PassPreset(
        name="binary",
        help="1-bit weights and activations (XNOR/popcount kernels, fused binary chains); "
             "auto finds a binarized network's layers",
        config_cls=BinaryConfig,
        make=Binary,
        add_arguments=add_arguments,
        config_from_args=_config_from_args,
        lossy=True,
        runs_before=("quantize",),
        order_reason="quantize leaves binary layers in float and needs to know them",
    )
)
