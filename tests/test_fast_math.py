"""The vectorized float32 exp, tanh and erf lowerings (``targets/fast_math.py``): accurate to
2e-7..4e-7 of float64, right at the edges (overflow, underflow, infinities, NaN), no C library
call left in CPU kernels, other float types on TVM's rules, and models with SiLU, softmax and
GELU equal to onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import te

import tvm_compress
from tvm_compress.targets import get_target

N = 4096


def _kernel(fn, dtype="float32", target="x86"):
    a = te.placeholder((N,), dtype, name="A")
    b = te.compute((N,), lambda i: fn(a[i]), name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(sch.split(i, [None, 8])[1])
    return tvm.compile(sch.mod, get_target(target).tvm_target())


def _inputs():
    edges = [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.7, 88.8, -87.0, -103.0, -104.5, -150.0, 1e-30]
    return np.concatenate([np.linspace(-110, 110, N - len(edges)), edges]).astype("float32")


@pytest.mark.parametrize("name", ["exp", "sigmoid"])
def test_exp_and_sigmoid_match_float64(name):
    xs = _inputs()
    fn = te.exp if name == "exp" else te.sigmoid
    out = tvm.runtime.tensor(np.zeros(N, "float32"))
    _kernel(fn)(tvm.runtime.tensor(xs), out)
    got = out.numpy()
    with np.errstate(over="ignore"):
        x64 = xs.astype(np.float64)
        ref = (np.exp(x64) if name == "exp" else 1 / (1 + np.exp(-x64))).astype(np.float32)
    normal = np.isfinite(ref) & (np.abs(ref) >= np.finfo(np.float32).tiny)
    rel = np.abs(got[normal].astype(np.float64) - ref[normal]) / np.abs(ref[normal])
    assert rel.max() < 2e-7, rel.max()
    # NaN stays NaN; inf and 0 where float64 rounds to them; exp reaches the denormals, the
    # sigmoid's division may flush them to 0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    rest = ~normal & ~np.isnan(ref)
    atol = 2 * np.finfo(np.float32).smallest_subnormal if name == "exp" else np.finfo(np.float32).tiny
    np.testing.assert_allclose(got[rest], ref[rest], rtol=0, atol=atol)


_ERF = np.vectorize(math.erf)


def test_tanh_and_erf_match_float64():
    xs = _inputs()
    for fn, ref_fn, tol in ((te.tanh, np.tanh, 3e-7), (te.erf, _ERF, 4e-7)):
        out = tvm.runtime.tensor(np.zeros(N, "float32"))
        _kernel(fn)(tvm.runtime.tensor(xs), out)
        got, ref = out.numpy().astype(np.float64), ref_fn(xs.astype(np.float64))
        ok = ~np.isnan(ref)
        assert np.abs(got[ok] - ref[ok]).max() < tol  # absolute (their values are at most 1)
        small = ok & (np.abs(xs) < 0.1) & (xs != 0)
        assert (np.abs(got[small] - ref[small]) / np.abs(ref[small])).max() < tol  # relative near 0
        assert np.isnan(got[~ok]).all() and got[xs == np.inf][0] == 1.0 and got[xs == -np.inf][0] == -1.0


@pytest.mark.parametrize("target", ["x86", "x86-avx2", "aarch64", "armv7"])
def test_no_libm_call_in_cpu_kernels(target):
    for fn in (te.exp, te.sigmoid, te.tanh, te.erf):  # TVM's own tanh calls expf
        lib = _kernel(fn, target=target)
        (mod,) = [m for m in [lib.mod, *lib.mod.imports] if m.kind == "llvm"]
        asm = mod.inspect_source("s")
        # nor a rounding call (ARMv7 NEON has no vector round: nearbyintf per element)
        assert not any(name in asm for name in ("expf", "tanhf", "erff", "nearbyintf", "roundf"))
        # the polynomial, in vector registers
        assert any(op in asm for op in ("vfmadd", "fmla", "vmulps", "vfma.f32", "vmla.f32"))


def test_float64_exp_keeps_tvms_lowering():
    xs = np.linspace(-700, 700, N)
    out = tvm.runtime.tensor(np.zeros(N, "float64"))
    _kernel(te.exp, "float64")(tvm.runtime.tensor(xs), out)
    np.testing.assert_allclose(out.numpy(), np.exp(xs), rtol=1e-15)


def test_silu_softmax_gelu_model_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.5).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["silu"]),
             helper.make_node("Softmax", ["silu"], ["sm"], axis=1),
             helper.make_node("Erf", ["c"], ["e"]), helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Add", ["e", "t"], ["et"]), helper.make_node("Add", ["sm", "et"], ["y"])]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], [w])
    model = tmp_path / "silu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    rep = tvm_compress.compile(model, tmp_path / "s.so", target="x86", bench_runs=0, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5
