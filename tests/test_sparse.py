"""Block-sparse weights: BSR storage, the generated kernels against numpy, the per-layer
sparse-or-dense decision, the pruned library against onnxruntime on the same zeroed weights
(x86 and ARM under qemu), and composition with quantize."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
import tvm
from onnx import numpy_helper

import tvm_compress
from tvm_compress import errors
from tvm_compress.pass_registry import PassEnv
from tvm_compress.passes import Prune, PruneConfig
from tvm_compress.passes.prune import zero_blocks
from tvm_compress.specs import TargetFacts, sparse_layers
from tvm_compress.targets import qemu
from tvm_compress.targets import sparse_kernels as sk
from tvm_compress.verify import ort_run

quiet = lambda m: None  # noqa: E731


def test_bsr_round_trip_and_storage():
    rng = np.random.default_rng(0)
    w = sk.prune_blocks(rng.standard_normal((32, 24)).astype("float32"), (8, 1), 0.75)
    bsr = sk.bsr_from_dense(w, (8, 1))
    np.testing.assert_array_equal(bsr.to_dense(), w)
    assert bsr.nnz_blocks == 24 and abs(bsr.density - 0.25) < 1e-9  # 96 blocks, 72 zeroed
    assert bsr.nbytes == 24 * 8 * 4 + 24 * 4 + 5 * 4 < w.nbytes
    conv = sk.bsr_from_dense(w.reshape(32, 24, 1, 1), (4, 2))  # 1x1 conv weights squeeze
    np.testing.assert_array_equal(conv.to_dense(), w)
    with pytest.raises(ValueError, match="does not divide"):
        sk.bsr_from_dense(w, (5, 1))


def _build(kind, bsr, x_shape, epilogue=None, **isa):
    func = sk.sparse_prim_func(kind, bsr, x_shape, epilogue=epilogue, **isa)
    return tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target("llvm"))


def _call(lib, *arrays, out_shape):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.parametrize("lanes, chunks", [(8, 2), (4, 3)])
def test_sparse_conv_equals_dense_at_zero_sparsity(lanes, chunks):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 12)).astype("float32")
    x = rng.standard_normal((2, 12, 5, 7)).astype("float32")  # 35 pixels: a shifted last tile
    bias = rng.standard_normal(16).astype("float32")
    bsr = sk.bsr_from_dense(w, (lanes, 1))
    assert bsr.density == 1.0
    lib = _build("conv1x1", bsr, x.shape, "bias_relu", lanes=lanes, registers=16, chunks=chunks)
    got = _call(lib, x, bsr.data, bias, out_shape=(2, 16, 5, 7))
    want = np.maximum(np.einsum("oi,nihw->nohw", w, x) + bias[None, :, None, None], 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [(4, 1), (2, 2)])
def test_sparse_dense_exact_on_a_known_pattern(block):
    """Small integers: every product and sum is exact in float32, so the kernel must match
    numpy bit for bit; the pattern has empty block rows and a full one."""
    r, c = block
    w = np.zeros((12, 8), "float32")
    w[0:r, 2 * c:3 * c] = np.arange(1, r * c + 1).reshape(r, c)  # block row 0: one block
    w[8:12, :] = np.arange(32).reshape(4, 8) - 16  # last rows: every block kept
    x = np.random.default_rng(2).integers(-3, 4, (3, 8)).astype("float32")
    bsr = sk.bsr_from_dense(w, block)
    lib = _build("dense", bsr, x.shape, lanes=4, registers=16, chunks=2)
    np.testing.assert_array_equal(_call(lib, x, bsr.data, out_shape=(3, 12)), x @ w.T)


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    """1x1 convs (one strided: stays dense), a 3x3 conv, two linear layers."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.pw1 = torch.nn.Conv2d(16, 32, 1)
            self.pw2 = torch.nn.Conv2d(32, 32, 1)
            self.down = torch.nn.Conv2d(32, 32, 1, stride=2)
            self.fc1 = torch.nn.Linear(32, 64)
            self.fc2 = torch.nn.Linear(64, 8)

        def forward(self, x):
            y = torch.relu(self.pw1(torch.relu(self.stem(x))))
            y = torch.relu(self.down(torch.relu(self.pw2(y))))
            return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sparse") / "pw.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 12, 12), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    return path


