"""Channels-last float convolutions (targets/channels_last.py): where the rewrite applies, what
layouts the graph keeps between layers, and that the libraries still compute the model."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_compress
from tvm_compress.relax_utils import is_constant
from tvm_compress.targets.channels_last import (MIN_GAIN, PIN_ATTR, ChannelsLast, _calls, channels_last_gain,
                                                conv_layout)
from tvm_compress.verify import ort_run

from conftest import assert_same_legalized

OP_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
OP_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _mobile_net():
    """Small maps (5x5) after stride-2 convs, a depthwise conv, a one-element learnable affine
    (multiply/add by shape-(1,) constants), an SE block (mean, 1x1 convs, hardsigmoid, mul), a
    concat, an upsampling resize, a 4-channel conv on a 20-wide map, and a
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
    # all nine NHWC, the 4-channel conv on the 20-wide map too
    assert layouts.count("NHWC") == 9, layouts
    for _, conv in convs:
        # between this conv and the convs feeding it: no transpose of an activation (the
        # model's input, converted once, is the only one)
        transposes = [c for c in _producer_path(conv.args[0], bindings)[1:]
                      if c.op.same_as(OP_PERMUTE) and not is_constant(c.args[0])]
        assert all(isinstance(t.args[0], relax.Var) and t.args[0] in list(func.params) for t in transposes), \
            [str(t) for t in transposes]
    # activation transposes: the input, and the output back to NCHW; the flatten reads NHWC (the
    # linear layer's rows reordered instead)
    act = [c for c in bindings.values() if isinstance(c, relax.Call) and c.op.same_as(OP_PERMUTE)]
    assert len(act) == 2, [str(c) for c in act]


