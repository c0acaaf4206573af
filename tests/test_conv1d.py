"""1-D convolutions run as 2-D ones of height 1 (``Conv1dToConv2d``): the rewrite as a
Before/Expected pair (bias and activation inside, no reshape between two layers), and a 1-D
model from torch (batch norm, depthwise, stride, dilation) compiled float and int8 against
onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_compress
from conftest import bound
from tvm_compress.passes import Conv1dToConv2d
from tvm_compress.verify import ort_run

quiet = lambda m: None  # noqa: E731
_CONV1D = tvm.ir.Op.get("relax.nn.conv1d")


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 16), "float32"), w1: R.Tensor((8, 4, 3), "float32"),
             b1: R.Tensor((1, 8, 1), "float32"), w2: R.Tensor((8, 1, 3), "float32")
             ) -> R.Tensor((1, 8, 8), "float32"):
        with R.dataflow():
            y = R.nn.conv1d(x, w1, padding=[1, 1])
            z = R.add(y, b1)
            a = R.nn.relu(z)
            gv = R.nn.conv1d(a, w2, strides=[2], padding=[1, 1], groups=8)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 16), "float32"), w1: R.Tensor((8, 4, 1, 3), "float32"),
             b1: R.Tensor((1, 8, 1, 1), "float32"), w2: R.Tensor((8, 1, 1, 3), "float32")
             ) -> R.Tensor((1, 8, 8), "float32"):
        with R.dataflow():
            x4 = R.expand_dims(x, axis=[2])
            y = R.nn.conv2d(x4, w1, padding=[0, 1, 0, 1])
            z = R.add(y, b1)
            a = R.nn.relu(z)
            g4 = R.nn.conv2d(a, w2, strides=[1, 2], padding=[0, 1, 0, 1], groups=8)
            gv = R.squeeze(g4, axis=[2])
            R.output(gv)
        return gv


def test_conv1d_chain_becomes_a_conv2d_chain():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 4, 3)).astype("float32"), rng.standard_normal((8, 1, 3)).astype("float32")
    b1 = rng.standard_normal((1, 8, 1)).astype("float32")
    after = Conv1dToConv2d()(bound(Before, {"w1": w1, "b1": b1, "w2": w2}))
    expected = bound(Expected, {"w1": w1[:, :, None, :], "b1": b1[..., None], "w2": w2[:, :, None, :]})
    tvm.ir.assert_structural_equal(after, expected)


def test_a_module_without_conv1d_is_returned_as_is():
    @I.ir_module
    class Conv2d:
        @R.function
        def main(x: R.Tensor((1, 4, 1, 16), "float32"), w: R.Tensor((8, 4, 1, 3), "float32")):
            with R.dataflow():
                gv = R.nn.conv2d(x, w)
                R.output(gv)
            return gv

    assert Conv1dToConv2d()(Conv2d).same_as(Conv2d)


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    """A keyword-spotting-like 1-D CNN: conv + batch norm + ReLU, depthwise, strided, dilated."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv1d(10, 24, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm1d(24)
            self.dw = torch.nn.Conv1d(24, 24, 5, padding=2, groups=24)
            self.pw = torch.nn.Conv1d(24, 40, 1)
            self.c4 = torch.nn.Conv1d(40, 40, 3, stride=2, padding=1)
            self.c5 = torch.nn.Conv1d(40, 32, 3, padding=2, dilation=2)
            self.fc = torch.nn.Linear(32, 6)

        def forward(self, x):
            x = torch.relu(self.bn(self.c1(x)))
            x = torch.relu(self.pw(torch.relu(self.dw(x))))
            x = torch.relu(self.c5(torch.relu(self.c4(x))))
            return self.fc(x.mean(-1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("conv1d") / "audio.onnx"
    torch.onnx.export(net, torch.randn(1, 10, 50), str(path), input_names=["x"], dynamo=False)
    return path


def _ops(mod):
    ops = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: ops.append(e.op) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return ops


def test_imported_1d_model_has_no_conv1d_and_compiles_exactly(audio_model, tmp_path):
    mod = tvm_compress.load_onnx(audio_model)
    ops = _ops(mod)
    assert not any(op.same_as(_CONV1D) for op in ops)
    assert sum(op.same_as(tvm.ir.Op.get("relax.nn.conv2d")) for op in ops) == 5
    # one squeeze, before the mean: the layers exchange 4-D values
    assert sum(op.same_as(tvm.ir.Op.get("relax.squeeze")) for op in ops) == 1

    x = np.random.default_rng(1).standard_normal((1, 10, 50)).astype("float32")
    lib = tmp_path / "a.so"
    rep = tvm_compress.compile(audio_model, lib, target="x86-avx2", bench_runs=1, log=quiet)
    assert rep["kernel_check"]["failed"] == {} and rep["max_rel_err"] <= 1e-4
    ours = tvm_compress.run(lib, {"x": x}).outputs[0]
    ref = ort_run(audio_model, tvm_compress.prepare_onnx(audio_model).inputs, [x])[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_1d_model_quantizes_to_int8(audio_model, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((16, 10, 50)).astype("float32"))
    rep = tvm_compress.compile(audio_model, tmp_path / "q.so", target="x86-avx2", passes="quantize", bench_runs=1,
                               pass_configs={"quantize": {"calib": str(calib)}}, log=quiet)
    layers = rep["pass_reports"]["quantize"]["layers"]
    assert [r["status"] for r in layers if "conv2d" in r["op"]] == ["int8"] * 5  # the depthwise one too
    assert rep["weight_bytes_after"] < 0.35 * rep["weight_bytes_before"] and rep["max_rel_err"] <= 0.1


def test_1d_model_aarch64_library_matches_under_qemu(audio_model, tmp_path):
    from tvm_compress.targets import qemu

    ok, why = qemu.can_run("aarch64")
    if not ok:
        pytest.skip(why)
    rep = tvm_compress.compile(audio_model, tmp_path / "arm.so", target="aarch64", bench_runs=1, log=quiet)
    assert rep["verify_status"].startswith("ran qemu-aarch64") and rep["kernel_check"]["failed"] == {}
    assert rep["max_rel_err"] <= 1e-4
