"""Models with control flow: If compiles, runs the branch its input selects and matches
onnxruntime on both branches; Loop (no converter in TVM's Relax importer) is named."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_compress
from tvm_compress import errors
from tvm_compress.cli import main as cli_main
from tvm_compress.targets import qemu


def make_if_model(path):
    """mean(x) > 0 selects conv3x3 + relu, else conv1x1 + sigmoid (the branches read x and
    weights from the outer graph)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    out_t = helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8, 8, 8])
    out_e = helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 8, 8, 8])
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["t0"], pads=[1, 1, 1, 1]),
                                helper.make_node("Relu", ["t0"], ["t_out"])], "then", [], [out_t])
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "w2"], ["e0"]),
                                helper.make_node("Sigmoid", ["e0"], ["e_out"])], "else", [], [out_e])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def make_torch_if_model(path):
    """The same kind of branch written in Python and exported from TorchScript."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x):
            if bool(x.mean() > 0):
                return torch.relu(self.a(x))
            return torch.sigmoid(self.b(x))

    torch.manual_seed(0)
    scripted = torch.jit.script(Net().eval())
    torch.onnx.export(scripted, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    assert "If" in {n.op_type for n in onnx.load(str(path)).graph.node}
    return path


@pytest.fixture(scope="module")
def if_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("if")
    return {"helper": make_if_model(d / "if.onnx"), "torch": make_torch_if_model(d / "tif.onnx")}


def _branch_inputs(tmp_path, shape):
    """Two input files: one with a positive mean (then-branch), one negative (else-branch)."""
    x = np.random.default_rng(3).random(shape).astype(np.float32)
    files = {}
    for name, sign in (("then", 1), ("else", -1)):
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], x=sign * x)
    return files


@pytest.mark.parametrize("kind, shape", [("helper", (1, 4, 8, 8)), ("torch", (1, 3, 8, 8))])
@pytest.mark.parametrize("target", ["x86", "aarch64"])
def test_if_model_matches_onnxruntime_on_both_branches(if_models, kind, shape, target, tmp_path):
    if target == "aarch64" and not qemu.can_run("aarch64")[0]:
        pytest.skip(qemu.can_run("aarch64")[1])
    inputs = _branch_inputs(tmp_path, shape)
    outs = {}
    for branch, path in inputs.items():
        rep = tvm_compress.compile(if_models[kind], tmp_path / f"{branch}.so", target=target,
                                   verify_input=path, bench_runs=1, log=lambda m: None)
        assert rep["verified"] and rep["within_float_tolerance"] and rep["max_rel_err"] < 1e-4, branch
        if target == "x86":
            outs[branch] = tvm_compress.run(tmp_path / f"{branch}.so", path).outputs[0]
    if outs:
        # relu's zeros against sigmoid's (0, 1): the two runs took different branches
        assert (outs["then"] == 0).any() and not (outs["else"] == 0).any()


def test_if_model_compresses(if_models, tmp_path):
    """Passes see the dataflow blocks around the If: the branch convolutions become int8."""
    rep = tvm_compress.compile(if_models["helper"], tmp_path / "q.so", passes="quantize",
                               pass_configs={"quantize": {"calib": "random"}}, bench_runs=1,
                               log=lambda m: None)
    layers = rep["pass_reports"]["quantize"]["layers"]
    assert rep["verified"] and len(layers) == 2 and all(l["realized"] for l in layers)


def make_loop_model(path):
    """A counted Loop adding 1 to its carried value three times."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "one")],
    )
    nodes = [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body, name="counter")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_loop_is_named_with_the_reason(tmp_path, capsys):
    path = make_loop_model(tmp_path / "loop.onnx")
    with pytest.raises(errors.UnsupportedOpError,
                       match=r"unsupported ONNX ops: Loop \(e.g. node 'counter'\); TVM [\d.]+\S*'s "
                             r"Relax ONNX importer has no converter for them"):
        tvm_compress.prepare_onnx(path)
    assert cli_main(["compile", str(path), "-o", str(tmp_path / "l.so")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Loop" in err[0]
    assert not (tmp_path / "l.so").exists()


# ---- inputs fixed to values, and the If nodes they decide (onnx_control) --------------------

def make_rate_model(path):
    """Silero VAD's shape: ``If(rate == 16000)`` picks one of two networks, each computing its
    conv weight inside the branch (``Mul`` of a constant) and holding an ``If`` of its own on a
    static shape (``x.shape[0] == 1``, as TorchScript exports write it)."""
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT

    def branch(tag, k, act):
        inner_then = helper.make_graph([helper.make_node(act, [f"{tag}_c"], [f"{tag}_y1"])], f"{tag}_one", [],
                                       [helper.make_tensor_value_info(f"{tag}_y1", f32, None)])
        inner_else = helper.make_graph([helper.make_node("Neg", [f"{tag}_c"], [f"{tag}_y2"])], f"{tag}_many", [],
                                       [helper.make_tensor_value_info(f"{tag}_y2", f32, None)])
        nodes = [helper.make_node("Mul", [f"{tag}_w0", f"{tag}_two"], [f"{tag}_w"]),
                 helper.make_node("Conv", ["x", f"{tag}_w"], [f"{tag}_c"], pads=[k // 2] * 4),
                 helper.make_node("Shape", ["x"], [f"{tag}_s"]),
                 helper.make_node("Gather", [f"{tag}_s", f"{tag}_zero"], [f"{tag}_n"]),
                 helper.make_node("Equal", [f"{tag}_n", f"{tag}_one"], [f"{tag}_single"]),
                 helper.make_node("If", [f"{tag}_single"], [f"{tag}_out"], then_branch=inner_then,
                                  else_branch=inner_else, name=f"{tag}_batch")]
        inits = [numpy_helper.from_array(rng.standard_normal((8, 4, k, k)).astype(np.float32), f"{tag}_w0"),
                 numpy_helper.from_array(np.array(2.0, np.float32), f"{tag}_two"),
                 numpy_helper.from_array(np.array(0, np.int64), f"{tag}_zero"),
                 numpy_helper.from_array(np.array(1, np.int64), f"{tag}_one")]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", f32, None)], inits)

    x = helper.make_tensor_value_info("x", f32, [1, 4, 8, 8])
    rate = helper.make_tensor_value_info("rate", TensorProto.INT64, [])
    nodes = [helper.make_node("Equal", ["rate", "r16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=branch("wide", 3, "Relu"),
                              else_branch=branch("narrow", 1, "Sigmoid"), name="by_rate")]
    graph = helper.make_graph(nodes, "g", [x, rate], [helper.make_tensor_value_info("y", f32, [1, 8, 8, 8])],
                              [numpy_helper.from_array(np.array(16000, np.int64), "r16k")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def rate_model(tmp_path_factory):
    return make_rate_model(tmp_path_factory.mktemp("rate") / "rate.onnx")


@pytest.mark.parametrize("rate, act", [(16000, "relu"), (8000, "sigmoid")])
def test_a_fixed_input_takes_its_branches_and_matches_onnxruntime(rate_model, rate, act, tmp_path):
    from tvm_compress.onnx_rnn import all_nodes

    prepared = tvm_compress.prepare_onnx(rate_model, input_values={"rate": [rate]})
    assert [s.name for s in prepared.inputs] == ["x"]
    assert not [n for n in all_nodes(prepared.model.graph) if n.op_type == "If"]
    assert any("rate=%d fixed" % rate in n for n in prepared.notes)
    rep = tvm_compress.compile(rate_model, tmp_path / "r.so", input_values={"rate": [rate]}, bench_runs=1,
                               log=lambda m: None)
    # the reference: onnxruntime on the file as given, fed rate
    assert rep["verified"] and rep["within_float_tolerance"] and rep["max_rel_err"] < 1e-5
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    out = tvm_compress.run(tmp_path / "r.so", {"x": x}).outputs[0]
    assert out.shape == (1, 8, 8, 8) and out.min() >= 0
    # relu: zeros and values above 1; sigmoid: within [0, 1]
    assert ((out == 0).any() and out.max() > 1) if act == "relu" else out.max() <= 1
    data = __import__("json").loads((tmp_path / "r.json").read_text())
    assert data["build_options"]["input_values"] == {"rate": rate}


def test_an_if_on_data_or_on_an_outer_name_is_left_to_the_importer(tmp_path):
    from tvm_compress.onnx_control import inline_constant_ifs

    on_data = onnx.load(str(make_if_model(tmp_path / "if.onnx")))
    assert inline_constant_ifs(on_data) == 0
    # a branch defining a name the outer graph defines too: inlining would clash
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["t"]),
             helper.make_node("If", ["yes"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["t", "y"], ["z"])]
    clash = helper.make_model(helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(True), "yes")]), opset_imports=[helper.make_opsetid("", 17)])
    assert inline_constant_ifs(clash) == 0
    else_taken = helper.make_model(helper.make_graph(
        nodes[1:2], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(False), "yes")]), opset_imports=[helper.make_opsetid("", 17)])
    assert inline_constant_ifs(else_taken) == 1
    assert [n.op_type for n in else_taken.graph.node] == ["Abs", "Identity"]


@pytest.mark.parametrize("value, message", [
    ("nope=1", "--input-value names 'nope', but the model's inputs are: x, rate"),
    ("rate=1.5", "--input-value rate: the input is int64, got 1.5"),
    ("rate=1,2", "--input-value rate: 2 values for shape [] (1 values, or one for all)"),
    ("rate", "bad --input-value 'rate': expected NAME=V or NAME=V0,V1,... e.g. sr=16000"),
    ("rate=abc", "bad --input-value 'rate=abc'"),
])
def test_a_bad_input_value_is_one_line(rate_model, value, message, tmp_path, capsys):
    out = tmp_path / "r.so"
    assert cli_main(["compile", str(rate_model), "--input-value", value, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_inspect_with_a_fixed_input(rate_model, capsys):
    assert cli_main(["inspect", str(rate_model), "--input-value", "rate=8000"]) == 0
    text = capsys.readouterr().out
    assert "note: input rate=8000 fixed: not inputs of the compiled model" in text
    assert "input  x: [1, 4, 8, 8] float32" in text and "input  rate" not in text
    assert "narrow_batch" not in text and "Conv" in text


def test_bench_feeds_the_fixed_input_to_onnxruntime(rate_model, tmp_path):
    """The fp32 baseline runs the file as given, so it is fed the fixed value; the int8 baseline
    is built from the prepared model, which holds it."""
    from tvm_compress import bench

    report = bench.run_bench(rate_model, tmp_path / "out", targets=["x86-avx2"], pass_sets="none,quantize",
                             calib="random", input_values={"rate": [8000]}, rounds=1, plots=False,
                             log=lambda m: None)
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"]
    assert report["inputs"] == {"x": [1, 4, 8, 8]}
    for name, base in report["baselines"].items():
        assert base["path"] and "error" not in (base["timing"] or {"error": "none"}), (name, base)


def test_a_scalar_input_left_as_an_input_calibrates_and_benches(rate_model, tmp_path):
    """Not fixed, the rate stays a 0-d input: calibration feeds it one value per call and the
    bench's engines pass it as 0-d (both had made it (1,))."""
    from tvm_compress import bench

    rep = tvm_compress.compile(rate_model, tmp_path / "q.so", passes="quantize",
                               pass_configs={"quantize": {"calib": "random"}}, bench_runs=1, log=lambda m: None)
    assert rep["verified"] and any(l["realized"] for l in rep["pass_reports"]["quantize"]["layers"])
    report = bench.run_bench(rate_model, tmp_path / "out", targets=["x86-avx2"], pass_sets="none", rounds=1,
                             plots=False, log=lambda m: None)
    assert report["inputs"] == {"x": [1, 4, 8, 8], "rate": []}
    assert "median" in report["rows"][0]["timing"], report["rows"][0]["timing"]


def test_an_input_deciding_ifs_at_run_time_is_named_in_a_note(rate_model, if_models):
    prepared = tvm_compress.prepare_onnx(rate_model)
    assert "input 'rate' decides 1 If node at run time: --input-value rate=V fixes it" in " ".join(prepared.notes)
    # decided by the data (the mean of a 1x4x8x8 input): no such note
    assert not any("decides" in n for n in tvm_compress.prepare_onnx(if_models["helper"]).notes)


def _padded_branch_model(path):
    """``If(flag == 1)``: a conv on the small map in each branch, the else-branch's on the input
    padded by reflection (a TIR kernel after import), as in Silero VAD's branches. TVM's importer
    computes both branches before the ``If`` (which then picks one's outputs), so that TIR kernel
    comes after the then-branch's conv without reading it."""
    rng = np.random.default_rng(2)
    f32 = TensorProto.FLOAT

    def branch(tag, act):
        if tag == "a":
            nodes = [helper.make_node("Conv", ["x", f"{tag}_w"], [f"{tag}_c"], pads=[1, 1, 1, 1])]
        else:
            nodes = [helper.make_node("Pad", ["x", "pads"], [f"{tag}_p"], mode="reflect"),
                     helper.make_node("Conv", [f"{tag}_p", f"{tag}_w"], [f"{tag}_c"])]
        nodes.append(helper.make_node(act, [f"{tag}_c"], [f"{tag}_y"]))
        inits = [numpy_helper.from_array(rng.standard_normal((64, 32, 3, 3)).astype(np.float32), f"{tag}_w")]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", f32, [1, 64, 4, 3])],
                                 inits)

    graph = helper.make_graph(
        [helper.make_node("Equal", ["flag", "one"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch("a", "Relu"), else_branch=branch("b", "Sigmoid"))],
        "g", [helper.make_tensor_value_info("x", f32, [1, 32, 4, 3]),
              helper.make_tensor_value_info("flag", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", f32, [1, 64, 4, 3])],
        [numpy_helper.from_array(np.array(1, np.int64), "one"),
         numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("flag", [1, 0])
def test_convs_inside_if_branches_go_channels_last(flag, tmp_path):
    """A TIR kernel that reads no conv's output does not rule the rewrite out, wherever it comes
    (it had refused the whole module), and both branches still compute the model."""
    path = _padded_branch_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(3).standard_normal((1, 32, 4, 3)).astype(np.float32),
             flag=np.array(flag, np.int64))
    rep = tvm_compress.compile(path, tmp_path / "m.so", target="x86-avx2", verify_input=tmp_path / "in.npz",
                               bench_runs=1, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5
    assert rep["conv_layout"]["layout"] == "NHWC" and rep["conv_layout"]["nhwc_convs"] == 2, rep["conv_layout"]
