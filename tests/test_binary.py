"""Binary layers: bit packing, XNOR/popcount kernels (exact against the +1/-1 float computation),
the fused chain, the pass's structure and options, and compiled models against torch and
onnxruntime (x86 native, ARM under qemu)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, te

import tvm_compress
from tvm_compress.errors import PassOptionError
from tvm_compress.layers import with_layer
from tvm_compress.pass_registry import PassEnv
from tvm_compress.passes import Binary, BinaryConfig
from tvm_compress.specs import BINARY_LAYERS_ATTR, TargetFacts, binary_layers
from tvm_compress.targets import binary_kernels as bk
from tvm_compress.targets import get_target, qemu

from test_fold import _module  # noqa: E402  (Relax module from a body builder)

F32 = "float32"
_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})


def quiet(_msg):
    pass


def _build(args, out, lanes=8, schedule=True):
    sch = s_tir.Schedule(te.create_prim_func([*args, out]))
    if schedule:
        for block in bk.find_binary_blocks(sch):
            bk.schedule_binary(sch, block, lanes)
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=_TARGET).jit()


def _call(lib, arrays, out_shape, dtype):
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


def _pm1(rng, shape):
    return np.where(rng.standard_normal(shape) >= 0, 1.0, -1.0)


def _conv_ref(x, w, stride, pad, dil):
    """Zero-padded convolution of +1/-1 tensors in int64 (numpy)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(np.int64)
    oh = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dil:i * dil + stride * oh:stride, j * dil:j * dil + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.int64))
    return out


@pytest.mark.parametrize("channels", [1, 31, 32, 33, 70])
def test_bit_packing_round_trip(channels):
    rng = np.random.default_rng(channels)
    signs = rng.standard_normal((2, channels, 3)) >= 0
    packed = bk.pack_bits(signs, axis=1)
    assert packed.dtype == np.uint32 and packed.shape == (2, 3, bk.words(channels))
    np.testing.assert_array_equal(bk.unpack_bits(packed, channels), signs.transpose(0, 2, 1))
    # bits past the last channel are zero (their XOR with a weight's zero bits adds nothing)
    assert int(packed[..., -1].max()) < 2 ** (channels - 32 * (bk.words(channels) - 1))


# (N, C, H, W, O, K, stride, pad, dilation): channel counts off the word, padding, stride 2, dilation
SHAPES = [(1, 40, 9, 9, 24, 3, 1, 1, 1), (2, 33, 7, 8, 5, 3, 2, 1, 1), (1, 64, 6, 6, 40, 1, 1, 0, 1),
          (1, 17, 10, 10, 12, 3, 1, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", [False, True])
def test_xnor_popcount_conv_equals_the_float_pm1_convolution(shape, schedule):
    n, c, h, w, o, k, s, p, d = shape
    rng = np.random.default_rng(sum(shape))
    x, wt = _pm1(rng, (n, c, h, w)), _pm1(rng, (o, c, k, k))
    xpk, wpk = bk.pack_bits(x >= 0, axis=1), bk.pack_conv_weight(wt)
    xp, wp = te.placeholder(xpk.shape, "uint32"), te.placeholder(wpk.shape, "uint32")
    y = bk.binary_conv2d(xp, wp, c, (s, s), (p, p, p, p), (d, d))
    got = _call(_build([xp, wp], y, schedule=schedule), [xpk, wpk], [int(v) for v in y.shape], "int32")
    np.testing.assert_array_equal(got, _conv_ref(x, wt, s, p, d))


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_chain_equals_conv_then_affine_then_sign(shape):
    n, c, h, w, o, k, s, p, d = shape
    rng = np.random.default_rng(sum(shape) + 1)
    x, wt = _pm1(rng, (n, c, h, w)), _pm1(rng, (o, c, k, k))
    scale, shift = rng.standard_normal(o), rng.standard_normal(o) * 3
    scale[0] = 0.0  # a dead channel: its sign is the shift's
    sgn, thr = bk.thresholds(scale, shift)
    xpk, wpk = bk.pack_bits(x >= 0, axis=1), bk.pack_conv_weight(wt)
    xp, wp = te.placeholder(xpk.shape, "uint32"), te.placeholder(wpk.shape, "uint32")
    sg, th = te.placeholder(sgn.shape, "int32"), te.placeholder(thr.shape, "int32")
    z = bk.binary_conv2d_packed(xp, wp, sg, th, c, (s, s), (p, p, p, p), (d, d))
    got = _call(_build([xp, wp, sg, th], z), [xpk, wpk, sgn, thr], [int(v) for v in z.shape], "uint32")
    y = scale[None, :, None, None] * _conv_ref(x, wt, s, p, d) + shift[None, :, None, None]
    np.testing.assert_array_equal(got, bk.pack_bits(y >= 0, axis=1))


def test_thresholds_decide_like_the_affine_for_every_integer_dot():
    rng = np.random.default_rng(0)
    scale = np.concatenate([rng.standard_normal(50), [0.0, 0.0, 2.0, -2.0]])
    shift = np.concatenate([rng.standard_normal(50) * 20, [1.0, -1.0, -4.0, 4.0]])  # exact ties too
    sgn, thr = bk.thresholds(scale, shift)
    dots = np.arange(-100, 101)[:, None]
    n = len(scale)
    np.testing.assert_array_equal(sgn[None, :n] * dots >= thr[None, :n], scale * dots + shift >= 0)
    assert np.all(sgn[n:] * 0 < thr[n:])  # padding channels never set


def test_bitpack_kernel_and_dense_kernel():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 45, 3, 4)).astype(F32)
    x[0, 0, 0, 0] = 0.0  # sign's tie packs as +1
    xf = te.placeholder(x.shape, F32)
    pk = bk.bitpack(xf)
    got = _call(_build([xf], pk), [x], [int(v) for v in pk.shape], "uint32")
    np.testing.assert_array_equal(got, bk.pack_bits(x >= 0, axis=1))
    a, w = _pm1(rng, (3, 100)), _pm1(rng, (24, 100))
    apk, wpk = bk.pack_bits(a >= 0, axis=1), bk.pack_dense_weight(w)
    ap, wp = te.placeholder(apk.shape, "uint32"), te.placeholder(wpk.shape, "uint32")
    y = bk.binary_dense(ap, wp, 100)
    np.testing.assert_array_equal(_call(_build([ap, wp], y), [apk, wpk], (3, 24), "int32"), a @ w.T)


