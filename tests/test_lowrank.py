"""Low-rank split: the factorizations (exact at full rank, a known rank recovered, whitened
beating plain SVD on correlated inputs), the dense and Tucker-2 rewrites as Before/Expected
modules, the measured decision, the compiled library against onnxruntime (x86, ARM under
qemu), composition with quantize and prune, and one-line option errors."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_compress
from tvm_compress import errors
from tvm_compress.layers import layer_name, op_kind, with_layer
from tvm_compress.pass_registry import PassEnv
from tvm_compress.passes import LowRank, LowRankConfig
from tvm_compress.passes.lowrank import factor_dense, factor_tucker2
from tvm_compress.specs import TargetFacts
from tvm_compress.targets import qemu
from tvm_compress.verify import ort_run

quiet = lambda m: None  # noqa: E731


def _env(lanes=1, measure=None):
    env = PassEnv(facts=TargetFacts(vector_lanes=lanes), log=quiet)
    if measure is not None:
        env.measure = measure
    return env


def _named(mod, params):
    """``mod`` with its weight parameters bound as constants and every conv/matmul named as a
    layer (L0, L1, ...), as the importer names them."""
    mod = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)
    count = [0]

    @mutator
    class _Name(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if op_kind(call) is None:
                return call
            count[0] += 1
            return with_layer(call, f"L{count[0] - 1}")

    mod["main"] = _Name(mod).visit_expr(mod["main"])
    return mod


# ---- the factorizations --------------------------------------------------------------------

def test_full_rank_is_exact_and_a_known_rank_is_recovered():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype("float32")
    a, b, _, energy = factor_dense(w, 16)
    np.testing.assert_allclose(a @ b, w, atol=1e-5)
    assert energy == pytest.approx(1.0)
    low = (rng.standard_normal((24, 3)) @ rng.standard_normal((3, 16))).astype("float32")
    a, b, s, energy = factor_dense(low, 3)
    np.testing.assert_allclose(a @ b, low, atol=1e-4)
    assert energy == pytest.approx(1.0) and s[3] < 1e-5 * s[0]


def test_whitened_beats_plain_on_correlated_inputs():
    """Inputs living mostly in a few directions: the whitened factors keep what the layer's
    output needs on such inputs, plain SVD what the weight's norm needs."""
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((32, 32)) * np.geomspace(10, 0.01, 32)
    x_fit, x_held = (rng.standard_normal((n, 32)) @ mix.T for n in (512, 256))
    w = rng.standard_normal((32, 24))
    for rank in (2, 4, 8, 12):
        errs = []
        for gram in (None, x_fit.T @ x_fit):
            a, b, _, _ = factor_dense(w, rank, gram)
            errs.append(np.linalg.norm(x_held @ (a.astype(np.float64) @ b) - x_held @ w))
        assert errs[1] < 0.7 * errs[0], (rank, errs)


# ---- structure -----------------------------------------------------------------------------

@I.ir_module
class Dense:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 6), "float32"),
             bias: R.Tensor((6,), "float32")) -> R.Tensor((4, 6), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            gv = R.add(y, bias)
            R.output(gv)
        return gv


@I.ir_module
class DenseSplit:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), a: R.Tensor((8, 2), "float32"), b: R.Tensor((2, 6), "float32"),
             bias: R.Tensor((6,), "float32")) -> R.Tensor((4, 6), "float32"):
        with R.dataflow():
            mid = R.matmul(x, a)
            y = R.matmul(mid, b)
            gv = R.add(y, bias)
            R.output(gv)
        return gv


def test_dense_split_structure():
    rng = np.random.default_rng(2)
    w, bias = rng.standard_normal((8, 6)).astype("float32"), rng.standard_normal(6).astype("float32")
    env = _env()
    after = LowRank(LowRankConfig(rank=2), env)(_named(Dense, {"w": w, "bias": bias}))
    a, b, _, _ = factor_dense(w, 2)
    expected = _named(DenseSplit, {"a": a, "b": b, "bias": bias})
    tvm.ir.assert_structural_equal(after, expected)
    row = env.report["lowrank"]["layers"][0]
    assert row["split"] and row["rank"] == 2 and row["params_split"] == 28 and row["macs_split"] < row["macs"]


