"""RoundToInt (targets/round_to_int.py): a requantize's round + float clamp + cast -> lrint + integer
clamp + cast, exact against numpy's round-half-to-even on the values where it could differ."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_compress import pipeline
from tvm_compress.targets import get_family, get_target
from tvm_compress.targets.round_to_int import ROUND_TO_INT, RoundToInt


def _requantize(dtype: str, lo: float, hi: float, zero: float = 0.0, source: str = "float32", scale=0.5,
                relu: bool = False):
    """round(x * scale) + zero clamped to [lo, hi], cast to ``dtype``; an integer ``source`` is cast
    to float32 first (an accumulator's requantize); ``relu``: x through a ReLU first."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), source))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = bb.emit(relax.op.astype(x, "float32")) if source != "float32" else x
            v = bb.emit(relax.op.nn.relu(v)) if relu else v
            y = bb.emit(relax.op.multiply(v, relax.const(np.float32(scale))))
            y = bb.emit(relax.op.add(bb.emit(relax.op.round(y)), relax.const(np.float32(zero))))
            y = bb.emit(relax.op.minimum(y, relax.const(np.float32(hi))))
            y = bb.emit(relax.op.maximum(y, relax.const(np.float32(lo))))
            out = bb.emit_output(bb.emit(relax.op.astype(y, dtype)))
        bb.emit_func_output(out)
    return bb.get()


def test_rewrites_the_chain_with_zero_point_zero():
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def round_to_int(x: T.Buffer((T.int64(4), T.int64(64)), "float32"),
                         out: T.Buffer((T.int64(4), T.int64(64)), "int32")):
            T.func_attr({"op_pattern": 0, "tirx.noalias": True})  # element-wise: fuses into the conv epilogue
            for i0, i1 in T.grid(T.int64(4), T.int64(64)):
                with T.sblock("round_to_int"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    T.reads(x[v0, v1])
                    T.writes(out[v0, v1])
                    out[v0, v1] = T.call_llvm_pure_intrin("int32", "llvm.lrint", T.min(x[v0, v1], T.float32(2147483520.0)))

        @R.function
        def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "int8"):
            cls = Expected
            with R.dataflow():
                lv = R.multiply(x, R.const(0.5, "float32"))
                lv1 = R.call_tir(cls.round_to_int, (lv,), out_ty=R.Tensor((4, 64), "int32"))
                lv2 = R.minimum(lv1, R.const(127, "int32"))
                lv3 = R.maximum(lv2, R.const(-128, "int32"))
                gv = R.astype(lv3, "int8")
                R.output(gv)
            return gv

    after = RoundToInt()(_requantize("int8", -128, 127))
    # (the mutator binds the new astype to a variable the output then aliases)
    tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(after), Expected)


@pytest.mark.parametrize("dtype, lo, hi, zero", [
    ("int8", -128, 127, 3.0),  # a zero point: stays
    ("int8", -128, 127.5, 0.0),  # a bound that is no integer: stays
    ("uint8", 0, 300, 0.0),  # a bound outside the type: stays
])
def test_leaves_other_chains(dtype, lo, hi, zero):
    before = _requantize(dtype, lo, hi, zero)
    tvm.ir.assert_structural_equal(RoundToInt()(before), before)


def _relu_calls(mod) -> int:
    relu = tvm.ir.Op.get("relax.nn.relu")
    calls = []
    tvm_ffi.structural_walk(mod["main"].body, [(relax.Call, lambda c: calls.append(c.op.same_as(relu)))], order="post")
    return sum(calls)


@pytest.mark.parametrize("dtype, lo, hi, scale, dropped", [
    ("uint8", 0, 255, 0.5, True),
    ("int8", 0, 127, np.array([0.5, 0.25] * 32, np.float32), True),  # per channel, all positive
    ("int8", -128, 127, 0.5, False),  # the clamp keeps negatives: the ReLU matters
    ("uint8", 0, 255, np.array([0.5, -0.25] * 32, np.float32), False),  # a negative scale flips it
])
def test_relu_before_a_clamp_from_zero_is_dropped(dtype, lo, hi, scale, dropped):
    """``clamp(lrint(relu(y) * k), lo >= 0, hi)`` = ``clamp(lrint(y * k), lo, hi)`` for ``k > 0``: one
    instruction less per vector in every ReLU layer's int8 epilogue."""
    scale = np.float32(scale) if np.isscalar(scale) else scale
    before = _requantize(dtype, lo, hi, scale=scale, relu=True)
    after = RoundToInt()(before)
    assert _relu_calls(before) == 1 and _relu_calls(after) == (0 if dropped else 1)
    if dropped:
        without = RoundToInt()(_requantize(dtype, lo, hi, scale=scale))
        tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(after),
                                       relax.transform.CanonicalizeBindings()(without))


@pytest.mark.parametrize("dtype, lo, hi, relu", [("int8", -128, 127, False), ("uint8", 0, 255, False),
                                                  ("int8", 0, 127, False), ("uint8", 0, 255, True)])