def test_a_flatten_after_nhwc_reorders_the_dense_weight_instead_of_transposing():
    from tvm_compress.targets.channels_last import _FlattenIntoWeights

    w = np.random.default_rng(0).standard_normal((10, 4 * 3 * 2)).astype("float32")  # [out, C*H*W]

    def module(flatten_nhwc: bool):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 3, 2, 4), "float32"))  # NHWC, C = 4
        with bb.function("main", [x]):
            with bb.dataflow():
                if flatten_nhwc:
                    rows = np.arange(24).reshape(4, 3, 2).transpose(1, 2, 0).reshape(-1)
                    flat = bb.emit(relax.op.reshape(x, [1, 24]))
                    y = bb.emit(relax.op.matmul(flat, relax.const(np.ascontiguousarray(w.T[rows]))))
                else:
                    nchw = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
                    flat = bb.emit(relax.op.reshape(nchw, [1, 24]))
                    y = bb.emit(relax.op.matmul(flat, bb.emit(relax.op.permute_dims(relax.const(w), [1, 0]))))
                gv = bb.emit_output(y)
            bb.emit_func_output(gv)
        return bb.get()

    before, expected = module(False), module(True)
    after = relax.analysis.remove_all_unused(_FlattenIntoWeights(before).visit_expr(before["main"]))
    tvm.ir.assert_structural_equal(relax.transform.Normalize()(tvm.IRModule({"main": after}))["main"],
                                   expected["main"])
    # and the same numbers
    x = np.random.default_rng(1).standard_normal((1, 3, 2, 4)).astype("float32")
    got = relax.VirtualMachine(tvm.compile(tvm.IRModule({"main": after}), "llvm"), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, x.transpose(0, 3, 1, 2).reshape(1, -1) @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, moved", [((160, 160), True), ((10, 10), False)])
def test_a_transpose_after_an_upsampling_resize_moves_before_it(size, moved):
    """``permute_dims(resize2d(x_nhwc), [0, 3, 1, 2])`` -> ``resize2d(permute_dims(x_nhwc))``
    in NCHW where the resize enlarges the map (the transpose moves fewer elements, the resize
    writes the order the output is stored in); a shrinking resize keeps its order. Same numbers."""
    from tvm_compress.targets.channels_last import _TransposeBeforeUpsample

    def module(transpose_first: bool):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 20, 20, 5), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                if transpose_first:
                    y = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
                    y = bb.emit(relax.op.image.resize2d(y, size, layout="NCHW", rounding_method="floor"))
                else:
                    y = bb.emit(relax.op.image.resize2d(x, size, layout="NHWC", rounding_method="floor"))
                    y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
                gv = bb.emit_output(y)
            bb.emit_func_output(gv)
        return bb.get()

    before = module(False)
    after = relax.transform.Normalize()(tvm.IRModule(
        {"main": relax.analysis.remove_all_unused(_TransposeBeforeUpsample(before).visit_expr(before["main"]))}))
    tvm.ir.assert_structural_equal(after["main"], (module(True) if moved else before)["main"])
    x = np.random.default_rng(2).standard_normal((1, 20, 20, 5)).astype("float32")
    run = lambda m: relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](  # noqa: E731
        tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(run(after), run(before))


def test_a_squeeze_with_a_negative_axis_does_not_keep_the_model_nchw():
    """Relax's squeeze layout rule fails on negative axes (Silero VAD's decoder squeezes a
    1-D conv's output with axis=-1): the rewrite numbers the axis first, converts and computes
    the same values."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 1, 2), "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((64, 64, 1, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, strides=[1, 2], padding=[0, 1, 0, 1])))
            # (1, 64, 1, 1) -> (1, 64, 1) -> (1, 64)
            gv = bb.emit_output(relax.op.squeeze(bb.emit(relax.op.squeeze(y, axis=[-2])), axis=[-1]))
        bb.emit_func_output(gv)
    mod = bb.get()
    out = ChannelsLast(lanes=16)(mod)
    assert conv_layout(out)["layout"] == "NHWC", conv_layout(out)
    arg = np.random.default_rng(1).standard_normal((1, 64, 1, 2)).astype("float32")

    def run(m):
        return relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(arg)).numpy()

    want = run(mod)
    assert want.shape == (1, 64)
    np.testing.assert_allclose(run(out), want, rtol=1e-5, atol=1e-5)


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


def _generator_tail(out_channels: int):
    """Two 32-channel 3x3 convs on a 20x20 map, then a 7x7 conv onto ``out_channels`` and tanh
    (an image generator's last layers)."""
    rng = np.random.default_rng(3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 20, 20), "float32"))
    w1, w2 = (relax.const(rng.standard_normal((32, 32, 3, 3)).astype("float32") * 0.1) for _ in range(2))
    w3 = relax.const(rng.standard_normal((out_channels, 32, 7, 7)).astype("float32") * 0.05)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w1, padding=1)))
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(y, w2, padding=1)))
            gv = bb.emit_output(relax.op.tanh(relax.op.nn.conv2d(y, w3, padding=3)))
        bb.emit_func_output(gv)
    return bb.get()


@pytest.mark.parametrize("out_channels, last", [(3, "NCHW"), (16, "NHWC")])
def test_a_wide_kernel_onto_few_channels_stays_nchw_between_transposes(out_channels, last):
    """In NHWC a 7x7 conv onto 3 channels fills 3 of 16 lanes (CycleGAN's last conv: 30.8 ms,
    10.3 ms in NCHW plus 11.0 ms of transposes): it alone stays NCHW, its input transposed back;
    onto 16 channels it goes NHWC with the others. Same values either way."""
    mod = _generator_tail(out_channels)
    out = ChannelsLast(lanes=16)(mod)
    convs = _calls(out["main"], OP_CONV2D)
    assert [c.attrs.data_layout for c in convs] == ["NHWC", "NHWC", last]
    info = conv_layout(out)
    assert (info["nhwc_convs"], info["nchw_convs"]) == ((2, 1) if last == "NCHW" else (3, 0)), info
    if last == "NCHW":
        bindings = _bindings(out["main"])
        source = bindings[convs[-1].args[0]]
        assert source.op.same_as(OP_PERMUTE) and [int(a) for a in source.attrs.axes] == [0, 3, 1, 2]
    assert_same_legalized(mod, out, (1, 32, 20, 20), seed=4)


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


