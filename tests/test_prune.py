"""Channel pruning: dependency groups through residual adds, concatenation and depthwise convs,
the pruned library equal to the original with the same channels masked, recovery, composition
with quantize, ARM builds under qemu, and one-line errors for bad options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_compress
from tvm_compress import errors
from tvm_compress.pass_registry import PassEnv
from tvm_compress.passes import Prune, PruneConfig
from tvm_compress.specs import TargetFacts
from tvm_compress.targets import qemu
from tvm_compress.verify import ort_run

quiet = lambda m: None  # noqa: E731


def _env(lanes=4):
    return PassEnv(facts=TargetFacts(vector_lanes=lanes, sparse_block=(lanes, 1)), log=quiet)


@I.ir_module
class Residual:
    """conv a -> relu -> + conv b (residual: a and b are one group) -> depthwise -> concat with
    conv c -> conv d (consumer of both groups)."""

    @R.function
    def main(x: R.Tensor((1, 3, 6, 6), "float32"), wa: R.Tensor((8, 3, 3, 3), "float32"),
             wb: R.Tensor((8, 8, 1, 1), "float32"), wdw: R.Tensor((8, 1, 3, 3), "float32"),
             wc: R.Tensor((4, 3, 1, 1), "float32"), wd: R.Tensor((2, 12, 1, 1), "float32"),
             ba: R.Tensor((1, 8, 1, 1), "float32")) -> R.Tensor((1, 2, 6, 6), "float32"):
        with R.dataflow():
            a = R.nn.conv2d(x, wa, padding=[1, 1, 1, 1])
            a1 = R.nn.relu(R.add(a, ba))
            b = R.nn.conv2d(a1, wb)
            r = R.add(a1, b)
            dw = R.nn.conv2d(r, wdw, padding=[1, 1, 1, 1], groups=8)
            c = R.nn.conv2d(x, wc)
            cat = R.concat((dw, c), axis=1)
            gv = R.nn.conv2d(cat, wd)
            R.output(gv)
        return gv


@I.ir_module
class ResidualPruned:
    """The same with channels 1, 2, 5, 6 of the residual group removed (kept: 0, 3, 4, 7)."""

    @R.function
    def main(x: R.Tensor((1, 3, 6, 6), "float32"), wa: R.Tensor((4, 3, 3, 3), "float32"),
             wb: R.Tensor((4, 4, 1, 1), "float32"), wdw: R.Tensor((4, 1, 3, 3), "float32"),
             wc: R.Tensor((4, 3, 1, 1), "float32"), wd: R.Tensor((2, 8, 1, 1), "float32"),
             ba: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 2, 6, 6), "float32"):
        with R.dataflow():
            a = R.nn.conv2d(x, wa, padding=[1, 1, 1, 1])
            a1 = R.nn.relu(R.add(a, ba))
            b = R.nn.conv2d(a1, wb)
            r = R.add(a1, b)
            dw = R.nn.conv2d(r, wdw, padding=[1, 1, 1, 1], groups=4)
            c = R.nn.conv2d(x, wc)
            cat = R.concat((dw, c), axis=1)
            gv = R.nn.conv2d(cat, wd)
            R.output(gv)
        return gv


def _bind(mod, params):
    return relax.transform.BindParams("main", params)(mod)


def test_residual_concat_and_depthwise_prune_together():
    rng = np.random.default_rng(0)
    p = {k: rng.standard_normal(s).astype("float32") for k, s in
         dict(wa=(8, 3, 3, 3), wb=(8, 8, 1, 1), wdw=(8, 1, 3, 3), wc=(4, 3, 1, 1), wd=(2, 12, 1, 1),
              ba=(1, 8, 1, 1)).items()}
    # channels 1, 2, 5, 6 of both producers of the residual group are the weakest
    for ch in (1, 2, 5, 6):
        p["wa"][ch] *= 0.01
        p["wb"][ch] *= 0.01
    keep = np.array([0, 3, 4, 7])
    before = relax.transform.Normalize()(_bind(Residual, p))
    env = _env(lanes=4)
    after = Prune(PruneConfig(ratio=0.5), env)(before)
    expected = {"wa": p["wa"][keep], "wb": p["wb"][keep][:, keep], "wdw": p["wdw"][keep],
                "wc": p["wc"], "wd": p["wd"][:, np.concatenate([keep, np.arange(8, 12)])],
                "ba": p["ba"][:, keep]}
    tvm.ir.assert_structural_equal(after, relax.transform.Normalize()(_bind(ResidualPruned, expected)))
    groups = {tuple(g["layers"]): g for g in env.report["prune"]["groups"]}
    # conv c (4 channels) rounds to 4 lanes: kept whole; the output conv d is pinned
    assert [(g["channels"], g["kept"]) for g in groups.values()] == [(8, 4), (4, 4), (2, 2)]


@pytest.fixture(scope="module")
def branchy_model(tmp_path_factory):
    """A torch CNN with what groups must handle: BN (folded at import), residual add,
    depthwise conv, concatenation, flatten into a linear layer."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(16)
            self.res = torch.nn.Conv2d(16, 16, 1)
            self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.side = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.mix = torch.nn.Conv2d(24, 24, 1)
            self.fc = torch.nn.Linear(24 * 4 * 4, 10)

        def forward(self, x):
            y = torch.relu(self.bn(self.stem(x)))
            y = y + torch.relu(self.res(y))
            y = torch.nn.functional.max_pool2d(torch.relu(self.dw(y)), 2)
            y = torch.cat([y, torch.relu(self.side(x))], dim=1)
            y = torch.nn.functional.max_pool2d(torch.relu(self.mix(y)), 2)
            return self.fc(y.flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("prune") / "branchy.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 16, 16), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    calib = path.with_name("calib.npz")
    np.savez(calib, x=np.random.default_rng(1).uniform(-1, 1, (48, 3, 16, 16)).astype("float32"))
    return path, calib


def _masked(path, report, out, shapes=None):
    """The model as imported (shapes fixed, folded) with the input channels each layer lost
    zeroed in its weight."""
    model = tvm_compress.prepare_onnx(path, shapes).model
    inits = {t.name: t for t in model.graph.initializer}
    for row in report["layers"]:
        if "kept_inputs" not in row or row["in_channels"][0] == row["in_channels"][1]:
            continue
        node = next(n for n in model.graph.node if (n.name or n.output[0]) == row["name"])
        if node.op_type == "Conv" and int(next((a.i for a in node.attribute if a.name == "group"), 1)) > 1:
            continue  # depthwise: its consumers are masked
        w = numpy_helper.to_array(inits[node.input[1]]).copy()
        drop = np.setdiff1d(np.arange(row["in_channels"][0]), row["kept_inputs"])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b):  # B is [in, out]
            w[drop] = 0
        else:  # Conv [out, in, ...]; Gemm with transB: [out, in]
            w[:, drop] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    onnx.save(model, str(out))
    return out