def test_exact_and_one_conversion_on_x86(dtype, lo, hi, relu):
    profile = get_target("x86-avx2")
    assert ROUND_TO_INT in get_family(profile.family).hooks(profile)
    target = profile.tvm_target()
    with target:  # the product's lowering and default schedules, the rewrite among its hooks
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(_requantize(dtype, lo, hi, relu=relu))
    assert [gv for gv in lowered.functions if "round_to_int" in gv.name_hint]
    mod = pipeline.Schedule(profile)(lowered)
    # Half-way values both ways, the int8 edges, far outside the range, float32 extremes.
    rng = np.random.default_rng(0)
    x = rng.uniform(-600, 600, (4, 64)).astype("float32")
    x.flat[:24] = [2 * v for v in (0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, -127.5,
                                   254.5, 255.5)] + [6e9, -6e9, 2.2e9, -2.2e9, 4.29e9, -4.29e9,
                                                     3.4e38, -3.4e38, 1e-30, -1e-30, 0.0, -0.0]
    executable = tvm.compile(mod, target)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = np.clip(np.rint((np.maximum(x, 0) if relu else x) * np.float32(0.5)), lo, hi).astype(dtype)
    np.testing.assert_array_equal(got, ref)
    (llvm_mod,) = [m for m in executable.mod.imports if m.kind == "llvm"]
    asm = llvm_mod.inspect_source("s")
    assert re.search(r"\bvcvtps2dq\b", asm) and not re.search(r"\bvroundps\b", asm)


def test_no_cap_where_the_value_is_bounded():
    """An int32 accumulator times 0.5 is within 2^30 in magnitude: ``lrint`` needs no cap there."""

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def round_to_int(x: T.Buffer((T.int64(4), T.int64(64)), "float32"),
                         out: T.Buffer((T.int64(4), T.int64(64)), "int32")):
            T.func_attr({"op_pattern": 0, "tirx.noalias": True})
            for i0, i1 in T.grid(T.int64(4), T.int64(64)):
                with T.sblock("round_to_int"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    T.reads(x[v0, v1])
                    T.writes(out[v0, v1])
                    out[v0, v1] = T.call_llvm_pure_intrin("int32", "llvm.lrint", x[v0, v1])

        @R.function
        def main(x: R.Tensor((4, 64), "int32")) -> R.Tensor((4, 64), "int8"):
            cls = Expected
            with R.dataflow():
                lv = R.astype(x, "float32")
                lv1 = R.multiply(lv, R.const(0.5, "float32"))
                lv2 = R.call_tir(cls.round_to_int, (lv1,), out_ty=R.Tensor((4, 64), "int32"))
                lv3 = R.minimum(lv2, R.const(127, "int32"))
                lv4 = R.maximum(lv3, R.const(-128, "int32"))
                gv = R.astype(lv4, "int8")
                R.output(gv)
            return gv

    after = RoundToInt()(_requantize("int8", -128, 127, source="int32", scale=0.5))
    tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(after), Expected)
    # times 1.5 it can pass 2^31: capped
    after = RoundToInt()(_requantize("int8", -128, 127, source="int32", scale=1.5))
    (func,) = [f for gv, f in after.functions_items() if gv.name_hint == "round_to_int"]
    assert not tvm_ffi.structural_equal(func, Expected["round_to_int"])


def _chain(tail):
    """int32 (1, 4, 8, 8) accumulator -> float -> * 0.01 -> ``tail(bb, value)`` -> requantize."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(x, "float32")), relax.const(np.float32(0.01))))
            y = bb.emit(relax.op.round(bb.emit(tail(bb, v))))
            y = bb.emit(relax.op.maximum(bb.emit(relax.op.minimum(y, relax.const(np.float32(127)))),
                                         relax.const(np.float32(-128))))
            out = bb.emit_output(bb.emit(relax.op.astype(y, "int8")))
        bb.emit_func_output(out)
    return bb.get()


def _hard_swish(bb, v, k=5.0):
    gate = bb.emit(relax.op.clip(bb.emit(relax.op.add(bb.emit(relax.op.multiply(v, relax.const(np.float32(k / 6)))),
                                                       relax.const(np.float32(k / 2)))), 0.0, k))
    return relax.op.multiply(v, gate)


@pytest.mark.parametrize("tail, capped", [
    (_hard_swish, False),  # |v| <= 2.2e7, the gate within [0, 5]
    (lambda bb, v: relax.op.multiply(bb.emit(_hard_swish(bb, v)), bb.emit(_hard_swish(bb, v))), True),  # up to 1e16
    (lambda bb, v: relax.op.nn.relu(bb.emit(relax.op.concat([v, v], axis=1))), False),
    (lambda bb, v: relax.op.image.resize2d(v, (16, 16), layout="NCHW", method="linear"), False),
    (lambda bb, v: relax.op.image.resize2d(v, (16, 16), layout="NCHW", method="cubic"), True),  # overshoots
    (lambda bb, v: relax.op.exp(v), True),  # no bound known
])
def test_cap_follows_the_bound_of_the_chain(tail, capped):
    after = RoundToInt()(_chain(tail))
    (func,) = [f for gv, f in after.functions_items() if gv.name_hint == "round_to_int"]
    caps = []
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.FloatImm, lambda c: caps.append(float(c.value)))], order="post")
    assert (float(np.float32(2**31 - 128)) in caps) == capped


def test_bounded_chain_without_cap_is_exact_on_x86():
    """No cap: int32 extremes times 0.5 still convert, round half to even and saturate exactly."""
    profile = get_target("x86-avx2")
    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(
            _requantize("int8", -128, 127, source="int32", scale=0.5))
    mod = pipeline.Schedule(profile)(lowered)
    rng = np.random.default_rng(1)
    x = rng.integers(-600, 600, (4, 64)).astype("int32")
    x.flat[:12] = [1, 3, 5, -1, -3, -5, 253, 255, -255, -257, 2**31 - 1, -2**31]
    got = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = np.clip(np.rint(x.astype(np.float32) * np.float32(0.5)), -128, 127).astype("int8")
    np.testing.assert_array_equal(got, ref)