# ---- the pass ------------------------------------------------------------------------------

def _binary(mod, facts=None, **cfg):
    env = PassEnv(facts=facts or TargetFacts())
    return Binary(BinaryConfig(**cfg), env)(mod), env.report["binary"]


def test_post_training_binarization_structure():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    alpha = np.abs(w.astype(np.float64)).reshape(4, -1).mean(1)
    wb = (np.where(w >= 0, 1.0, -1.0) * alpha[:, None, None, None]).astype(F32)

    def before(bb, x):
        return with_layer(relax.op.nn.conv2d(x, relax.const(w), padding=1), "conv")

    def expected(bb, x):
        s = bb.emit(relax.op.where(relax.op.greater_equal(x, relax.const(0, F32)),
                                   relax.const(1, F32), relax.const(-1, F32)))
        return with_layer(relax.op.nn.conv2d(s, relax.const(wb), padding=1), "conv")

    after, report = _binary(_module((1, 3, 6, 6), before), layers="all")
    want = _module((1, 3, 6, 6), expected)
    tvm.ir.assert_structural_equal(after.without_attr(BINARY_LAYERS_ATTR), want)
    assert binary_layers(after) == {"conv": {"activations": "binary"}}
    row = report["layers"]["conv"]
    assert row["sign_added"] and row["float_bytes"] == w.nbytes
    assert row["packed_bytes"] == 4 * (9 * 1 * 4 + 4)  # 9 taps x 1 word x 4 outputs + 4 alphas


def test_auto_takes_only_layers_that_read_a_sign_and_keeps_exact_binary_weights():
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(F32)
    w2 = (np.where(rng.standard_normal((4, 8, 3, 3)) >= 0, 1.0, -1.0) * 0.5).astype(F32)

    def body(bb, x):
        y = bb.emit(with_layer(relax.op.nn.conv2d(x, relax.const(w1), padding=1), "first"))
        s = bb.emit(relax.op.sign(y))
        return with_layer(relax.op.nn.conv2d(s, relax.const(w2), padding=1), "second")

    mod = _module((1, 3, 6, 6), body)
    after, report = _binary(mod)
    assert set(report["layers"]) == {"second"} and report["layers"]["second"]["weight_error"] == 0.0
    # already binary and already reading a sign: only the mark is new
    tvm.ir.assert_structural_equal(after.without_attr(BINARY_LAYERS_ATTR), mod)
    after, report = _binary(mod, layers="all", skip_first=True, weights_only=True)
    assert binary_layers(after) == {"second": {"activations": "float"}}


@pytest.mark.parametrize("cfg, message", [
    ({}, "no layer reads a sign"),
    ({"layers": ("nope",)}, "no conv2d/matmul layer named 'nope'"),
    ({"layers": "some"}, "expected auto, all or layer names"),
    ({"layers": "all", "skip_first": True, "skip_last": True}, "every chosen layer is skipped"),
])
def test_bad_options_are_one_line_errors(cfg, message):
    w = np.ones((4, 3, 1, 1), F32)
    mod = _module((1, 3, 4, 4), lambda bb, x: with_layer(relax.op.nn.conv2d(x, relax.const(w)), "only"))
    with pytest.raises(PassOptionError, match=re.escape(message)):
        _binary(mod, **cfg)


