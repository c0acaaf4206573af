"""Kernel check: every scheduled kernel, run alone with its outputs pre-filled, against its
unscheduled form.

A schedule can leave output elements unwritten: a loop nest smaller than the kernel's output
(a pad, concat or resize fused after a convolution) writes only part of it, and the rest holds
whatever memory held. Fresh memory is often zero, so a whole-model comparison can pass by luck
on one machine and fail on a board. Here every kernel that scheduling changed runs twice where
the target runs (natively, under qemu, over RPC) with its output buffers filled with two
different patterns (NaN and the most negative float; two byte patterns for integers). An
element equal to the fill after both runs was never written; every other element must match
the unscheduled kernel on the same arguments.

How: the library gets one more Relax function, ``CHECK_FUNCTION``, that calls the scheduled
kernels in place (``call_tir_inplace``) on buffers passed in as parameters, so the fills reach
each kernel as they are; it shares the model's compiled kernels, so checking costs no second
build of them. The arguments come from a host run of the unscheduled module, whose VM
instrument copies each kernel's arguments and outputs at its first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from .verify import FLOAT_ABS_TOL, FLOAT_REL_TOL

CHECK_FUNCTION = "tvmc_check_kernels"

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")

# Integer outputs may differ by one from the unscheduled kernel: a float rounded to an integer
# (requantize) can land on the other side of a tie when the target contracts a multiply-add.
INT_TOL = 1


@dataclass(frozen=True)
class KernelCall:
    """One kernel in the check function: its name, input count and (shape, dtype) per argument."""

    name: str
    n_in: int
    args: Tuple[Tuple[Tuple[int, ...], str], ...]


@dataclass
class KernelCheckResult:
    checked: List[str] = field(default_factory=list)
    # kernel name -> why its values were not compared (its outputs were still checked written)
    unreached: List[str] = field(default_factory=list)
    # kernel name -> what is wrong
    failed: Dict[str, str] = field(default_factory=dict)
    where: str = ""

    def as_dict(self) -> dict:
        return {"checked": len(self.checked), "where": self.where, "kernels": list(self.checked),
                "not_reached": list(self.unreached), "failed": dict(self.failed)}


def _call_arity(mod: tvm.IRModule) -> Dict[str, Tuple[int, int]]:
    """PrimFunc name -> (inputs, outputs) at its ``call_tir`` sites in the Relax functions."""
    arity: Dict[str, Tuple[int, int]] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(_CALL_TIR):
            gv, args = expr.args[0], expr.args[1]
            if len(expr.args) > 2 or not isinstance(args, relax.Tuple):
                return  # symbolic tir_vars: not a plain kernel call
            out = expr.ty
            n_out = len(out.fields) if isinstance(out, relax.TupleType) else 1
            arity.setdefault(gv.name_hint, (len(args.fields), n_out))

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return arity


def _static_args(func: tirx.PrimFunc) -> Optional[Tuple[Tuple[Tuple[int, ...], str], ...]]:
    out = []
    for param in func.params:
        if not isinstance(param.ty, tirx.BufferType) or not all(isinstance(d, tirx.IntImm) for d in param.shape):
            return None
        out.append((tuple(int(d) for d in param.shape), str(param.dtype)))
    return tuple(out)


def plan(unscheduled: tvm.IRModule, scheduled: tvm.IRModule) -> List[KernelCall]:
    """The kernels that scheduling changed (static shapes only), in module order."""
    arity = _call_arity(scheduled)
    before = {gv.name_hint: f for gv, f in unscheduled.functions.items()}
    calls = []
    for gv, func in scheduled.functions.items():
        name = gv.name_hint
        if not isinstance(func, tirx.PrimFunc) or name not in arity:
            continue
        if name in before and tvm_ffi.structural_equal(before[name], func):
            continue  # untouched loop nests are the reference itself
        args = _static_args(func)
        if args is not None and len(args) == sum(arity[name]):
            calls.append(KernelCall(name, arity[name][0], args))
    return calls


def with_check_function(scheduled: tvm.IRModule, calls: Sequence[KernelCall]) -> tvm.IRModule:
    """``scheduled`` plus ``CHECK_FUNCTION(args of kernel 1..., args of kernel 2..., ...)``, which
    calls each kernel in place on its own output parameters and returns them all in one flat
    tuple."""
    bb = relax.BlockBuilder(scheduled)
    params, groups = [], []
    for k, call in enumerate(calls):
        group = [relax.Var(f"k{k}_{i}", relax.TensorType(shape, dtype))
                 for i, (shape, dtype) in enumerate(call.args)]
        params.extend(group)
        groups.append((call, group))
    with bb.function(CHECK_FUNCTION, params):
        results = []
        for call, group in groups:
            outs = group[call.n_in:]
            types = [v.ty for v in outs]
            res = bb.emit(relax.op.call_tir_inplace(
                scheduled.get_global_var(call.name), relax.Tuple(group),
                list(range(call.n_in, len(group))), types if len(types) > 1 else types[0],
            ))
            if len(outs) > 1:
                results.extend(bb.emit(relax.TupleGetItem(res, i)) for i in range(len(outs)))
            else:
                results.append(res)
        bb.emit_func_output(relax.Tuple(results))
    return bb.get()


def _reference_pipeline():
    """The CPU build pipeline without RewriteDataflowReshape: reshape kernels stay calls, so
    their arguments are captured like any other kernel's."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="KernelCheckReference")
    def _pipeline(mod, _ctx):
        target = tvm.target.Target.current()
        passes = [
            *cpu.library_dispatch_passes(target),
            *cpu.legalize_passes(target),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            *cpu.finalize_passes(target),
        ]
        return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def capture_arguments(
    unscheduled: tvm.IRModule, inputs: Sequence[np.ndarray], names: Sequence[str]
) -> Dict[str, List[np.ndarray]]:
    """Run the unscheduled module on the host; each named kernel's arguments (inputs, then the
    outputs it wrote) at its first call."""
    # LLVM -O1: half the build time of -O3 for naive loop nests that run once.
    host = tvm.target.Target({"kind": "llvm", "opt-level": 1})
    with host:
        exe = tvm.compile(unscheduled, host, relax_pipeline=_reference_pipeline())
    vm = relax.VirtualMachine(exe, tvm.cpu())
    wanted = set(names)
    captured: Dict[str, List[np.ndarray]] = {}

    def instrument(_func, symbol, before_run, _ret, *args):
        if not before_run and symbol in wanted and symbol not in captured:
            if all(isinstance(a, tvm.runtime.Tensor) for a in args):
                captured[symbol] = [a.numpy().copy() for a in args]
        return 0  # VMInstrumentReturnKind.kNoOp: carry on

    vm.set_instrument(instrument)
    vm["main"](*[tvm.runtime.tensor(np.asarray(x, order="C")) for x in inputs])
    return captured


