"""Unwritten outputs cannot pass: fused kernels whose output is larger (or smaller) than their
compute, scheduled by our default and int8 schedules, run with NaN/sentinel-filled outputs on
x86 and under qemu; and the kernel check catches a schedule that leaves elements unwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import s_tir

import tvm_compress
from tvm_compress import errors, kernel_check, pipeline
from tvm_compress.targets import get_family, get_target, load_target_files, qemu
from tvm_compress.targets.base import KernelHook, register_kernel_hook, unregister_kernel_hook
from tvm_compress.targets.cpu_schedule import reads_within


def make_head_tail(path: Path, head: str, tail: str, channels: int = 12, size: int = 16) -> Path:
    """``head`` (conv3x3 + bias + relu, or the element-wise sigmoid(x) * 2 + x), then ``tail``:
    a pad (bottom/right as before a stride-2 conv of a PaddleOCR detector, or on all sides), a
    concat with the input, a nearest 2x resize, or a strided slice. FuseOps puts a pad after a
    convolution into its kernel, and every tail after the element-wise head into its kernel."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, size, size])
    inits = [numpy_helper.from_array(rng.standard_normal((channels, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    if head == "conv":
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                 helper.make_node("Relu", ["c"], ["r"], name="relu")]
    else:
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
                 helper.make_node("Mul", ["s", "two"], ["m"], name="mul"),
                 helper.make_node("Add", ["m", "x"], ["r"], name="add")]
    const = lambda name, v, dt=np.int64: inits.append(numpy_helper.from_array(np.array(v, dt), name))  # noqa: E731
    if tail == "pad_end":
        const("pads", [0, 0, 0, 0, 0, 0, 1, 1])
        nodes.append(helper.make_node("Pad", ["r", "pads"], ["y"], name="pad"))
    elif tail == "pad_both":
        const("pads", [0, 0, 1, 2, 0, 0, 2, 1])
        nodes.append(helper.make_node("Pad", ["r", "pads"], ["y"], name="pad"))
    elif tail == "concat":
        nodes.append(helper.make_node("Concat", ["r", "x"], ["y"], axis=1, name="cat"))
    elif tail == "resize":
        const("scales", [1, 1, 2, 2], np.float32)
        nodes.append(helper.make_node("Resize", ["r", "", "scales"], ["y"], mode="nearest", name="up"))
    elif tail == "slice":
        for name, v in [("st", [1, 1]), ("en", [size, size]), ("ax", [2, 3]), ("sp", [2, 2])]:
            const(name, v)
        nodes.append(helper.make_node("Slice", ["r", "st", "en", "ax", "sp"], ["y"], name="slice"))
    else:
        raise ValueError(tail)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)  # fills in the output's shape
    onnx.save(model, str(path))
    return path


TAILS = ["pad_end", "pad_both", "concat", "resize", "slice"]
# (head, tail) -> the op names of the kernel that must hold both
FUSED = {
    ("conv", "pad_end"): ("conv2d", "pad"),
    **{("ew", t): ("sigmoid", op) for t, op in [("pad_end", "pad"), ("pad_both", "pad"),
                                                 ("concat", "concatenate"), ("resize", "resize2d"),
                                                 ("slice", "strided_slice")]},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tails")
    return {(h, t): make_head_tail(d / f"{h}_{t}.onnx", h, t) for h in ("conv", "ew") for t in TAILS}


@pytest.fixture(scope="module")
def tail_models(models):
    return {t: models[("conv", t)] for t in TAILS}


def _need_arch(arch):
    ok, why = qemu.can_run(arch)
    if not ok:
        pytest.skip(why)


def _lowered(model: Path, target: str):
    profile = get_target(target)
    with profile.tvm_target():
        mod = tvm_compress.prepare_onnx(model).to_relax()
        return tvm.transform.Sequential(pipeline.lowering_passes(profile))(mod), profile


def _fused_kernel(mod, op_name="conv2d"):
    (name,) = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and op_name in gv.name_hint]
    return name


@pytest.mark.parametrize("head", ["conv", "ew"])
@pytest.mark.parametrize("tail", TAILS)
def test_fused_tail_kernels_write_every_element_on_x86(models, head, tail, tmp_path):
    """Fails on the schedule that moved a fused pad under the convolution's tile loop."""
    rep = tvm_compress.compile(models[(head, tail)], tmp_path / "m.so", bench_runs=1, log=lambda m: None)
    check = rep["kernel_check"]
    assert check["failed"] == {} and check["checked"] >= 1 and check["not_reached"] == []
    if (head, tail) in FUSED:
        ops = FUSED[(head, tail)]
        assert any(all(op in k for op in ops) for k in check["kernels"]), check["kernels"]
    assert rep["verified"] and rep["max_rel_err"] < 1e-4


@pytest.mark.parametrize("target", ["x86-avx2", "rpi5"])
def test_int8_conv_with_fused_pad_writes_every_element(tail_models, target, tmp_path):
    if target == "rpi5":
        _need_arch("aarch64")
    rep = tvm_compress.compile(
        tail_models["pad_end"], tmp_path / "m.so", target=target, passes="quantize",
        pass_configs={"quantize": {"calib": "random"}}, bench_runs=1, log=lambda m: None,
    )
    check = rep["kernel_check"]
    assert check["failed"] == {} and any("int8_conv" in k or "conv2d" in k for k in check["kernels"])


@pytest.mark.parametrize("target, arch", [("aarch64", "aarch64"), ("armv7", "armv7")])
def test_fused_pad_kernel_under_qemu(tail_models, target, arch, tmp_path):
    _need_arch(arch)
    rep = tvm_compress.compile(tail_models["pad_end"], tmp_path / "m.so", target=target,
                               bench_runs=1, log=lambda m: None)
    check = rep["kernel_check"]
    assert check["where"] == target and check["failed"] == {} and check["checked"] >= 1
    assert rep["verified"] and rep["verify_status"].startswith(f"ran qemu-{arch}")


def _old_schedule(func):
    """What the default schedule did before: the fused pad moved under the conv's row loop."""
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv2d_nchw")
    pad = sch.get_sblock("PadInput")
    for b in [sch.get_sblock("T_add"), sch.get_sblock("compute")]:
        sch.compute_inline(b)
    sch.reverse_compute_at(pad, sch.get_loops(conv)[2])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@pytest.mark.parametrize("target", ["x86", "aarch64", "armv7"])
def test_check_names_kernel_with_unwritten_elements(tail_models, target, tmp_path):
    """The check itself: a kernel that writes 16x16 of its 17x17 output is caught, on x86 and
    under qemu, on every run, whatever memory held before."""
    family = get_family(get_target(target).family)
    ok, why = family.can_run(get_target(target))
    if not ok:
        pytest.skip(why)
    lowered, profile = _lowered(tail_models["pad_end"], target)
    name = _fused_kernel(lowered)
    broken = tvm.IRModule(dict(lowered.functions.items()))
    broken[name] = _old_schedule(lowered[name])
    calls = kernel_check.plan(lowered, broken)
    assert [c.name for c in calls] == [name]
    with profile.tvm_target():
        exe = tvm.compile(kernel_check.with_check_function(broken, calls), profile.tvm_target())
    lib = tmp_path / "k.so"
    family.export(exe, lib, profile)
    x = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    res = kernel_check.check(
        lowered, calls, [x],
        lambda args: family.run(profile, lib, args, function=kernel_check.CHECK_FUNCTION).outputs,
    )
    assert list(res.failed) == [name]
    # the border row and column of 12 channels: 12 * (17 * 17 - 16 * 16)
    assert res.failed[name].startswith("396 of 3468 output elements never written")


class _BrokenPadSchedule(KernelHook):
    """A kernel hook that schedules the fused conv + pad kernel the way the old default
    schedule did (marked scheduled, so nothing schedules it again)."""

    name = "broken_pad"
    feature = "broken_pad_schedule"

    def schedules(self, profile):
        @tvm.transform.module_pass(opt_level=0, name="BrokenPadSchedule")
        def apply(mod, _ctx):
            name = _fused_kernel(mod)
            mod = tvm.IRModule(dict(mod.functions.items()))
            mod[name] = _old_schedule(mod[name])
            return mod

        return [apply]


def test_compile_refuses_kernel_with_unwritten_elements(tail_models, tmp_path):
    """End to end: with that schedule, compile names the kernel and writes no library."""
    (tmp_path / "t.toml").write_text(
        '[x86-broken-pad]\nfamily = "x86"\ntarget = { kind = "llvm", mcpu = "auto" }\n'
        "features = { broken_pad_schedule = true }\n")
    load_target_files([tmp_path / "t.toml"])
    hook = register_kernel_hook("x86", _BrokenPadSchedule())
    out = tmp_path / "m.so"
    try:
        with pytest.raises(errors.VerificationError, match=r"kernel fused_conv2d\w*pad: 396 of 3468 output "
                           r"elements never written.*no library written"):
            tvm_compress.compile(tail_models["pad_end"], out, target="x86-broken-pad", bench_runs=1,
                                 log=lambda m: None)
    finally:
        unregister_kernel_hook("x86", hook)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_reads_within_tells_pad_and_concat_from_elementwise_tails(models):
    expected = {"pad_end": False, "pad_both": False, "concat": False, "resize": True, "slice": True}
    for tail, covered in expected.items():
        lowered, _ = _lowered(models[("ew", tail)], "x86")
        sch = s_tir.Schedule(lowered[_fused_kernel(lowered, "sigmoid")])
        sig = sch.get_sblock("compute")
        (mul,) = sch.get_consumers(sig)
        assert reads_within(sch, mul, sig)  # element-wise: reads every element it writes
        (add,) = sch.get_consumers(mul)
        (last,) = sch.get_consumers(add)
        assert reads_within(sch, last, add) is covered, tail


def test_compare_output_finds_unwritten_and_wrong_elements():
    ref = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    fills = kernel_check.fill_values(np.float32)
    good = [ref.copy(), ref.copy()]
    assert kernel_check.compare_output(good, fills, ref) is None
    runs = [ref.copy(), ref.copy()]
    runs[0][1, 2], runs[1][1, 2] = fills[0], fills[1]
    assert kernel_check.compare_output(runs, fills, ref).startswith("1 of 6 output elements never written (first at [1, 2])")
    runs = [ref.copy(), ref.copy()]
    runs[1][0, 0] += 1.0
    assert "differ" in kernel_check.compare_output(runs, fills, ref)
    # A reference NaN written as NaN is fine; the same element left unwritten is not.
    ref_nan = ref.copy()
    ref_nan[0, 1] = np.nan
    assert kernel_check.compare_output([ref_nan.copy(), ref_nan.copy()], fills, ref_nan) is None
    runs = [ref_nan.copy(), ref_nan.copy()]
    runs[1][0, 1] = fills[1]
    assert "never written" in kernel_check.compare_output(runs, fills, ref_nan)


def test_a_dequantized_output_may_be_one_step_off_like_an_integer_one():
    """A float kernel ending in quantize -> dequantize (a layer kept float between int8 ones):
    a contracted multiply-add can move a value across a rounding tie, one quantization step."""
    rng = np.random.default_rng(0)
    scale = np.float32(0.558)
    ref = ((rng.integers(0, 256, (4, 64)) - 3) * scale).astype(np.float32)
    fills = kernel_check.fill_values(np.float32)
    assert kernel_check.grid_step(ref) == pytest.approx(scale, rel=1e-5)
    one, two = ref.copy(), ref.copy()
    one[1, 5] += scale
    two[1, 5] += 2 * scale
    assert kernel_check.compare_output([one, one.copy()], fills, ref) is None
    assert "1 of 256 output elements differ" in kernel_check.compare_output([two, two.copy()], fills, ref)
    # An output off the grid gets no such allowance: the same error is caught.
    plain = rng.standard_normal((4, 64)).astype(np.float32)
    assert kernel_check.grid_step(plain) == 0.0
    bad = plain.copy()
    bad[1, 5] += scale
    assert "differ" in kernel_check.compare_output([bad, bad.copy()], fills, plain)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "bool"])
def test_integer_fills_differ_between_runs(dtype):
    a, b = kernel_check.fill_values(np.dtype(dtype))
    assert a.dtype == np.dtype(dtype) and a != b
    ref = np.zeros(4, dtype)
    runs = [np.full(4, a), np.full(4, b)]
    runs[0][:2] = runs[1][:2] = ref[:2]
    assert kernel_check.compare_output(runs, (a, b), ref).startswith("2 of 4 output elements never written")


def test_no_check_kernels_leaves_the_library_without_check_function(tail_models, tmp_path):
    import json

    rep = tvm_compress.compile(tail_models["slice"], tmp_path / "m.so", check_kernels=False,
                               bench_runs=1, log=lambda m: None)
    assert rep["kernel_check"] is None
    assert "check_function" not in json.loads((tmp_path / "m.json").read_text())
    rep = tvm_compress.compile(tail_models["slice"], tmp_path / "c.so", bench_runs=1, log=lambda m: None)
    assert json.loads((tmp_path / "c.json").read_text())["check_function"] == kernel_check.CHECK_FUNCTION