@I.ir_module
class Conv:
    @R.function
    def main(x: R.Tensor((1, 16, 8, 8), "float32"), w: R.Tensor((16, 16, 3, 3), "float32")
             ) -> R.Tensor((1, 16, 8, 8), "float32"):
        with R.dataflow():
            gv = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(gv)
        return gv


@I.ir_module
class ConvTucker2:
    @R.function
    def main(x: R.Tensor((1, 16, 8, 8), "float32"), into: R.Tensor((4, 16, 1, 1), "float32"),
             core: R.Tensor((4, 4, 3, 3), "float32"), out: R.Tensor((16, 4, 1, 1), "float32")
             ) -> R.Tensor((1, 16, 8, 8), "float32"):
        with R.dataflow():
            a = R.nn.conv2d(x, into)
            b = R.nn.conv2d(a, core, padding=[1, 1, 1, 1])
            gv = R.nn.conv2d(b, out)
            R.output(gv)
        return gv


def test_tucker2_split_structure():
    w = np.random.default_rng(3).standard_normal((16, 16, 3, 3)).astype("float32")
    after = LowRank(LowRankConfig(rank=4, conv="tucker2"), _env())(_named(Conv, {"w": w}))
    into, core, out, _ = factor_tucker2(w, 4, 4)
    tvm.ir.assert_structural_equal(after, _named(ConvTucker2, {"into": into, "core": core, "out": out}))
    assert {layer_name(b.value) for b in after["main"].body.blocks[0].bindings} == {"L0"}


@pytest.mark.parametrize("times, split", [([1.0, 2.0], False), ([1.0, 0.99], False), ([2.0, 1.0], True)])
def test_split_measured_slower_is_not_applied(times, split):
    calls = []

    def measure(mods, inputs):
        calls.append(len(mods))
        return times

    w = np.random.default_rng(4).standard_normal((8, 6)).astype("float32")
    env = _env(measure=measure)
    before = _named(Dense, {"w": w, "bias": np.zeros(6, "float32")})
    after = LowRank(LowRankConfig(rank=2), env)(before)
    row = env.report["lowrank"]["layers"][0]
    assert calls == [2] and row["split"] is split and row["speedup"] == pytest.approx(times[0] / times[1])
    if not split:
        assert "measured" in row["reason"]
        tvm.ir.assert_structural_equal(after, relax.transform.FoldConstant()(before))


# ---- compiled models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
            self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.fc1 = torch.nn.Linear(32, 64)
            self.fc2 = torch.nn.Linear(64, 10)

        def forward(self, x):
            y = torch.relu(self.dw(torch.relu(self.c2(torch.relu(self.c1(x))))))
            return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lowrank") / "mixed.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 12, 12), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    calib = path.with_name("calib.npz")
    np.savez(calib, x=np.random.default_rng(1).uniform(-1, 1, (24, 3, 12, 12)).astype("float32"))
    return path, calib


def _x(seed):
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, 12, 12)).astype("float32")


