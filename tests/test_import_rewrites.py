"""Rewrites every imported model gets before the compression passes: the importer's variadic
Max/Min/Sum/Mean back into pairwise ops (``StackReduceToBinary``) and its constant pads into
``R.nn.pad`` (``TeCallsToOps``); then a TensorFlow-style model (an explicit ``Pad``, LeakyReLU,
``Max`` with a constant, max pools) end to end against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, topi

import tvm_compress
from tvm_compress.passes import StackReduceToBinary, TeCallsToOps

quiet = lambda m: None  # noqa: E731
SHAPE = (1, 4, 3, 3)


def _function(body, n_inputs=3, shapes=None):
    """main(x0, x1, ...) -> body(bb, inputs) in one dataflow block."""
    shapes = shapes or [SHAPE] * n_inputs
    xs = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(body(bb, xs))
        bb.emit_func_output(out)
    return relax.transform.CanonicalizeBindings()(bb.get())


def _stacked(op, axis=0):
    """The importer's form: every operand broadcast to the output's shape, stacked, reduced."""
    def body(bb, xs):
        parts = [bb.emit(relax.op.broadcast_to(x, relax.ShapeExpr(SHAPE))) for x in xs]
        return bb.emit(op(bb.emit(relax.op.stack(parts, axis=axis)), axis=[axis]))
    return body


@pytest.mark.parametrize("reduce,pairwise", [
    (relax.op.max, lambda bb, xs: bb.emit(relax.op.maximum(bb.emit(relax.op.maximum(xs[0], xs[1])), xs[2]))),
    (relax.op.min, lambda bb, xs: bb.emit(relax.op.minimum(bb.emit(relax.op.minimum(xs[0], xs[1])), xs[2]))),
    (relax.op.sum, lambda bb, xs: bb.emit(relax.op.add(bb.emit(relax.op.add(xs[0], xs[1])), xs[2]))),
    (relax.op.mean, lambda bb, xs: bb.emit(relax.op.divide(
        bb.emit(relax.op.add(bb.emit(relax.op.add(xs[0], xs[1])), xs[2])), relax.const(np.float32(3))))),
])
def test_variadic_reductions_of_stacked_operands_become_pairwise_ops(reduce, pairwise):
    """max(stack(broadcast_to(x0), broadcast_to(x1), broadcast_to(x2)), axis=0) ->
    maximum(maximum(x0, x1), x2): the operands at their own shapes, no stack."""
    shapes = [SHAPE, (1, 4, 1, 1), (1, 1, 1, 1)]

    def importer_form(bb, xs):
        parts = [bb.emit(relax.op.broadcast_to(x, relax.ShapeExpr(SHAPE))) for x in xs]
        return bb.emit(reduce(bb.emit(relax.op.stack(parts, axis=0)), axis=[0]))

    after = relax.transform.CanonicalizeBindings()(StackReduceToBinary()(_function(importer_form, shapes=shapes)))
    tvm.ir.assert_structural_equal(after, _function(pairwise, shapes=shapes))


def test_other_reductions_of_a_stack_stay():
    """Along another axis, or keeping the stacked axis, it is not the importer's form."""
    for before in (_function(_stacked(relax.op.max, axis=1)),
                   _function(lambda bb, xs: bb.emit(relax.op.max(bb.emit(relax.op.stack(xs, axis=0)), axis=[0],
                                                                 keepdims=True)))):
        tvm.ir.assert_structural_equal(StackReduceToBinary()(before), before)


def _te_pad(before, after, value=0.0, shape=(1, 6, 5, 1)):
    return _function(lambda bb, xs: bb.emit_te(topi.nn.pad, xs[0], before, after, value), shapes=[shape])


def test_the_importers_zero_pads_become_relax_pads():
    """call_tir(TOPI pad) of a zero pad -> R.nn.pad with the same widths; each split of the
    same total padding is told apart."""
    for before, after in (([0, 1, 1, 0], [0, 1, 1, 0]), ([0, 2, 0, 0], [0, 0, 2, 0]), ([0, 0, 1, 0], [0, 3, 0, 0])):
        widths = [w for pair in zip(before, after) for w in pair]
        expected = _function(lambda bb, xs, w=widths: bb.emit(relax.op.nn.pad(xs[0], w)), shapes=[(1, 6, 5, 1)])
        tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(TeCallsToOps()(_te_pad(before, after))),
                                       expected)
    # another value: the kernel stays
    kept = TeCallsToOps()(_te_pad([0, 1, 1, 0], [0, 1, 1, 0], value=1.5))
    assert kept["main"].script().count("R.call_tir") == 1


@pytest.mark.parametrize("compute, mode", [
    (lambda t, b, a: topi.nn.mirror_pad(t, b, a, "REFLECT"), "reflect"),  # ONNX Pad mode=reflect
    (topi.nn.replicate_pad, "replicate"),  # mode=edge
])
def test_the_importers_reflect_and_edge_pads_become_relax_pads(compute, mode):
    """call_tir(mirror_pad / replicate_pad) -> R.nn.pad with that mode and the same widths (a
    CycleGAN's reflection pads then no longer keep its convs NCHW); same values."""
    before, after = [0, 0, 2, 1], [0, 0, 1, 3]
    te_form = _function(lambda bb, xs: bb.emit_te(compute, xs[0], before, after), shapes=[(1, 3, 5, 6)])
    expected = _function(lambda bb, xs: bb.emit(relax.op.nn.pad(xs[0], [0, 0, 0, 0, 2, 1, 1, 3], mode)),
                         shapes=[(1, 3, 5, 6)])
    rewritten = relax.transform.CanonicalizeBindings()(TeCallsToOps()(te_form))
    tvm.ir.assert_structural_equal(rewritten, expected)
    x = tvm.runtime.tensor(np.random.default_rng(5).standard_normal((1, 3, 5, 6)).astype("float32"))
    run = lambda m: relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](x).numpy()  # noqa: E731
    np.testing.assert_array_equal(run(rewritten), run(te_form))