def test_a_kernel_on_the_input_side_stays_before_the_first_transpose():
    """A TIR kernel that runs before every conv (the importer's reflection pad ahead of an
    STFT conv) does not keep the convs NCHW: it runs on the input as imported, the transpose
    after it (Silero VAD's encoder convs: 0.86 -> 0.27 ms for the model)."""
    from tvm import topi

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 3), "float32"))  # rows of 5 outputs
    w = relax.const(np.random.default_rng(0).standard_normal((32, 8, 1, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(bb.call_te(topi.nn.mirror_pad, x, [0, 0, 0, 2], [0, 0, 0, 2], "REFLECT"))
            y = bb.emit(relax.op.nn.conv2d(p, w))
            gv = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(gv)
    mod = bb.get()
    assert channels_last_gain(mod["main"], 16) > 1.2
    after = ChannelsLast(lanes=16)(mod)
    (conv,) = _calls(after["main"], OP_CONV2D)
    assert conv.attrs.data_layout == "NHWC"
    x_np = np.random.default_rng(1).standard_normal((1, 8, 6, 3)).astype("float32")
    run = [relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x_np)).numpy()
           for m in (mod, after)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_library_matches_onnxruntime(mobile_onnx, tmp_path):
    report = tvm_compress.compile(mobile_onnx, tmp_path / "m.so", input_shapes={"x": (1, 3, 20, 20)},
                                  tune_trials=0, bench_runs=1)
    assert report["verified"], report.get("verify_status")
    layout = report["conv_layout"]
    # every conv NHWC, the 4-channel one on the 20-wide map too (kept NCHW between two
    # transposes, such convs cost more than they saved)
    assert (layout["layout"], layout["nhwc_convs"], layout["nchw_convs"]) == ("NHWC", 9, 0), layout
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


# ---- where the estimate is no guide, the flow times both layouts --------------------------------

def _wide_conv(channels: int = 8, width: int = 96, height: int = 4):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, height, width), "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((channels, channels, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
        bb.emit_func_output(gv)
    return bb.get()


def test_a_pinned_layout_overrides_the_estimate():
    mod = _wide_conv(channels=16, width=16)  # rows and channels fill the vectors alike: 1.0x
    assert channels_last_gain(mod["main"], 16) < MIN_GAIN
    assert conv_layout(ChannelsLast(lanes=16)(mod))["layout"] == "NCHW"
    nhwc = ChannelsLast(lanes=16)(mod.with_attr(PIN_ATTR, "NHWC"))
    assert conv_layout(nhwc)["layout"] == "NHWC" and conv_layout(nhwc)["reason"] == "pinned"
    assert [c.attrs.data_layout for c in _calls(nhwc["main"], tvm.ir.Op.get("relax.nn.conv2d"))] == ["NHWC"]
    wide = _wide_conv(channels=64, width=5, height=5)  # estimate well above MIN_GAIN: NHWC on its own
    assert channels_last_gain(wide["main"], 16) >= MIN_GAIN
    nchw = ChannelsLast(lanes=16)(wide.with_attr(PIN_ATTR, "NCHW"))
    assert conv_layout(nchw)["layout"] == "NCHW"
    tvm.ir.assert_structural_equal(nchw["main"], wide["main"])


def test_candidates_only_where_the_estimate_is_unclear_and_the_convs_large():
    from tvm_compress.targets import get_target
    from tvm_compress.targets.channels_last import CHANNELS_LAST, MIN_TIMED_MACS

    x86 = get_target("x86")
    big = _wide_conv(channels=32, width=96, height=48)  # 32 channels, 96-wide rows: 1.0x
    assert 0 < channels_last_gain(big["main"], 16) < MIN_GAIN
    assert 32 * 32 * 9 * 96 * 48 >= MIN_TIMED_MACS
    variants = CHANNELS_LAST.candidates(big, x86)
    assert [(k, str(v.attrs[PIN_ATTR])) for k, v in variants.items()] == [("NCHW", "NCHW"), ("NHWC", "NHWC")]
    assert CHANNELS_LAST.candidates(_wide_conv(), x86) == {}  # 0.3M MACs: the estimate decides
    assert CHANNELS_LAST.candidates(_wide_conv(channels=64, width=5, height=5), x86) == {}  # clear
    assert CHANNELS_LAST.candidates(big.with_attr(PIN_ATTR, "NCHW"), x86) == {}  # decided


@pytest.mark.parametrize("times,chosen", [([1.0, 2.0], "NCHW"), ([2.0, 1.0], "NHWC"),
                                          ([1.0, 0.95], "NCHW"), (None, "NCHW")])
def test_lower_times_the_candidates_and_lowers_the_faster(times, chosen, tmp_path, monkeypatch):
    """``Lower`` with an env: the hook's variants are timed (here by a stand-in clock); a variant
    replaces the estimate's (NCHW, listed first) only when 10 % faster; where nothing can be
    timed, the estimate decides. A second build of the same module reuses the timed choice."""
    from tvm_compress import pipeline
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.specs import InputSpec
    from tvm_compress.targets import get_target

    monkeypatch.setenv("TVM_COMPRESS_CACHE", str(tmp_path))
    asked = []

    def clock(mods, inputs):
        asked.append([str(m.attrs[PIN_ATTR]) for m in mods])
        assert [x.shape for x in inputs] == [(1, 32, 48, 96)]
        return times

    env = PassEnv(inputs=[InputSpec("x", (1, 32, 48, 96), "float32")], measure_defaults=clock)
    lowered = [pipeline.Lower(get_target("x86"), env)(_wide_conv(channels=32, width=96, height=48))
               for _ in range(2)]
    layout = conv_layout(lowered[1])
    assert layout["layout"] == chosen
    if times is None:
        assert asked == [["NCHW", "NHWC"]] * 2  # nothing cached: asked again
        assert pipeline.measured_choices(lowered[1]) == {} and "below" in layout["reason"]
        return
    assert asked == [["NCHW", "NHWC"]]  # the second build took the cached choice
    first, second = (pipeline.measured_choices(m)["channels_last"] for m in lowered)
    assert first == {"times_ms": {"NCHW": times[0], "NHWC": times[1]}, "chosen": chosen}
    assert second == {**first, "cached": True}
    assert layout["reason"].startswith("timed: NCHW ")
    # other kernel code (an upgrade): the choice is timed again
    monkeypatch.setattr(pipeline, "kernels_fingerprint", lambda: "other")
    pipeline.Lower(get_target("x86"), env)(_wide_conv(channels=32, width=96, height=48))
    assert asked == [["NCHW", "NHWC"]] * 2


@pytest.fixture(scope="module")
def unclear_onnx(tmp_path_factory):
    """A 32-channel conv on 96-wide maps: 1.0x by the estimate, 38M MACs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1, "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 48, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 48, 96])], [w])
    path = tmp_path_factory.mktemp("models") / "unclear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_compile_times_both_layouts_of_an_unclear_model(unclear_onnx, tmp_path):
    """End to end on x86: timed on this CPU; the library of the chosen layout verifies against
    onnxruntime."""
    logs = []
    rep = tvm_compress.compile(unclear_onnx, tmp_path / "c.so", target="x86", bench_runs=0, log=logs.append)
    assert rep["verified"] and rep["within_float_tolerance"]
    assert rep["conv_layout"]["reason"].startswith("timed: NCHW ")
    assert any(line.startswith("channels_last: NCHW ") and "NHWC" in line for line in logs)


@pytest.mark.slow
def test_an_emulated_target_keeps_the_estimate_without_timing(unclear_onnx, tmp_path):
    """aarch64 runs under qemu here: nothing is timed, nothing said about timing."""
    logs = []
    rep = tvm_compress.compile(unclear_onnx, tmp_path / "c.so", target="aarch64", bench_runs=0, log=logs.append)
    assert rep["verified"]
    assert "below" in rep["conv_layout"]["reason"]
    assert not [line for line in logs if line.startswith("channels_last")]
