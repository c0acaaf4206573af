"""int8 activations channels-last between layers (targets/int8_layout.py, the NHWC int8 kernels).

A realized int8 chain (conv -> requantize -> depthwise -> requantize -> conv, a dequantized
residual, a concat) must lower with no layout conversion between its convolutions, and give
exactly the integers the NCHW kernels give (those are checked against numpy in
tests/test_int8_kernels.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_compress import pipeline
from tvm_compress.targets import get_target
from tvm_compress.targets.channels_last import LAYOUT_ATTR
from tvm_compress.targets.int8_conv import channel_lanes
from tvm_compress.targets.int8_hook import INT8_DOT
from tvm_compress.targets.int8_layout import Int8ChannelsLast

CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
CALL_TIR = tvm.ir.Op.get("relax.call_tir")
PERMUTE = tvm.ir.Op.get("relax.permute_dims")
QUANTIZE = tvm.ir.Op.get("relax.quantize")


def _requantize(bb, acc, channels, rng, scale, zero, dtype):
    """What QuantizeRealize leaves after an int32 conv: per-channel rescale, bias, quantize."""
    y = bb.emit(relax.op.astype(acc, "float32"))
    y = bb.emit(relax.op.multiply(y, relax.const(rng.uniform(0.01, 0.03, (1, channels, 1, 1)).astype("float32"))))
    y = bb.emit(relax.op.add(y, relax.const(rng.uniform(-2, 2, (1, channels, 1, 1)).astype("float32"))))
    return bb.emit(relax.op.quantize(y, relax.const(np.float32(scale)), relax.const(zero, dtype),
                                     axis=1, out_dtype=dtype)), y


def _chain(seed=0, act="int8"):
    """x -> 3x3 conv (7 -> 24) -> uint8 -> depthwise 3x3 stride 2 -> int8 -> 1x1 conv (24 -> 10)
    + dequantized residual -> concat with a second 1x1 branch -> float output."""
    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 13, 11), act))
    w1 = rng.integers(-128, 128, (24, 7, 3, 3)).astype(np.int8)
    w2 = rng.integers(-128, 128, (24, 1, 3, 3)).astype(np.int8)
    w3 = rng.integers(-128, 128, (10, 24, 1, 1)).astype(np.int8)
    w4 = rng.integers(-128, 128, (6, 24, 1, 1)).astype(np.int8)
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=1, out_dtype="int32"))
            qa, _ = _requantize(bb, a, 24, rng, 0.7, 3, "uint8")
            b = bb.emit(relax.op.nn.conv2d(qa, relax.const(w2), strides=2, padding=1, groups=24, out_dtype="int32"))
            qb, _ = _requantize(bb, b, 24, rng, 0.9, 0, "int8")
            c = bb.emit(relax.op.nn.conv2d(qb, relax.const(w3), out_dtype="int32"))
            _, fc = _requantize(bb, c, 10, rng, 0.5, 0, "int8")
            res = bb.emit(relax.op.dequantize(qb, relax.const(np.float32(0.9)), relax.const(0, "int8"), axis=1))
            fc = bb.emit(relax.op.add(fc, relax.op.strided_slice(res, [1], [0], [10])))
            d = bb.emit(relax.op.nn.conv2d(qb, relax.const(w4), out_dtype="int32"))
            _, fd = _requantize(bb, d, 6, rng, 0.5, 0, "int8")
            gv = bb.emit_output(relax.op.concat([fc, fd], axis=1))
        bb.emit_func_output(gv)
    lo, hi = (0, 256) if act == "uint8" else (-128, 128)
    return bb.get(), rng.integers(lo, hi, (1, 7, 13, 11)).astype(act)


def _profile(name, layout):
    profile = get_target(name)
    return dataclasses.replace(profile, features={**profile.features, "int8_layout": layout})


def _calls(func, op):
    found = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(op) else None)
    return found


def _scheduled(mod, profile):
    with profile.tvm_target():
        return pipeline.Schedule(profile)(tvm.transform.Sequential(pipeline.lowering_passes(profile))(mod))


def _run(mod, profile, x):
    target = profile.tvm_target()
    scheduled = _scheduled(mod, profile)
    unscheduled = [gv.name_hint for gv, f in scheduled.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False)]
    ex = tvm.compile(scheduled, target)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy(), unscheduled


def test_chain_has_no_transposes_between_layers():
    """After the int8 hook's rewrites every conv is a packed kernel and the only transposes
    are at the model's edges (its NCHW input and output)."""
    mod, _ = _chain()
    for rewrite in INT8_DOT.rewrites(_profile("x86-avx2", "NHWC")):
        mod = rewrite(mod)
    func = mod["main"]
    assert not _calls(func, CONV2D) and not _calls(func, QUANTIZE)
    assert len([c for c in _calls(func, CALL_TIR) if "int8_conv" in c.args[0].name_hint]) == 4
    permutes = _calls(func, PERMUTE)
    assert len(permutes) == 2
    assert {tuple(int(a) for a in p.attrs.axes) for p in permutes} == {(0, 2, 3, 1), (0, 3, 1, 2)}
    info = json.loads(str(mod.attrs[LAYOUT_ATTR]))
    assert (info["layout"], info["nhwc_convs"], info["nchw_convs"], info["transposes"]) == ("NHWC", 4, 0, 2)


