"""Channels-last float convolutions (targets/channels_last.py): where the rewrite applies, what
layouts the graph keeps between layers, and that the libraries still compute the model."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_compress
from tvm_compress.relax_utils import is_constant
from tvm_compress.targets.channels_last import MIN_GAIN, ChannelsLast, channels_last_gain, conv_layout
from tvm_compress.verify import ort_run

OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _mobile_net():
    """Small maps (5x5) after stride-2 convs, a depthwise conv, a one-element learnable affine
    (multiply/add by shape-(1,) constants), an SE block (mean, 1x1 convs, hardsigmoid, mul), a
    concat, an upsampling resize, a 4-channel conv on a 20-wide map (better kept NCHW), and a
    flatten + linear head (a reshape that needs NCHW)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            nn = torch.nn
            self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
            self.scale = nn.Parameter(torch.tensor([1.3]))
            self.shift = nn.Parameter(torch.tensor([-0.2]))
            self.pw = nn.Conv2d(16, 32, 1)
            self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
            self.c3 = nn.Conv2d(32, 32, 3, padding=1)
            self.side = nn.Conv2d(16, 16, 1)
            self.reduce = nn.Conv2d(48, 8, 1)
            self.wide = nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(48 * 5 * 5, 10)

        def forward(self, x):
            f = torch.relu(self.stem(x))
            d = self.dw(f) * self.scale + self.shift
            y = torch.nn.functional.hardswish(self.pw(d))
            s = torch.nn.functional.hardsigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
            y = torch.relu(self.c3(y * s))
            cat = torch.cat([y, self.side(d)], 1)
            up = torch.nn.functional.interpolate(self.reduce(cat), scale_factor=4.0, mode="nearest")
            return self.wide(up), self.fc(cat.flatten(1))

    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def mobile_onnx(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("channels_last") / "mobile.onnx"
    torch.onnx.export(_mobile_net(), torch.rand(1, 3, 20, 20), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["map", "logits"])
    return path


def _relax(path):
    return tvm_compress.prepare_onnx(path, {"x": (1, 3, 20, 20)}).to_relax()


def _bindings(func):
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def _producer_path(var, bindings):
    """Calls from ``var`` back to the previous conv (or a parameter), through anything else."""
    path, todo, seen = [], [var], set()
    while todo:
        v = todo.pop()
        if v in seen or v not in bindings:
            continue
        seen.add(v)
        value = bindings[v]
        if not isinstance(value, relax.Call):
            continue
        path.append(value)
        if value.op.same_as(OP_CONV2D):
            continue
        todo.extend(a for a in value.args if isinstance(a, relax.Var))
    return path


def test_convs_exchange_nhwc_without_transposes_between_them(mobile_onnx):
    mod = _relax(mobile_onnx)
    assert channels_last_gain(mod["main"], 16) >= MIN_GAIN
    out = relax.transform.FoldConstant()(ChannelsLast(lanes=16)(mod))  # weights' transposes fold
    func = out["main"]
    bindings = _bindings(func)
    convs = [(v, c) for v, c in bindings.items() if isinstance(c, relax.Call) and c.op.same_as(OP_CONV2D)]
    layouts = [c.attrs.data_layout for _, c in convs]
    # the 4-channel conv on the 20-wide map stays NCHW; the other eight run NHWC
    assert layouts.count("NCHW") == 1 and layouts.count("NHWC") == 8, layouts
    for _, conv in convs:
        if conv.attrs.data_layout != "NHWC":
            continue
        # between this conv and the convs feeding it: no transpose of an activation (the
        # model's input, converted once, is the only one)
        transposes = [c for c in _producer_path(conv.args[0], bindings)[1:]
                      if c.op.same_as(OP_PERMUTE) and not is_constant(c.args[0])]
        assert all(isinstance(t.args[0], relax.Var) and t.args[0] in list(func.params) for t in transposes), \
            [str(t) for t in transposes]
    # activation transposes: input, the flatten's reshape, around the NCHW conv, its output
    act = [c for c in bindings.values() if isinstance(c, relax.Call) and c.op.same_as(OP_PERMUTE)]
    assert len(act) == 5, [str(c) for c in act]


def test_wide_rows_and_few_channels_stay_nchw():
    """A classifier-like conv (8 channels, 96-wide rows): NCHW fills the vectors; unchanged."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 4, 96), "float32"))
    w = relax.const(np.ones((8, 8, 3, 3), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    mod = bb.get()
    assert channels_last_gain(mod["main"], 16) < MIN_GAIN
    out = ChannelsLast(lanes=16)(mod)
    tvm.ir.assert_structural_equal(out["main"], mod["main"])
    assert conv_layout(out)["layout"] == "NCHW" and "below" in conv_layout(out)["reason"]


def test_a_preset_can_turn_it_off():
    import dataclasses

    from tvm_compress.targets import get_family, get_target
    from tvm_compress.targets.channels_last import CHANNELS_LAST

    x86 = get_target("x86")
    assert CHANNELS_LAST in get_family("x86").hooks(x86) and CHANNELS_LAST in get_family("aarch64").hooks(
        get_target("aarch64"))
    off = dataclasses.replace(x86, features={**x86.features, "channels_last": False})
    assert CHANNELS_LAST not in get_family("x86").hooks(off)


def test_kernels_of_other_hooks_keep_the_module_nchw():
    """A module with a call_tir (int8 / sparse / binary kernels) is left alone."""
    from tvm import topi

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 5, 5), "float32"))
    w = relax.const(np.ones((32, 32, 1, 1), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w))
            y = bb.emit(bb.call_te(topi.nn.relu, y))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    mod = bb.get()
    assert channels_last_gain(mod["main"], 16) == 0.0
    tvm.ir.assert_structural_equal(ChannelsLast(lanes=16)(mod), mod)


def test_library_matches_onnxruntime(mobile_onnx, tmp_path):
    report = tvm_compress.compile(mobile_onnx, tmp_path / "m.so", input_shapes={"x": (1, 3, 20, 20)},
                                  tune_trials=0, bench_runs=1)
    assert report["verified"], report.get("verify_status")
    layout = report["conv_layout"]
    assert (layout["layout"], layout["nhwc_convs"], layout["nchw_convs"]) == ("NHWC", 8, 1), layout
    lib = tvm.runtime.load_module(str(tmp_path / "m.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    prepared = tvm_compress.prepare_onnx(mobile_onnx, {"x": (1, 3, 20, 20)})
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((1, 3, 20, 20)).astype("float32")
        got = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]
        for g, r in zip(got, ort_run(prepared.reference, prepared.inputs, [x])):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_aarch64_library_matches_onnxruntime_under_qemu(mobile_onnx, tmp_path):
    from tvm_compress.targets import qemu

    ok, why = qemu.can_run("aarch64")
    if not ok:
        pytest.skip(why)
    assert channels_last_gain(_relax(mobile_onnx)["main"], 4) >= MIN_GAIN  # NEON: 4 lanes
    report = tvm_compress.compile(mobile_onnx, tmp_path / "m_a64.so", target="aarch64",
                                  input_shapes={"x": (1, 3, 20, 20)}, tune_trials=0, bench_runs=1)
    assert report["verified"] and "qemu" in report["verify_status"], report.get("verify_status")