def _zeroed(path, report, out):
    """The model with each block-pruned layer's weight zeroed the way the pass did it."""
    model = tvm_compress.prepare_onnx(path).model
    inits = {t.name: t for t in model.graph.initializer}
    block, ratio = tuple(report["block"]), report["ratio"]
    for row in report["layers"]:
        if "sparsity" not in row:
            continue
        node = next(n for n in model.graph.node if (n.name or n.output[0]) == row["name"])
        w = numpy_helper.to_array(inits[node.input[1]])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        w2 = w.reshape(w.shape[:2]) if node.op_type == "Conv" else (w if trans_b else w.T)
        z, _ = zero_blocks(w2, block, ratio)
        new = z.reshape(w.shape) if node.op_type == "Conv" else (z if trans_b else z.T)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), node.input[1]))
    onnx.save(model, str(out))
    return out


def _check_against_zeroed(path, lib, rep, tmp_path, seeds=(0, 1)):
    report = rep["pass_reports"]["prune"]
    zeroed = _zeroed(path, dict(report, ratio=0.75), tmp_path / "zeroed.onnx")
    inputs = tvm_compress.prepare_onnx(path).inputs
    for seed in seeds:
        x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 12, 12)).astype("float32")
        ours = tvm_compress.run(lib, {"x": x}).outputs[0]
        ref = ort_run(zeroed, inputs, [x])[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_block_sparse_library_equals_the_zeroed_model(sparse_model, tmp_path):
    rep = tvm_compress.compile(
        sparse_model, tmp_path / "s.so", target="x86-avx2", passes="prune",
        pass_configs={"prune": {"kind": "block", "ratio": 0.75, "min_speedup": 0}}, bench_runs=1, log=quiet)
    report = rep["pass_reports"]["prune"]
    rows = {r["name"]: r for r in report["layers"]}
    assert report["block"] == [8, 1]  # AVX2: one vector of output rows
    assert set(rows) == {"/pw1/Conv", "/pw2/Conv", "/fc1/Gemm", "/fc2/Gemm"}  # strided 1x1: no
    assert all(r["kernel"] == "sparse" and r["sparsity"] == 0.75 for r in rows.values())
    assert rows["/pw2/Conv"]["weight_bytes"] == [32 * 32 * 4, 32 * 32]
    # only kept blocks are stored: 3/4 of the pruned layers' weights are gone from the artifact
    pruned_bytes = sum(r["weight_bytes"][0] for r in rows.values())
    assert rep["weight_bytes_after"] <= rep["weight_bytes_before"] - 0.75 * pruned_bytes + 64
    assert rep["kernel_check"]["failed"] == {}
    _check_against_zeroed(sparse_model, tmp_path / "s.so", rep, tmp_path)


@pytest.mark.parametrize("target, arch", [("aarch64", "aarch64"), ("armv7", "armv7")])
def test_block_sparse_arm_builds_match_under_qemu(sparse_model, target, arch, tmp_path):
    ok, why = qemu.can_run(arch)
    if not ok:
        pytest.skip(why)
    rep = tvm_compress.compile(
        sparse_model, tmp_path / "s.so", target=target, passes="prune",
        pass_configs={"prune": {"kind": "block", "ratio": 0.75, "min_speedup": 0}}, bench_runs=1, log=quiet)
    assert rep["pass_reports"]["prune"]["block"] == [4, 1]  # NEON
    assert rep["verify_status"].startswith(f"ran qemu-{arch}") and rep["kernel_check"]["failed"] == {}
    _check_against_zeroed(sparse_model, tmp_path / "s.so", rep, tmp_path, seeds=(3,))


def _measuring_env(times):
    calls = []

    def measure(mods, inputs):
        calls.append([sparse_layers(m) for m in mods])
        return times

    env = PassEnv(facts=TargetFacts(vector_lanes=8, sparse_block=(8, 1)), log=quiet, measure=measure)
    return env, calls


@pytest.mark.parametrize("times, kernel", [([1.0, 2.0], "dense"), ([1.0, 0.95], "dense"),
                                           ([2.0, 1.0], "sparse"), (None, "dense")])
def test_layer_measured_slower_stays_dense(sparse_model, times, kernel):
    """The pass times each layer alone, dense then sparse-marked, and keeps the sparse kernel
    only at --prune-min-speedup (1.1) or more; unmeasurable targets stay dense."""
    env, calls = _measuring_env(times)
    mod = Prune(PruneConfig(kind="block", ratio=0.75), env)(tvm_compress.load_onnx(sparse_model))
    rows = env.report["prune"]["layers"]
    assert len(calls) == len(rows) == 4
    assert all(c[0] == {} and list(c[1].values())[0]["kernel"] == "sparse" for c in calls)
    assert all(r["kernel"] == kernel for r in rows)
    assert {m["kernel"] for m in sparse_layers(mod).values()} == {kernel}
    if kernel == "dense":
        assert all(r["weight_bytes"][1] == r["weight_bytes"][0] for r in rows)
        assert all("not measured" in r["reason"] if times is None else "below" in r["reason"] for r in rows)
    else:
        assert all(r["speedup"] == 2.0 for r in rows)


def test_block_sparse_then_quantize_keeps_sparse_layers_float(sparse_model, tmp_path):
    rep = tvm_compress.compile(
        sparse_model, tmp_path / "sq.so", target="x86-avx2", passes="prune,quantize",
        pass_configs={"prune": {"kind": "block", "ratio": 0.75, "min_speedup": 0,
                                "layers": (("/fc2/Gemm", 0.5),)},
                      "quantize": {"calib": "random"}}, bench_runs=1, log=quiet)
    quant = {l["name"]: l for l in rep["pass_reports"]["quantize"]["layers"]}
    assert quant["/pw1/Conv"]["status"] == "float" and "block-sparse" in quant["/pw1/Conv"]["reason"]
    assert quant["/stem/Conv"]["status"] == "int8" and quant["/down/Conv"]["status"] == "int8"
    assert rep["verified"] and rep["kernel_check"]["failed"] == {}


def test_block_kind_needs_target_kernels(sparse_model):
    env = PassEnv(facts=TargetFacts(target="cuda", vector_lanes=4), log=quiet)
    with pytest.raises(errors.TvmCompressError, match="target cuda has no block-sparse kernels") as err:
        Prune(PruneConfig(kind="block", ratio=0.5), env)(tvm_compress.load_onnx(sparse_model))
    assert "\n" not in str(err.value)


def test_default_block_that_does_not_fit_leaves_the_layer_dense(sparse_model):
    """The target's default block skips layers it does not divide (a given --prune-block errors)."""
    env = PassEnv(facts=TargetFacts(vector_lanes=5, sparse_block=(5, 1)), log=quiet,
                  measure=lambda mods, inputs: [1.0, 0.5])
    mod = Prune(PruneConfig(kind="block", ratio=0.5), env)(tvm_compress.load_onnx(sparse_model))
    rows = env.report["prune"]["layers"]
    assert rows and all("does not divide" in r["reason"] and "kernel" not in r for r in rows)
    assert sparse_layers(mod) == {}
    with pytest.raises(errors.TvmCompressError, match="--prune-block 5x1 does not divide"):
        Prune(PruneConfig(kind="block", ratio=0.5, block=(5, 1)), env)(tvm_compress.load_onnx(sparse_model))


def test_compile_budget_gives_kernels_to_the_layers_saving_most_per_block(sparse_model):
    """At 8x1 blocks and 75 %: pw1 16 and pw2 32 kept blocks over 144 pixels each, fc1 64 and
    fc2 16 over one batch row: a budget of 48 blocks goes to the two convolutions, unmeasured
    beyond it."""
    measured = []
    env = PassEnv(facts=TargetFacts(vector_lanes=8, sparse_block=(8, 1)), log=quiet,
                  measure=lambda mods, inputs: measured.append(1) or [1.0, 0.5])
    mod = Prune(PruneConfig(kind="block", ratio=0.75, max_blocks=48), env)(tvm_compress.load_onnx(sparse_model))
    rows = {r["name"]: r for r in env.report["prune"]["layers"]}
    assert {n for n, r in rows.items() if r.get("kernel") == "sparse"} == {"/pw1/Conv", "/pw2/Conv"}
    for name in ("/fc1/Gemm", "/fc2/Gemm"):
        assert rows[name]["kernel"] == "dense" and "--prune-max-blocks 48" in rows[name]["reason"]
    assert len(measured) == 2 and env.report["prune"]["max_blocks"] == 48
    assert {n for n, m in sparse_layers(mod).items() if m["kernel"] == "sparse"} == {"/pw1/Conv", "/pw2/Conv"}
    with pytest.raises(errors.TvmCompressError, match="--prune-max-blocks must be >= 0"):
        PruneConfig(kind="block", max_blocks=-1)