def test_nchw_feature_keeps_the_imported_layout():
    mod, _ = _chain()
    for rewrite in INT8_DOT.rewrites(_profile("x86-avx2", "NCHW")):
        mod = rewrite(mod)
    assert not _calls(mod["main"], PERMUTE)
    assert mod.attrs is None or LAYOUT_ATTR not in mod.attrs


@pytest.mark.parametrize("target_name", ["x86-avx2", "x86"])
@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_chain_nhwc_equals_nchw_exactly(target_name, act):
    """The same integers through both layouts (the NCHW kernels are checked against numpy),
    every packed kernel scheduled by hand in both."""
    mod, x = _chain(seed=1, act=act)
    got_nhwc, left_nhwc = _run(mod, _profile(target_name, "NHWC"), x)
    got_nchw, _ = _run(mod, _profile(target_name, "NCHW"), x)
    assert got_nhwc.shape == (1, 16, 7, 6)
    np.testing.assert_array_equal(got_nhwc, got_nchw)
    assert not [n for n in left_nhwc if "int8_conv" in n], left_nhwc


def test_spelled_quantize_is_the_legalized_expression():
    """quantize/dequantize spelled as element-wise ops give the values LegalizeOps gives them,
    ties and saturation included."""
    values = np.array([[-300.0, -0.35, -0.25, 0.25, 0.35, 0.75, 1.25, 37.5, 500.0]], "float32")
    bb = relax.BlockBuilder()
    v = relax.Var("v", relax.TensorType(values.shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(v, relax.const(np.float32(0.5)), relax.const(3, "uint8"), out_dtype="uint8"))
            d = bb.emit(relax.op.dequantize(q, relax.const(np.float32(0.5)), relax.const(3, "uint8")))
            gv = bb.emit_output(relax.op.add(d, d))
        bb.emit_func_output(gv)
    mod = bb.get()
    from tvm_compress.targets.int8_layout import _SpellQuantize

    spelled = tvm.IRModule({"main": _SpellQuantize().visit_expr(mod["main"])})
    assert not _calls(spelled["main"], QUANTIZE)
    outs = []
    for m in (mod, spelled):
        ex = tvm.compile(relax.transform.LegalizeOps()(m), "llvm")
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(values)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def _hard_swish_quantize(scale, gate_scale=1.0, second_user=False):
    """v -> hard-swish (``HardSwishAsHardSigmoid``'s form; gate times ``gate_scale``) ->
    quantize(scale) -> int8, or the spelled expression ``Expected`` when ``gate_scale`` != 1."""
    bb = relax.BlockBuilder()
    v = relax.Var("v", relax.TensorType((1, 4, 3, 3), "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            k = np.float32(gate_scale)
            z = bb.emit(relax.op.add(bb.emit(relax.op.multiply(v, relax.const(float(np.float32(1 / 6) * k), "float32"))),
                                     relax.const(float(np.float32(0.5) * k), "float32")))
            y = bb.emit(relax.op.multiply(v, bb.emit(relax.op.clip(z, 0.0, float(k)))))
            if gate_scale == 1.0:
                q = bb.emit(relax.op.quantize(y, relax.const(np.float32(scale)), relax.const(0, "int8"), out_dtype="int8"))
            else:
                r = bb.emit(relax.op.add(bb.emit(relax.op.round(y)), relax.const(0.0, "float32")))
                r = bb.emit(relax.op.maximum(bb.emit(relax.op.minimum(r, relax.const(127.0, "float32"))),
                                             relax.const(-128.0, "float32")))
                q = bb.emit(relax.op.astype(r, "int8"))
            out = bb.emit_output((q, y) if second_user else q)
        bb.emit_func_output(out)
    return bb.get()


def test_quantized_hard_swish_takes_the_reciprocal_scale_into_its_gate():
    """quantize(x * clip(x / 6 + 0.5, 0, 1), s) -> x * clip(x * (1/6)/s + 0.5/s, 0, 1/s), rounded:
    one multiply less per value, the same int8 values but where x * gate / s lies within an ulp
    of a rounding boundary. Not where the hard-swish has another reader (it would run twice)."""
    from tvm_compress.relax_utils import use_counts
    from tvm_compress.targets.int8_layout import _SpellQuantize

    def spell(mod):
        func = _SpellQuantize(use_counts(mod["main"])).visit_expr(mod["main"])
        return tvm.IRModule({"main": relax.analysis.remove_all_unused(func)})

    scale = 0.05
    mod = _hard_swish_quantize(scale)
    spelled = spell(mod)
    tvm.ir.assert_structural_equal(spelled, _hard_swish_quantize(scale, gate_scale=float(np.float32(1) / np.float32(scale))))
    x = np.random.default_rng(3).uniform(-8, 8, (1, 4, 3, 3)).astype("float32")
    outs = [relax.VirtualMachine(tvm.compile(relax.transform.LegalizeOps()(m), "llvm"), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy().astype(int) for m in (mod, spelled)]
    assert np.abs(outs[0] - outs[1]).max() <= 1 and (outs[0] == outs[1]).mean() > 0.9
    shared = spell(_hard_swish_quantize(scale, second_user=True))
    from tvm_compress.relax_utils import scalar_value

    multiplies = [c for c in _calls(shared["main"], tvm.ir.Op.get("relax.multiply"))
                  if scalar_value(c.args[1]) is not None and np.isclose(float(scalar_value(c.args[1])), 1 / scale)]
    assert len(multiplies) == 1


def test_quantized_excite_product_takes_the_reciprocal_scale_into_the_gate():
    """quantize(x * g, s) with a per-channel gate g (squeeze-excite) -> round(x * (g * (1/s))):
    the scale multiplies the 4 gate values, not each of the 144 products."""
    from tvm_compress.relax_utils import use_counts
    from tvm_compress.targets.int8_layout import _SpellQuantize

    def module(spelled):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
        g = relax.Var("g", relax.TensorType((1, 4, 1, 1), "float32"))
        with bb.function("main", [x, g]):
            with bb.dataflow():
                if spelled:
                    y = bb.emit(relax.op.multiply(x, bb.emit(relax.op.multiply(g, relax.const(20.0, "float32")))))
                    r = bb.emit(relax.op.add(bb.emit(relax.op.round(y)), relax.const(0.0, "float32")))
                    r = bb.emit(relax.op.maximum(bb.emit(relax.op.minimum(r, relax.const(127.0, "float32"))),
                                                 relax.const(-128.0, "float32")))
                    q = bb.emit(relax.op.astype(r, "int8"))
                else:
                    y = bb.emit(relax.op.multiply(x, g))
                    q = bb.emit(relax.op.quantize(y, relax.const(np.float32(0.05)), relax.const(0, "int8"),
                                                  out_dtype="int8"))
                out = bb.emit_output(q)
            bb.emit_func_output(out)
        return bb.get()

    before = module(False)
    func = _SpellQuantize(use_counts(before["main"])).visit_expr(before["main"])
    tvm.ir.assert_structural_equal(tvm.IRModule({"main": relax.analysis.remove_all_unused(func)}), module(True))


def test_modules_without_packable_convs_are_left_alone():
    rng = np.random.default_rng(4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.standard_normal((8, 4, 3, 3)).astype("float32"))))
            gv = bb.emit_output(relax.op.quantize(y, relax.const(np.float32(0.1)), relax.const(0, "int8")))
        bb.emit_func_output(gv)
    before = bb.get()
    tvm.ir.assert_structural_equal(Int8ChannelsLast(("int8", "uint8"))(before), before)


@pytest.mark.parametrize("channels, lanes, expected", [(96, 16, 16), (24, 16, 8), (12, 8, 4), (18, 8, 8), (10, 4, 4)])
def test_depthwise_channel_vectors(channels, lanes, expected):
    assert channel_lanes(channels, lanes) == expected


@pytest.mark.slow
def test_speed_table_finds_every_layer_of_channels_last_builds(tmp_path):
    """scripts/bench_int8.py's per-shape table (what `--quant-speed-table` reads) finds the
    kernel of every conv/dense layer in float and int8 builds whose convs run channels-last,
    keyed by the imported (NCHW) output shape that QuantizeRealize looks layers up by."""
    import sys
    from pathlib import Path

    import tvm_compress

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "scripts"))
    try:
        from bench_int8 import speed_table
    finally:
        sys.path.remove(str(repo / "scripts"))
    model = repo / "tvm_compress" / "data" / "fashion_cnn.onnx"
    data = np.load(repo / "tvm_compress" / "data" / "fashion_test.npz")
    calib = tmp_path / "calib.npz"
    np.savez(calib, calib=(data["calib"][:64].astype("float32") / 255.0)[:, None])
    profile = get_target("x86-avx2")
    common = dict(target=profile, input_shapes={"input": (1, 1, 28, 28)}, bench_runs=0,
                  check_kernels=False, log=lambda m: None)
    tvm_compress.compile(str(model), tmp_path / "float.so", **common)
    logs = []
    rep = tvm_compress.compile(str(model), tmp_path / "int8.so", passes="quantize",
                               pass_configs={"quantize": {"calib": str(calib)}}, **{**common, "log": logs.append})
    layers = rep["pass_reports"]["quantize"]["layers"]
    # the dense layer after the flatten runs the exact pmaddwd kernel (layer_kernel: its weight
    # is not fitted to pmaddubsw's pairs, the flatten reorders its rows), the convs and the
    # last dense layer pmaddubsw: said and reported
    assert rep["int8_kernels"] == {"pmaddubsw": 4, "pmaddwd": 1}
    assert any(m.startswith("int8: 4 layers on pmaddubsw, 1 on pmaddwd") for m in logs)
    assert json.loads(json.dumps(rep["conv_layout"]))["layout"] == "NHWC"
    x = (data["images"][:1].astype("float32") / 255.0)[:, None]
    table = speed_table(tmp_path / "float.so", tmp_path / "int8.so", layers, x, profile)["layers"]
    assert sorted(v["layer"] for v in table.values()) == sorted(l["name"] for l in layers)
    for key, row in table.items():
        weight = [int(d) for d in key.split(":w")[1].split(":")[0].split("x")]
        out = [int(d) for d in key.split(":o")[1].split("x")]
        if key.startswith("conv2d"):
            assert out[1] == weight[0], key  # channels on axis 1: NCHW
        assert row["float_segment_ms"] > 0 and row["int8_segment_ms"] > 0
        assert len(row["segment_kernels"]["float"]) >= 1 and len(row["segment_kernels"]["int8"]) >= 1
        if row.get("note"):
            # a float conv that takes its pool into its kernel: the kernels do different work,
            # compared as segments only
            assert row["float_ms"] is None and "fused differently" in row["note"], row
            continue
        assert row["float_ms"] > 0 and row["int8_ms"] > 0
        # a segment: the layer's kernel first, then what runs before the next layer's kernel
        assert row["float_segment_ms"] >= row["float_ms"] and row["int8_segment_ms"] >= row["int8_ms"]
    # the demo's max pools follow its convs in the int8 build: timed with them; in the float
    # build the first two run inside their convs' kernels
    assert any(any("pool" in k for k in row["segment_kernels"]["int8"]) for row in table.values())
    assert sum(bool(row.get("note")) for row in table.values()) == 2