def fill_values(dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Two different fills for an element of ``dtype``: NaN and the most negative finite float;
    alternating bit patterns for integers; False and True."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.array(np.nan, dtype), np.array(np.finfo(dtype).min, dtype)
    if dtype.kind == "b":
        return np.array(False), np.array(True)
    a = np.frombuffer(b"\x5a" * dtype.itemsize, dtype=dtype)[0]
    b = np.frombuffer(b"\xa5" * dtype.itemsize, dtype=dtype)[0]
    return np.array(a, dtype), np.array(b, dtype)


def _equal_to(x: np.ndarray, value: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "f" and np.isnan(value):
        return np.isnan(x)
    return x == value


def compare_output(runs: Sequence[np.ndarray], fills: Sequence[np.ndarray],
                   ref: Optional[np.ndarray]) -> Optional[str]:
    """None when every element was written (and matches ``ref`` when given); else what is wrong."""
    unwritten = _equal_to(runs[0], fills[0]) & _equal_to(runs[1], fills[1])
    if unwritten.any():
        first = [int(i) for i in np.argwhere(unwritten)[0]]
        return f"{int(unwritten.sum())} of {unwritten.size} output elements never written (first at {first})"
    if ref is None:
        return None
    for out in runs:
        if ref.dtype.kind == "f":
            o, r = out.astype(np.float64), ref.astype(np.float64)
            finite = np.isfinite(r)
            scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
            special_alike = (np.isnan(o) & np.isnan(r)) | ((o == r) & ~finite)
            step = grid_step(r[finite])
            with np.errstate(invalid="ignore"):
                bad = ~special_alike & ~(np.abs(o - r) <= max(FLOAT_REL_TOL * scale + FLOAT_ABS_TOL,
                                                              step * (1 + 1e-4)))
            err = float(np.nan_to_num(np.abs(o - r)[bad], nan=np.inf).max()) if bad.any() else 0.0
        else:
            diff = np.abs(out.astype(np.int64) - ref.astype(np.int64))
            bad = diff > INT_TOL
            err = float(diff.max()) if diff.size else 0.0
        if bad.any():
            return f"{int(bad.sum())} of {ref.size} output elements differ from the unscheduled kernel (max abs err {err:.3g})"
    return None


def grid_step(values: np.ndarray) -> float:
    """The spacing of ``values`` when they all sit on one evenly spaced grid (a dequantized
    output: ``(q - zero_point) * scale``), else 0. Such an output may land one step away from
    the unscheduled kernel's, as an integer one may (``INT_TOL``)."""
    levels = np.unique(values.astype(np.float64))
    if levels.size < 3:
        return 0.0
    gaps = np.diff(levels)
    step = float(gaps.min())
    ratio = gaps / step
    if step <= 0 or ratio.max() > 1e4 or not np.allclose(ratio, np.round(ratio), rtol=0, atol=1e-3):
        return 0.0
    return step


RunFn = Callable[[List[np.ndarray]], List[np.ndarray]]


def check(
    unscheduled: tvm.IRModule,
    calls: Sequence[KernelCall],
    inputs: Sequence[np.ndarray],
    run: RunFn,
    where: str = "",
) -> KernelCheckResult:
    """Run ``CHECK_FUNCTION`` twice through ``run(args) -> flat outputs`` (see the module
    docstring) on the arguments the unscheduled module gives each kernel for ``inputs``.

    A kernel that the inputs do not reach (a branch not taken) runs on zeros: its outputs are
    still checked written, their values not compared."""
    result = KernelCheckResult(where=where)
    if not calls:
        return result
    captured = capture_arguments(unscheduled, inputs, [c.name for c in calls])
    refs: List[Optional[List[np.ndarray]]] = []
    per_run: List[List[np.ndarray]] = [[], []]
    for call in calls:
        got = captured.get(call.name)
        if got is None or [(a.shape, str(a.dtype)) for a in got] != list(call.args):
            got = None
            result.unreached.append(call.name)
        args = got or [np.zeros(shape, dtype) for shape, dtype in call.args]
        refs.append(got[call.n_in:] if got else None)
        for which, run_args in enumerate(per_run):
            run_args.extend(args[:call.n_in])
            run_args.extend(np.full(o.shape, fill_values(o.dtype)[which], o.dtype) for o in args[call.n_in:])
    outputs = [run(run_args) for run_args in per_run]
    pos = 0
    for call, ref in zip(calls, refs):
        problems = []
        for k, (_shape, dtype) in enumerate(call.args[call.n_in:]):
            why = compare_output([outs[pos] for outs in outputs], fill_values(dtype),
                                 None if ref is None else ref[k])
            pos += 1
            if why:
                problems.append(why)
        if problems:
            result.failed[call.name] = "; ".join(problems)
        elif ref is not None:
            result.checked.append(call.name)
    return result
