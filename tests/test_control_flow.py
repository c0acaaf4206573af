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