def test_bad_int8_layout_in_target_file_is_one_line_error(tmp_path):
    from tvm_compress.errors import TargetError
    from tvm_compress.targets import load_target_files

    f = tmp_path / "t.toml"
    f.write_text('[my-cpu]\nfamily = "x86"\ntarget = { kind = "llvm", mcpu = "haswell" }\n'
                 'features = { int8_dot = "pmaddwd", int8_layout = "NCWH" }\n')
    with pytest.raises(TargetError, match="features.int8_layout 'NCWH' is not \"NHWC\" or \"NCHW\"") as err:
        load_target_files([f])
    assert "\n" not in str(err.value)


def _flatten_dense(seed=2):
    """int8 conv -> requantize -> flatten -> int8 dense (what QuantizeRealize leaves of a
    classifier's head)."""
    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 5, 6, 7), "int8"))
    w1 = rng.integers(-128, 128, (12, 5, 3, 3)).astype(np.int8)
    w2 = rng.integers(-128, 128, (10, 12 * 6 * 7)).astype(np.int8)
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=1, out_dtype="int32"))
            qa, _ = _requantize(bb, a, 12, rng, 0.8, 0, "int8")
            flat = bb.emit(relax.op.reshape(qa, [1, 12 * 6 * 7]))
            d = bb.emit(relax.op.matmul(flat, relax.op.permute_dims(relax.const(w2)), out_dtype="int32"))
            gv = bb.emit_output(relax.op.multiply(relax.op.astype(d, "float32"), relax.const(np.float32(0.01))))
        bb.emit_func_output(gv)
    return bb.get(), rng.integers(-128, 128, (1, 5, 6, 7)).astype("int8")