def test_pruned_library_equals_original_with_channels_masked(branchy_model, tmp_path):
    path, _ = branchy_model
    # x86-avx2: 8 float lanes, so kept counts are multiples of 8 on any x86 machine
    rep = tvm_compress.compile(path, tmp_path / "p.so", target="x86-avx2", passes="prune",
                               pass_configs={"prune": {"ratio": 0.5}}, bench_runs=1, log=quiet)
    report = rep["pass_reports"]["prune"]
    assert rep["macs_after"] < 0.7 * rep["macs_before"]
    assert all(g["kept"] % 8 == 0 for g in report["groups"] if g["kept"] < g["channels"])
    assert any(g["kept"] < g["channels"] for g in report["groups"])
    masked = _masked(path, report, tmp_path / "masked.onnx")
    prepared = tvm_compress.prepare_onnx(path)
    for seed in range(3):
        x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 16, 16)).astype("float32")
        ours = tvm_compress.run(tmp_path / "p.so", {"x": x}).outputs[0]
        ref = ort_run(masked, prepared.inputs, [x])[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("target, arch", [("aarch64", "aarch64"), ("armv7", "armv7")])
def test_pruned_arm_builds_match_under_qemu(branchy_model, target, arch, tmp_path):
    ok, why = qemu.can_run(arch)
    if not ok:
        pytest.skip(why)
    path, _ = branchy_model
    rep = tvm_compress.compile(path, tmp_path / "p.so", target=target, passes="prune",
                               pass_configs={"prune": {"ratio": 0.5}}, bench_runs=1, log=quiet)
    assert rep["macs_after"] < 0.7 * rep["macs_before"]  # NEON: 4 lanes
    assert rep["verify_status"].startswith(f"ran qemu-{arch}") and rep["kernel_check"]["failed"] == {}
    masked = _masked(path, rep["pass_reports"]["prune"], tmp_path / "masked.onnx")
    x = np.random.default_rng(5).uniform(-1, 1, (1, 3, 16, 16)).astype("float32")
    ours = tvm_compress.run(tmp_path / "p.so", {"x": x}).outputs[0]
    ref = ort_run(masked, tvm_compress.prepare_onnx(path).inputs, [x])[0]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("method", ["bn", "lstsq"])
def test_recovery_lowers_the_output_error(branchy_model, method):
    path, calib = branchy_model
    env = _env(lanes=4)
    mod = tvm_compress.load_onnx(path)
    Prune(PruneConfig(ratio=0.5, recover=method, calib=str(calib), eval_samples=16), env)(mod)
    rec = env.report["prune"]["recovery"]
    assert rec["method"] == method and rec["layers"] and rec["eval_samples"] == 12
    assert rec["output_error_after"] < 0.8 * rec["output_error_before"], rec


def test_prune_then_quantize(branchy_model, tmp_path):
    path, calib = branchy_model
    rep = tvm_compress.compile(
        path, tmp_path / "pq.so", target="x86-avx2", passes="prune,quantize",
        pass_configs={"prune": {"ratio": 0.5}, "quantize": {"calib": str(calib)}}, bench_runs=1, log=quiet)
    quant = {l["name"]: l for l in rep["pass_reports"]["quantize"]["layers"]}
    assert all(l["status"] == "int8" for l in quant.values())
    mix = next(r for r in rep["layers"] if r["name"] == "/mix/Conv")
    assert mix["params_after"] < mix["params_before"] and mix["weight_bytes_after"] < mix["params_after"] * 2


@pytest.mark.parametrize("options, words", [
    ({"ratio": 1.0}, "--prune-ratio: ratio must be in [0, 1)"),
    ({"ratio": -0.1}, "--prune-ratio: ratio must be in [0, 1)"),
    ({"layers": (("/stem/Conv", 0.97),)}, "--prune-layer /stem/Conv 0.97 removes every channel of /stem/Conv"),
    ({"skip": ("nope",)}, "prune: no prunable layer named 'nope'"),
    ({"kind": "block", "block": (5, 1)}, "--prune-block 5x1 does not divide layer"),
    ({"recover": "lstsq"}, "prune needs calibration data"),
    ({"criterion": "l3"}, "--prune-criterion must be one of l1, l2, bn-scale"),
])
def test_bad_options_are_one_line_errors(branchy_model, options, words):
    path, _ = branchy_model
    with pytest.raises(errors.TvmCompressError) as err:
        Prune(PruneConfig(**options), _env(lanes=1))(tvm_compress.load_onnx(path))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_prune_flags(branchy_model, tmp_path, capsys):
    from tvm_compress.cli import main

    path, _ = branchy_model
    code = main(["compile", str(path), "-o", str(tmp_path / "p.so"), "--passes", "prune",
                 "--prune-ratio", "0.5", "--prune-layer", "/side/Conv=0.25", "--prune-skip", "/res/Conv",
                 "--report", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0
    import json

    groups = json.loads((tmp_path / "r.json").read_text())["pass_reports"]["prune"]["groups"]
    by_layer = {l: g for g in groups for l in g["layers"]}
    assert by_layer["/res/Conv"]["kept"] == by_layer["/res/Conv"]["channels"]  # skipped (with stem)
    assert by_layer["/side/Conv"].get("ratio") == 0.25
    code = main(["compile", str(path), "-o", str(tmp_path / "q.so"), "--passes", "prune",
                 "--prune-ratio", "1.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "ratio must be in [0, 1)" in err


def test_importer_clip_kernels_become_relax_ops():
    """call_tir(topi maximum/minimum) on a scalar computed from constants -> R.maximum /
    R.minimum (then channel groups pass through them); other kernels stay."""
    from tvm import topi

    from tvm_compress.passes import TeCallsToOps

    def module(clip_as_ops: bool, extra=None):
        x = relax.Var("x", relax.TensorType((1, 4, 2, 2), "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                if clip_as_ops:
                    y = bb.emit(relax.op.maximum(x, relax.const(0.0)))
                    z = bb.emit(relax.op.minimum(y, relax.const(6.0)))
                else:
                    lo = bb.emit(relax.op.where(relax.op.isnan(relax.const(0.0)), relax.const(-np.inf),
                                                relax.const(0.0)))
                    y = bb.emit_te(topi.maximum, x, lo)
                    z = bb.emit_te(topi.minimum, y, relax.const(6.0))
                out = bb.emit_output(extra(bb, z) if extra else z)
            bb.emit_func_output(out)
        return bb.get()

    # (rewrite_call folds the trivial rebinding of the output: compare canonical forms)
    canon = relax.transform.CanonicalizeBindings()
    tvm.ir.assert_structural_equal(canon(TeCallsToOps()(module(False))), canon(module(True)))
    # a TE kernel that is not one of those (relu) stays a call_tir
    relu = TeCallsToOps()(module(False, lambda bb, z: bb.emit_te(topi.nn.relu, z)))
    assert relu["main"].script().count("R.call_tir") == 1