def test_cli_bad_binary_option(tmp_path, capsys):
    from tvm_compress.cli import main
    from tvm_compress.demo import demo_files

    out = tmp_path / "m.so"
    rc = main(["compile", str(demo_files()["model"]), "--input-shape", "input=1,1,28,28", "-o", str(out),
               "--passes", "binary", "--binary-layers", "nope", "--tune-trials", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and not out.exists()
    assert err[-1].startswith("tvm-compress: error:") and "no conv2d/matmul layer named 'nope'" in err[-1]


# ---- compiled models ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bnn_model(tmp_path_factory):
    """A small binarized network as a BNN exporter writes it: float first conv, binary convs
    (one with 40 channels: not a whole word; one strided) whose weights are alpha * sign, batch
    norms, Sign ops, a binary dense after a flatten, a float last layer after a hardtanh."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32)
            self.c2, self.b2 = torch.nn.Conv2d(32, 40, 3, padding=1, bias=False), torch.nn.BatchNorm2d(40)
            self.c3, self.b3 = torch.nn.Conv2d(40, 64, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(64)
            self.d1, self.b4 = torch.nn.Linear(64 * 7 * 7, 48, bias=False), torch.nn.BatchNorm1d(48)
            self.d2 = torch.nn.Linear(48, 10)
            for layer in (self.c2, self.c3, self.d1):
                w = layer.weight.data
                layer.weight.data = torch.sign(w) * w.abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
            for bn in (self.b1, self.b2, self.b3, self.b4):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.data.uniform_(-1, 1)
                bn.bias.data.uniform_(-0.5, 0.5)

        def forward(self, x):
            x = torch.sign(self.b1(self.c1(x)))
            x = torch.sign(self.b2(self.c2(x)))
            x = torch.sign(self.b3(self.c3(x)))
            x = torch.sign(self.b4(self.d1(torch.sign(x.flatten(1)))))
            return self.d2(torch.nn.functional.hardtanh(x))

    path = tmp_path_factory.mktemp("bnn") / "bnn.onnx"
    torch.onnx.export(Net().eval(), torch.rand(1, 1, 14, 14), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    return path


def _inputs(seed):
    return np.random.default_rng(seed).uniform(0, 1, (1, 1, 14, 14)).astype(F32)


def test_binary_network_on_x86_equals_onnxruntime(bnn_model, tmp_path):
    from tvm_compress.verify import ort_run

    lib = tmp_path / "b.so"
    rep = tvm_compress.compile(bnn_model, lib, target="x86-avx2", passes="binary", bench_runs=1, log=quiet)
    layers = rep["pass_reports"]["binary"]["layers"]
    assert len(layers) == 3 and all(r["weight_error"] == 0.0 for r in layers.values())  # auto: exact
    kernels = rep["binary_kernels"]
    assert sorted(r["kernel"] for r in kernels.values()) == ["xnor-popcount"] * 3
    # conv -> BN -> sign -> conv: one fused chain (the strided conv feeds a flatten: float out)
    assert sum(r.get("output", "").startswith("bit-packed") for r in kernels.values()) == 1
    assert rep["kernel_check"]["failed"] == {}
    # 1 bit per weight plus one alpha per output channel
    bits = rep["pass_reports"]["binary"]
    assert bits["packed_bytes"] * 25 <= bits["float_bytes"]
    inputs = tvm_compress.prepare_onnx(bnn_model).inputs
    for seed in range(3):
        x = _inputs(seed)
        ours = tvm_compress.run(lib, {"input": x}).outputs[0]
        ref = ort_run(bnn_model, inputs, [x])[0]
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def _asm(model, profile) -> str:
    """Assembly of ``model`` binarized (auto) and built for ``profile``."""
    from tvm_compress import pipeline

    env = PassEnv(facts=tvm_compress.targets.get_family(profile.family).facts(profile))
    mod = Binary(BinaryConfig(), env)(tvm_compress.prepare_onnx(model).to_relax())
    scheduled = pipeline.Schedule(profile)(pipeline.Lower(profile)(mod))
    (llvm_mod,) = [m for m in tvm.compile(scheduled, profile.tvm_target()).mod.imports if m.kind == "llvm"]
    return llvm_mod.inspect_source("s")


@pytest.mark.parametrize("mcpu, instruction", [("haswell", r"\bvpshufb\b"), ("icelake-server", r"\bvpopcntd\b")])
def test_x86_counts_bits_with_byte_tables_on_avx2_and_vpopcntd_on_avx512(bnn_model, mcpu, instruction):
    profile = get_target("x86-avx2")
    profile = profile.with_target({**profile.target, "mcpu": mcpu})
    assert re.search(instruction, _asm(bnn_model, profile))


@pytest.mark.parametrize("target, arch, instruction", [("aarch64", "aarch64", r"\bcnt\s+v\d+\.(8|16)b"),
                                                        ("armv7", "armv7", r"\bvcnt\.8\b")])
def test_binary_network_arm_builds_match_under_qemu_and_count_bits_in_vectors(
        bnn_model, target, arch, instruction, tmp_path):
    assert re.search(instruction, _asm(bnn_model, get_target(target)))

    ok, why = qemu.can_run(arch)
    if not ok:
        pytest.skip(why)
    lib = tmp_path / "b.so"
    rep = tvm_compress.compile(bnn_model, lib, target=target, passes="binary", bench_runs=1, log=quiet)
    assert rep["verify_status"].startswith(f"ran qemu-{arch}") and rep["kernel_check"]["failed"] == {}
    assert rep["max_rel_err"] <= 1e-4  # the verify inputs, against onnxruntime


def test_weights_only_layers_unpack_their_bits_exactly(bnn_model, tmp_path):
    from tvm_compress.verify import ort_run

    lib = tmp_path / "bwn.so"
    rep = tvm_compress.compile(bnn_model, lib, target="x86-avx2", passes="binary", bench_runs=1, log=quiet,
                               pass_configs={"binary": {"weights_only": True}})
    assert {r["kernel"] for r in rep["binary_kernels"].values()} == {"float (1-bit weights unpacked at run time)"}
    # the weights are stored as bits: the float copies are gone from the artifact
    assert rep["weight_bytes_after"] < rep["weight_bytes_before"] / 10
    x = _inputs(7)
    ours = tvm_compress.run(lib, {"input": x}).outputs[0]
    ref = ort_run(bnn_model, tvm_compress.prepare_onnx(bnn_model).inputs, [x])[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def _fashion_test_set():
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        from train_demo import DEFAULT_DATA_DIR, load_fashion_mnist
    finally:
        sys.path.remove(str(scripts))
    if not Path(DEFAULT_DATA_DIR).is_dir():
        pytest.skip(f"{DEFAULT_DATA_DIR} missing (apt-get install dataset-fashion-mnist)")
    data = load_fashion_mnist(Path(DEFAULT_DATA_DIR))
    return data["test_images"], data["test_labels"].astype(np.int64)


@pytest.mark.slow
def test_trained_binary_network_predicts_like_torch_on_the_full_test_set(tmp_path):
    """The bundled binarized network, layers found by ``auto``: its predictions on all 10,000
    test images equal torch's, except where torch's float32 put a sign's input within 1e-6 of
    zero (``near_tie``: float rounding decides that sign; the kernels compute exactly)."""
    from tvm_compress.demo import demo_files

    data = demo_files()["model"].parent
    images, labels = _fashion_test_set()
    torch_ref = np.load(data / "fashion_binary_torch.npz")
    batch = 500
    lib = tmp_path / "fb.so"
    rep = tvm_compress.compile(data / "fashion_binary.onnx", lib, target="x86-avx2", passes="binary",
                               input_shapes={"input": (batch, 1, 28, 28)}, bench_runs=1, log=quiet)
    assert len(rep["pass_reports"]["binary"]["layers"]) == 6  # five binary convs and the binary dense
    assert sum(r.get("output", "").startswith("bit-packed") for r in rep["binary_kernels"].values()) == 4
    preds = np.concatenate([
        tvm_compress.run(lib, {"input": images[i:i + batch, None].astype(F32) / 255.0}).outputs[0].argmax(1)
        for i in range(0, len(images), batch)])
    differ = preds != torch_ref["pred"]
    assert not np.any(differ & ~torch_ref["near_tie"]), np.nonzero(differ)[0][:10]
    assert differ.sum() <= 10
    assert (preds == labels).mean() >= 0.85


def test_a_layer_the_kernels_cannot_take_keeps_the_float_computation_and_says_why():
    from tvm_compress.targets.binary_hook import BinaryLayers, binary_kernels

    w = np.where(np.random.default_rng(2).standard_normal((4, 2, 3, 3)) >= 0, 0.5, -0.5).astype(F32)

    def body(bb, x):
        s = bb.emit(relax.op.sign(x))
        return with_layer(relax.op.nn.conv2d(s, relax.const(w), padding=1, groups=2), "grouped")

    marked, _ = _binary(_module((1, 4, 5, 5), body))
    after = BinaryLayers()(marked)
    assert binary_kernels(after) == {"grouped": {"kernel": "float (the kernels cannot take it: 2 groups)"}}
    tvm.ir.assert_structural_equal(after["main"], marked["main"])