def test_flatten_into_dense_reads_the_nhwc_tensor():
    """The flatten before a dense layer costs no transpose: the dense weight's rows are
    reordered instead (the same integers as the NCHW build)."""
    mod, x = _flatten_dense()
    rewritten = mod
    for rewrite in INT8_DOT.rewrites(_profile("x86-avx2", "NHWC")):
        rewritten = rewrite(rewritten)
    permutes = _calls(rewritten["main"], PERMUTE)
    assert [tuple(int(a) for a in p.attrs.axes) for p in permutes] == [(0, 2, 3, 1)]  # the input's only
    got_nhwc, _ = _run(mod, _profile("x86-avx2", "NHWC"), x)
    got_nchw, _ = _run(mod, _profile("x86-avx2", "NCHW"), x)
    np.testing.assert_array_equal(got_nhwc, got_nchw)


def test_transpose_chains_that_keep_the_element_order_become_reshapes():
    """Before == Expected: a transpose to NCHW and back, an identity permutation before a
    reshape, and a squeeze-transpose-reshape chain that keeps the order all become one reshape
    of (or just) their source; a real transpose stays."""
    from tvm_compress.targets.channels_last import _CancelMoves

    def build(body):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 1, 40, 120), "int8"))
        with bb.function("main", [x]):
            with bb.dataflow():
                gv = bb.emit_output(body(bb, x))
            bb.emit_func_output(gv)
        return bb.get()

    def before(bb, x):
        a = bb.emit(relax.op.permute_dims(bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2])), [0, 2, 3, 1]))
        b = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(
            bb.emit(relax.op.squeeze(a, [1])), [0, 1, 2])), [40, 120]))
        c = bb.emit(relax.op.permute_dims(b, [1, 0]))  # a real transpose
        return relax.op.add(bb.emit(relax.op.reshape(b, [1, 40, 120])), relax.op.reshape(c, [1, 40, 120]))

    def expected(bb, x):
        b = bb.emit(relax.op.reshape(x, [40, 120]))
        c = bb.emit(relax.op.permute_dims(b, [1, 0]))
        return relax.op.add(bb.emit(relax.op.reshape(x, [1, 40, 120])), relax.op.reshape(c, [1, 40, 120]))

    mod = build(before)
    after = tvm.IRModule({"main": relax.analysis.remove_all_unused(
        _CancelMoves(mod).visit_expr(mod["main"]))})
    # (the chain that keeps its source's shape leaves an alias binding; canonicalized away)
    after = relax.transform.CanonicalizeBindings()(relax.transform.Normalize()(after))
    tvm.ir.assert_structural_equal(after, build(expected))


