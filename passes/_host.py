"""Running a Relax module on the host CPU for measurements (calibration ranges, recovery
statistics, sensitivities), and exposing intermediate values as extra outputs of ``main``."""

from __future__ import annotations

from typing import List

import numpy as np
import tvm
from tvm import relax

from tvm_compress import host_build

# from this many MACs the host copy gets the default CPU schedule first (``host_build``)
SCHEDULE_FROM_MACS = host_build.SCHEDULE_FROM_MACS


def host_run(mod: tvm.IRModule):
    """Compile ``mod`` for the host CPU and return ``main`` as a numpy -> numpy callable."""
    ex = host_build.host_executable(mod, SCHEDULE_FROM_MACS)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    fn = vm["main"]

    def run(*arrays):
        return _to_numpy(fn(*[tvm.runtime.tensor(np.asarray(a, order="C")) for a in arrays]))

    return run


def _to_numpy(obj):
    if hasattr(obj, "numpy"):
        return obj.numpy()
    return [_to_numpy(o) for o in obj]


def flatten(obj) -> List[np.ndarray]:
    """The arrays of a (nested) result, depth first."""
    if isinstance(obj, np.ndarray):
        return [obj]
    out = []
    for o in obj:
        out.extend(flatten(o))
    return out


def with_outputs(func: relax.Function, extra: List[relax.Var], params=None) -> relax.Function:
    """``func`` returning ``(its result, (extra...))``; ``extra`` must be visible at the end of
    the function (block outputs, not dataflow vars)."""
    body = func.body
    new_body = relax.SeqExpr(body.blocks, relax.Tuple([body.body, relax.Tuple(list(extra))]))
    return rebuild(func, new_body, list(func.params) if params is None else params)


def rebuild(func: relax.Function, body, params) -> relax.Function:
    body = relax.BlockBuilder().normalize(body)
    new = relax.Function(params, body, None, func.is_pure, func.attrs)
    if func.attrs is not None and "num_input" in func.attrs:
        new = new.with_attr("num_input", len(params))
    return new


def expose(mod: tvm.IRModule, wanted) -> tuple:
    """``mod`` whose ``main`` also returns the values bound to the vars in ``wanted`` (an
    iterable of Vars of ``main``), in binding order; returns (module, the vars in that order)."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    wanted = list(wanted)
    order: List[tuple] = []

    @mutator
    class _Expose(PyExprMutator):
        def visit_var_binding_(self, binding):
            super().visit_var_binding_(binding)
            if any(binding.var.same_as(w) for w in wanted):
                new = self.get_var_remap(binding.var)
                new = binding.var if new is None else new
                if isinstance(new, relax.DataflowVar):
                    # a block output, visible at the end of the function
                    new = self.builder_.emit_output(new)
                    self.set_var_remap(binding.var, new)
                order.append((binding.var, new))

    exposer = _Expose(mod)
    func = with_outputs(exposer.visit_expr(mod["main"]), [new for _, new in order])
    exposer.builder_.update_func(mod.get_global_var("main"), func)
    return exposer.builder_.get(), [old for old, _ in order]
