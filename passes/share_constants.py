"""ShareConstants: equal tensor constants of a module -> one constant object.

Needs: any Relax module. Runs last in lowering (``pipeline.lowering_passes``), after the kernel
hooks packed their weights: a layer whose one weight is read at many call sites (an unrolled
LSTM's recurrent matrix, once per time step, ``tvm_compress.onnx_rnn``) gets a packed copy per
call, equal in every byte. The library stores each distinct constant object once, and the
report counts them the same way (``relax_utils.constants``), so equal copies become one object.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.relax_utils import content_key, is_constant, relax_functions


@mutator
class _Share(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.first = {}
        self.shared = 0

    def visit_generic_const_(self, op):
        if not is_constant(op):
            return op
        first = self.first.setdefault(content_key(op.value.numpy()), op)
        if first is not op and not first.same_as(op):
            self.shared += 1
        return first


@tvm.transform.module_pass(opt_level=0, name="ShareConstants")
class ShareConstants:
    """Replace every tensor constant by the first one equal to it (dtype, shape, bytes)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        share = _Share(mod)
        for gv, func in relax_functions(mod):
            share.builder_.update_func(gv, share.visit_expr(func))
        return share.builder_.get() if share.shared else mod