def test_few_channel_epilogue_runs_in_full_vectors():
    """A 1x1 int8 conv to 4 channels (a detector head): its NHWC epilogue runs along pixels x
    channels in vectors of 8, not in half-empty ones of 4 (it reads a per-tile copy of the 4
    live accumulator lanes, contiguous), and still equals the NCHW kernels."""
    import tvm_ffi
    from tvm import s_tir

    rng = np.random.default_rng(9)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 24, 6, 10), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.integers(-128, 128, (4, 24, 1, 1)).astype(np.int8)),
                                             out_dtype="int32"))
            _, y = _requantize(bb, acc, 4, rng, 0.5, 0, "int8")
            gv = bb.emit_output(relax.op.sigmoid(y))
        bb.emit_func_output(gv)
    mod = bb.get()
    data = rng.integers(-128, 128, (1, 24, 6, 10)).astype(np.int8)
    profile = _profile("x86-avx2", "NHWC")
    scheduled = _scheduled(mod, profile)
    (name,) = [gv.name_hint for gv, f in scheduled.functions_items() if "int8_conv" in gv.name_hint]
    func = scheduled[name]
    blocks = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, blocks.append)], order="post")
    read = [r.source for b in blocks for r in b.reads]
    (out,) = {w.source for b in blocks for w in b.writes if not any(w.source.same_as(r) for r in read)}
    widths = []  # of the vectorized loops that store the kernel's output (no block reads it)

    def on_for(loop):
        writes = []
        tvm_ffi.structural_walk(loop.body, [(s_tir.SBlock, lambda b: writes.extend(w.source for w in b.writes))],
                                order="post")
        if loop.kind == tvm.tirx.ForKind.VECTORIZED and any(w.same_as(out) for w in writes):
            widths.append(int(loop.extent))

    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, on_for)], order="post")
    assert widths and all(w % 8 == 0 for w in widths), widths
    # the 4 live lanes of the 8-lane accumulators, copied per tile for the epilogue to read
    assert any(str(w.source.dtype) == "int32" and int(w.source.shape[-1]) == 4 for b in blocks for w in b.writes)
    got, _ = _run(mod, profile, data)
    want, _ = _run(mod, _profile("x86-avx2", "NCHW"), data)
    np.testing.assert_array_equal(got, want)