def test_a_clip_to_a_bound_computed_from_the_data_becomes_maximum():
    """melspectrogram's ``Clip(x, max(x) - 80)``: the importer's call_tir(maximum) of a 0-d
    variable -> R.maximum(x, bound) (then no kernel of its own keeps the convs NCHW)."""
    def importer_form(bb, xs):
        floor = bb.emit(relax.op.subtract(bb.emit(relax.op.max(xs[0])), relax.const(np.float32(80))))
        return bb.emit_te(topi.maximum, xs[0], floor)

    def as_op(bb, xs):
        floor = bb.emit(relax.op.subtract(bb.emit(relax.op.max(xs[0])), relax.const(np.float32(80))))
        return bb.emit(relax.op.maximum(xs[0], floor))

    after = relax.transform.CanonicalizeBindings()(TeCallsToOps()(_function(importer_form, shapes=[SHAPE])))
    tvm.ir.assert_structural_equal(after, _function(as_op, shapes=[SHAPE]))


def _tf_style_model(path):
    """NHWC input, an explicit Pad, a reshape to NCHW (one channel), then conv blocks as
    TensorFlow exports them (conv -> LeakyReLU -> Max with a (1,1,1,1) constant) with 2x2 and
    1x2 max pools, a Min of three operands and a Mean of two at the end."""
    rng = np.random.default_rng(11)
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def conv_block(x, cin, cout, kernel, pads, name):
        w = const(f"{name}_w", rng.standard_normal((cout, cin, *kernel)).astype("float32") * 0.4)
        b = const(f"{name}_b", rng.standard_normal(cout).astype("float32") * 0.1)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{name}_c"], kernel_shape=list(kernel), pads=pads))
        nodes.append(helper.make_node("LeakyRelu", [f"{name}_c"], [f"{name}_l"], alpha=0.2))
        nodes.append(helper.make_node("Max", [f"{name}_l", "floor"], [f"{name}_m"]))
        return f"{name}_m"

    const("floor", np.full((1, 1, 1, 1), -0.4, "float32"))
    const("pads", np.array([0, 0, 1, 0, 0, 0, 1, 0], "int64"))
    const("nchw", np.array([-1, 1, 32, 18], "int64"))
    nodes.append(helper.make_node("Pad", ["x", "pads"], ["padded"]))
    nodes.append(helper.make_node("Reshape", ["padded", "nchw"], ["x_nchw"]))
    y = conv_block("x_nchw", 1, 16, (3, 3), [0, 0, 0, 0], "c1")            # 30 x 16
    y = conv_block(y, 16, 16, (1, 3), [0, 1, 0, 1], "c2")
    nodes.append(helper.make_node("MaxPool", [y], ["p1"], kernel_shape=[2, 2], strides=[2, 2]))  # 15 x 8
    y = conv_block("p1", 16, 24, (3, 1), [1, 0, 1, 0], "c3")
    nodes.append(helper.make_node("MaxPool", [y], ["p2"], kernel_shape=[1, 2], strides=[1, 2]))  # 15 x 4
    a = conv_block("p2", 24, 24, (1, 3), [0, 1, 0, 1], "c4")
    b = conv_block(a, 24, 24, (3, 1), [1, 0, 1, 0], "c5")
    const("ceiling", np.full((1, 24, 1, 1), 0.8, "float32"))
    nodes.append(helper.make_node("Min", [a, b, "ceiling"], ["low"]))
    nodes.append(helper.make_node("Mean", ["low", b], ["y"]))
    graph = helper.make_graph(nodes, "tf_style", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 16, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 15, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_a_tensorflow_style_model_goes_channels_last_with_its_pools_in_the_convs(tmp_path):
    """No constant is materialized at a feature map's size (the weights stay the model's), no
    kernel is left of the importer's pad or stacks, the convs go channels-last with their
    LeakyReLU and ``Max`` epilogues, both pools are taken by their convs, and the library
    matches onnxruntime."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    model = _tf_style_model(tmp_path / "tf_style.onnx")
    imported = load_onnx(model)
    text = imported.script()
    assert "R.call_tir" not in text and "R.stack" not in text and "R.broadcast_to" not in text
    profile = get_target("x86-avx2")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(imported)
    kernels = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not [k for k in kernels if "pool" in k], kernels
    # one transpose: the output's, back to NCHW
    assert len([k for k in kernels if "transpose" in k]) == 1, kernels
    rep = tvm_compress.compile(model, tmp_path / "tf.so", target="x86-avx2", bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC" and rep["conv_layout"]["nchw_convs"] == 0
    assert rep["weight_bytes_after"] <= sum(numpy_helper.to_array(t).nbytes for t in onnx.load(model).graph.initializer)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