@pytest.mark.parametrize("conv", ["channel", "tucker2"])
def test_full_rank_library_equals_the_original(mixed_model, conv, tmp_path):
    path, _ = mixed_model
    rep = tvm_compress.compile(path, tmp_path / "l.so", target="x86-avx2", passes="lowrank",
                               pass_configs={"lowrank": {"energy": 1.0, "conv": conv, "min_speedup": 0}},
                               bench_runs=1, log=quiet)
    rows = {r["name"]: r for r in rep["pass_reports"]["lowrank"]["layers"]}
    assert set(rows) == {"/c1/Conv", "/c2/Conv", "/fc1/Gemm", "/fc2/Gemm"}  # depthwise: left alone
    assert all(r["split"] for r in rows.values())
    inputs = tvm_compress.prepare_onnx(path).inputs
    for seed in range(2):
        ours = tvm_compress.run(tmp_path / "l.so", {"x": _x(seed)}).outputs[0]
        ref = ort_run(path, inputs, [_x(seed)])[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("target, arch", [("aarch64", "aarch64"), ("armv7", "armv7")])
def test_lowrank_arm_builds_match_under_qemu(mixed_model, target, arch, tmp_path):
    ok, why = qemu.can_run(arch)
    if not ok:
        pytest.skip(why)
    path, _ = mixed_model
    # full rank: the split model computes what the original does (ranks are rounded to the
    # target's lanes, so lossy settings differ between x86 and NEON builds)
    rep = tvm_compress.compile(path, tmp_path / "arm.so", target=target, passes="lowrank",
                               pass_configs={"lowrank": {"energy": 1.0, "conv": "tucker2", "min_speedup": 0}},
                               bench_runs=1, log=quiet)
    assert rep["verify_status"].startswith(f"ran qemu-{arch}") and rep["kernel_check"]["failed"] == {}
    assert all(r["split"] for r in rep["pass_reports"]["lowrank"]["layers"])
    ours = tvm_compress.run(tmp_path / "arm.so", {"x": _x(5)}).outputs[0]
    ref = ort_run(path, tvm_compress.prepare_onnx(path).inputs, [_x(5)])[0]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_lowrank_composes_with_prune_and_quantize(mixed_model, tmp_path):
    path, calib = mixed_model
    rep = tvm_compress.compile(
        path, tmp_path / "plq.so", target="x86-avx2", passes="prune,lowrank,quantize",
        pass_configs={"prune": {"ratio": 0.25}, "lowrank": {"energy": 0.9, "min_speedup": 0},
                      "quantize": {"calib": str(calib)}}, bench_runs=1, log=quiet)
    assert [s["name"] for s in rep["stages"]][:4] == ["fold", "prune", "lowrank", "quantize"]
    quant = rep["pass_reports"]["quantize"]["layers"]
    assert sum(1 for l in quant if l["name"] == "/fc1/Gemm") == 2  # both factors quantized
    assert rep["verified"] and rep["kernel_check"]["failed"] == {}
    with pytest.raises(errors.TvmCompressError, match="lowrank must come before quantize"):
        tvm_compress.compile(path, tmp_path / "bad.so", target="x86-avx2", passes="quantize,lowrank",
                             pass_configs={"quantize": {"calib": str(calib)}}, log=quiet)


@pytest.mark.parametrize("options, words", [
    ({"energy": 0.0}, "--lowrank-energy must be in (0, 1]"),
    ({"energy": 1.5}, "--lowrank-energy must be in (0, 1]"),
    ({"rank": 0}, "--lowrank-rank must be >= 1"),
    ({"energy": 0.9, "ratio": 0.5}, "lowrank: give one of --lowrank-energy / --lowrank-ratio"),
    ({"method": "qr"}, "--lowrank-method must be one of auto, svd, whitened"),
    ({"skip": ("nope",)}, "lowrank: no layer named 'nope'"),
])
def test_bad_options_are_one_line_errors(mixed_model, options, words):
    with pytest.raises(errors.TvmCompressError) as err:
        LowRank(LowRankConfig(**options), _env())(tvm_compress.load_onnx(mixed_model[0]))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_lowrank_flags(mixed_model, tmp_path, capsys):
    from tvm_compress.cli import main

    path, calib = mixed_model
    code = main(["compile", str(path), "-o", str(tmp_path / "l.so"), "--target", "x86-avx2",
                 "--passes", "lowrank", "--lowrank-energy", "0.95", "--lowrank-skip", "/fc2/Gemm",
                 "--lowrank-min-speedup", "0", "--calib", str(calib), "--quiet",
                 "--report", str(tmp_path / "r.json")])
    assert code == 0
    import json

    rep = json.loads((tmp_path / "r.json").read_text())["pass_reports"]["lowrank"]
    assert rep["method"] == "whitened" and "/fc2/Gemm" not in {r["name"] for r in rep["layers"]}
    code = main(["compile", str(path), "-o", str(tmp_path / "m.so"), "--passes", "lowrank",
                 "--lowrank-energy", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--lowrank-energy must be in (0, 1]" in err
    assert not (tmp_path / "m.so").exists()