def _top_level_blocks(func) -> list:
    """Names of the blocks under each outermost loop of a scheduled PrimFunc."""
    import tvm_ffi
    from tvm import s_tir

    nests = []
    root = func.body.block.body
    for stmt in (root.seq if isinstance(root, tvm.tirx.SeqStmt) else [root]):
        names = []
        tvm_ffi.structural_walk(stmt, [(s_tir.SBlock, lambda b: names.append(b.name_hint))], order="post")
        nests.append(names)
    return nests


@pytest.mark.parametrize("hw, oc, packs_per_tile", [((6, 10), 24, True), ((6, 10), 200, True), ((64, 64), 200, False)])
def test_small_1x1_conv_packs_each_tile_in_its_loop(hw, oc, packs_per_tile):
    """A 1x1 NHWC int8 conv packs each register tile inside the conv's loop nest, not in a
    whole-map loop of its own, when few groups of output lanes would pack it again (24
    channels: 3 vectors) or the map is small (200 channels, 25 vectors: the groups run inside
    the pixel tiles); a larger map with many groups keeps the whole-map pack. All equal the
    NCHW kernels."""
    rng = np.random.default_rng(11)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 10, *hw), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.integers(-128, 128, (oc, 10, 1, 1)).astype(np.int8)),
                                             out_dtype="int32"))
            q, _ = _requantize(bb, acc, oc, rng, 0.5, 0, "int8")
            gv = bb.emit_output(relax.op.dequantize(q, relax.const(np.float32(0.5)), relax.const(0, "int8"), axis=1))
        bb.emit_func_output(gv)
    mod = bb.get()
    profile = _profile("x86-avx2", "NHWC")
    scheduled = _scheduled(mod, profile)
    (name,) = [gv.name_hint for gv, f in scheduled.functions_items() if "int8_conv" in gv.name_hint]
    nests = _top_level_blocks(scheduled[name])
    with_pack = [n for n in nests if any(b.startswith("int8_pack") for b in n)]
    assert len(with_pack) == 1, nests
    assert any(b.startswith("int8_conv") for b in with_pack[0]) == packs_per_tile, nests
    data = rng.integers(-128, 128, (1, 10, *hw)).astype(np.int8)
    got, _ = _run(mod, profile, data)
    want, _ = _run(mod, _profile("x86-avx2", "NCHW"), data)
    np.testing.assert_array_equal(got, want)


