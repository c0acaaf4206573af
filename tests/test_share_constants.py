"""ShareConstants (passes/share_constants.py): equal constants become one object."""

import numpy as np
import tvm
from tvm import relax

from tvm_compress.passes import ShareConstants
from tvm_compress.relax_utils import constants, is_constant
from tvm_compress.layers import weight_stats


def _module(w, copies):
    """x @ w1 + x @ w2 + ...: each product reads its own constant object."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = None
            for c in copies:
                y = bb.emit(relax.op.matmul(x, relax.const(c)))
                acc = y if acc is None else bb.emit(relax.op.add(acc, y))
            gv = bb.emit_output(acc)
        bb.emit_func_output(gv)
    return bb.get()


def _constant_args(mod):
    args = []
    relax.analysis.post_order_visit(mod["main"], lambda e: args.extend(
        a for a in e.args if is_constant(a)) if isinstance(e, relax.Call) else None)
    return args


def test_equal_constants_become_one_object_others_stay():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype("float32")
    other = w.copy()
    other[3, 2] += 1.0
    mod = _module(w, [w.copy(), w.copy(), other, w.astype("float64").astype("float32")])
    assert len({hash(a) for a in _constant_args(mod)}) == 4
    # the report counts equal constants once, as the library stores them after this pass
    assert len(constants(mod)) == 2 and weight_stats(mod)["bytes"] == 2 * w.nbytes
    shared = ShareConstants()(mod)
    tvm.ir.assert_structural_equal(shared, mod)  # the same program
    args = _constant_args(shared)
    assert args[0].same_as(args[1]) and args[0].same_as(args[3]) and not args[0].same_as(args[2])
    f = tvm.compile(shared, "llvm")
    x = rng.standard_normal((2, 8)).astype("float32")
    got = relax.VirtualMachine(f, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ w * 3 + x @ other, rtol=1e-5)


def test_module_without_duplicates_is_returned_as_is():
    mod = _module(np.ones((4, 4), "float32"), [np.ones((4, 4), "float32")])
    assert ShareConstants()(mod).same_as(mod)