def test_excite_scale_is_computed_once_per_channel():
    """A squeeze-excite block after an int8 depthwise conv (pool, 24 -> 8 -> 24 channels, hard
    sigmoid, times the 6x10 map): the excite conv's kernel computes the 24 scales in a block of
    their own, and the loop over the map reads them instead of redoing the conv's requantize
    and the sigmoid at every pixel. Equal to the NCHW kernels."""
    rng = np.random.default_rng(12)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 24, 6, 10), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            dw = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.integers(-128, 128, (24, 1, 3, 3)).astype(np.int8)),
                                            padding=1, groups=24, out_dtype="int32"))
            _, fmap = _requantize(bb, dw, 24, rng, 0.5, 0, "int8")
            pooled = bb.emit(relax.op.mean(fmap, axis=[2, 3], keepdims=True))
            q = bb.emit(relax.op.quantize(pooled, relax.const(np.float32(0.3)), relax.const(0, "int8"),
                                          axis=1, out_dtype="int8"))
            sq = bb.emit(relax.op.nn.conv2d(q, relax.const(rng.integers(-128, 128, (8, 24, 1, 1)).astype(np.int8)),
                                            out_dtype="int32"))
            qs, _ = _requantize(bb, sq, 8, rng, 0.4, 0, "int8")
            ex = bb.emit(relax.op.nn.conv2d(qs, relax.const(rng.integers(-128, 128, (24, 8, 1, 1)).astype(np.int8)),
                                            out_dtype="int32"))
            _, y = _requantize(bb, ex, 24, rng, 0.5, 0, "int8")
            gate = bb.emit(relax.op.clip(relax.op.add(relax.op.multiply(y, relax.const(np.float32(0.2))),
                                                      relax.const(np.float32(0.5))), 0.0, 1.0))
            scaled = bb.emit(relax.op.multiply(fmap, gate))
            gv = bb.emit_output(relax.op.quantize(scaled, relax.const(np.float32(0.04)), relax.const(0, "int8"),
                                                  axis=1, out_dtype="int8"))
        bb.emit_func_output(gv)
    mod = bb.get()
    profile = _profile("x86-avx2", "NHWC")
    scheduled = _scheduled(mod, profile)
    import tvm_ffi
    from tvm import s_tir

    def block_writes(func):
        found = {}
        tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, lambda b: found.__setitem__(
            b.name_hint, [int(np.prod([int(d) for d in w.source.shape])) for w in b.writes]))], order="post")
        return found

    # the excite conv's kernel: the one packing the squeezed vector's 8 channels
    (writes,) = [w for w in (block_writes(f) for gv, f in scheduled.functions_items() if "int8_conv" in gv.name_hint)
                 if w.get("int8_pack") == [8]]
    per_channel = [n for n, w in writes.items() if w == [24] and not n.startswith("int8_conv")]
    per_pixel = [n for n, w in writes.items() if w == [24 * 6 * 10]]
    assert per_channel and per_pixel, sorted(writes.items())
    data = rng.integers(-128, 128, (1, 24, 6, 10)).astype(np.int8)
    got, _ = _run(mod, profile, data)
    want, _ = _run(mod, _profile("x86-avx2", "NCHW"), data)
    np.testing.assert_array_equal(got, want)
