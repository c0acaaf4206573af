"""Recovery after channel pruning, without training: the layers that lost input channels are
re-fitted to what the original model computed on calibration data.

``bn``: each such layer's outputs get the original per-channel mean and spread back: the
scale folds into its weights, the shift becomes an add after it (the batch-norm statistics
of a folded model, re-estimated). ``lstsq``: each such layer's weights (and a bias) are the
least-squares solution that maps the pruned model's inputs of the layer to the original
model's outputs of it (He et al. 2017, "channel pruning ... by least squares"). Both fit on the
first calibration samples and report the model's output error on held-out ones.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import layer_name, op_kind, with_layer
from tvm_compress.relax_utils import const, const_value, copy_module, emit_like, is_constant, tensor_shape

from ._host import expose, flatten, host_run

# Rows of the least-squares systems (pixels x samples), at most: enough for the few hundred
# unknowns of a layer, small enough for numpy on 2 cores.
_MAX_ROWS = 16384
_RIDGE = 1e-3


def _layer_bindings(func: relax.Function) -> Dict[str, Tuple[relax.Var, relax.Call]]:
    """Named layer (conv/matmul with a constant weight) -> its binding var and call."""
    out = {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(b, relax.VarBinding) and op_kind(v) in ("conv1d", "conv2d", "matmul") \
                    and layer_name(v) and is_constant(v.args[1]):
                out[layer_name(v)] = (b.var, v)
    return out


def _in_channels(call) -> int:
    shape = tensor_shape(call.args[0])
    return shape[1] if op_kind(call) != "matmul" else shape[-1]


def recover(original, pruned, data, method: str, eval_samples: int, log, kept_outputs=None):
    """(recovered module, report). ``method`` ``none`` only measures the error;
    ``kept_outputs``: layer -> the output channels it kept (layers that lost some)."""
    orig_layers = _layer_bindings(original["main"])
    new_layers = _layer_bindings(pruned["main"])
    targets = [n for n, (_, c) in new_layers.items()
               if n in orig_layers and _in_channels(c) != _in_channels(orig_layers[n][1])
               and int(getattr(c.attrs, "groups", 1) or 1) == 1]
    n_eval = min(eval_samples, max(1, data.count // 4))
    if data.count - n_eval < 1:
        n_eval = 0
    fit_idx, eval_idx = np.arange(data.count - n_eval), np.arange(data.count - n_eval, data.count)
    names = [p.name for p in original["main"].params]
    report = {"method": method, "layers": targets, "fit_samples": int(fit_idx.size),
              "eval_samples": int(eval_idx.size), "source": data.source}
    error_before = _output_error(original, pruned, data, eval_idx if eval_idx.size else fit_idx, names)
    report["output_error_before"] = error_before
    if method == "none" or not targets:
        log(f"prune: output error {error_before:.4g} (relative L2 vs the unpruned model, "
            f"{report['eval_samples'] or report['fit_samples']} samples)")
        return pruned, report
    y_orig = _capture(original, [orig_layers[n][0] for n in targets], data, fit_idx, names)
    x_pruned = _capture_inputs(pruned, [new_layers[n] for n in targets], data, fit_idx, names)
    y_pruned = _capture(pruned, [new_layers[n][0] for n in targets], data, fit_idx, names) \
        if method == "bn" else None
    fixes = {}
    for k, name in enumerate(targets):
        _, call = new_layers[name]
        if name in (kept_outputs or {}):  # compare the channels the layer still has
            axis = 1 if op_kind(call) != "matmul" else y_orig[k].ndim - 1
            y_orig[k] = np.take(y_orig[k], kept_outputs[name], axis=axis)
        if method == "bn":
            fixes[name] = _refit_bn(call, y_orig[k], y_pruned[k])
        else:
            fixes[name] = _refit_lstsq(call, x_pruned[k], y_orig[k])
    out = _apply(pruned, fixes)
    error_after = _output_error(original, out, data, eval_idx if eval_idx.size else fit_idx, names)
    report["output_error_after"] = error_after
    log(f"prune: recovery {method} on {len(targets)} layers: output error {error_before:.4g} -> "
        f"{error_after:.4g} (relative L2 vs the unpruned model, held-out samples)")
    return out, report


def _run_all(mod, data, idx, names) -> List[List[np.ndarray]]:
    run = host_run(mod)
    batch = int(tensor_shape(mod["main"].params[0])[0]) if tensor_shape(mod["main"].params[0]) else 1
    outs = []
    for start in range(0, len(idx), batch):
        sel = idx[start:start + batch]
        if len(sel) < batch:
            sel = np.concatenate([sel, np.repeat(sel[-1:], batch - len(sel))])
        feed = [data.inputs[n][sel] for n in names]
        res = run(*feed)
        take = min(batch, len(idx) - start)
        outs.append([r[:take] if r.ndim and r.shape[0] == batch else r for r in flatten(res)])
    return outs


def _capture(mod, vars_, data, idx, names) -> List[np.ndarray]:
    """The values of ``vars_`` of ``main`` on the samples ``idx`` (concatenated on axis 0)."""
    exposed, order = expose(mod, vars_)
    runs = _run_all(exposed, data, idx, names)
    n_out = len(runs[0]) - len(order)  # the model's own outputs come first
    out = []
    for v in vars_:
        k = next(i for i, o in enumerate(order) if o.same_as(v))
        out.append(np.concatenate([r[n_out + k] for r in runs]))
    return out


def _capture_inputs(mod, layers, data, idx, names) -> List[np.ndarray]:
    """The data inputs of the given (var, call) layers."""
    ins = [call.args[0] for _, call in layers]
    return _capture(mod, ins, data, idx, names) if all(isinstance(v, relax.Var) for v in ins) else \
        [None] * len(layers)


def _refit_bn(call, y_orig: np.ndarray, y_pruned: np.ndarray):
    axis = 1 if op_kind(call) != "matmul" else y_orig.ndim - 1
    red = tuple(a for a in range(y_orig.ndim) if a != axis)
    mu_o, sd_o = y_orig.mean(axis=red), y_orig.std(axis=red)
    mu_p, sd_p = y_pruned.mean(axis=red), y_pruned.std(axis=red)
    scale = np.where(sd_p > 1e-8, sd_o / np.maximum(sd_p, 1e-8), 1.0)
    shift = mu_o - scale * mu_p
    w = const_value(call.args[1]).astype(np.float64)
    w = w * (scale.reshape(-1, *([1] * (w.ndim - 1))) if op_kind(call) != "matmul" else scale[None, :])
    return w.astype(np.float32), shift.astype(np.float32)


def _patches(x: np.ndarray, call) -> np.ndarray:
    """im2col of NCHW ``x`` for conv2d/conv1d ``call``: rows = output pixels, cols = C*kh*kw
    in the weight's (C, kh, kw) order."""
    attrs = call.attrs
    w_shape = const_value(call.args[1]).shape
    if x.ndim == 3:  # conv1d: treat as H = 1
        x = x[:, :, None, :]
        kh, kw = 1, w_shape[2]
        sh, sw = 1, int(attrs.strides[0])
        dh, dw = 1, int(attrs.dilation[0])
        pad = [0, int(attrs.padding[0]), 0, int(attrs.padding[1])]
    else:
        kh, kw = w_shape[2:]
        sh, sw = (int(v) for v in attrs.strides)
        dh, dw = (int(v) for v in attrs.dilation)
        pad = [int(v) for v in attrs.padding]  # top, left, bottom, right
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    n, c, h, w = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def _refit_lstsq(call, x: Optional[np.ndarray], y_orig: np.ndarray):
    """Weights (and bias) mapping the pruned inputs to the original outputs."""
    if x is None:
        return None
    if op_kind(call) == "matmul":
        a = x.reshape(-1, x.shape[-1]).astype(np.float64)
        b = y_orig.reshape(-1, y_orig.shape[-1]).astype(np.float64)
    else:
        a = _patches(x, call).astype(np.float64)
        b = np.moveaxis(y_orig, 1, -1).reshape(-1, y_orig.shape[1]).astype(np.float64)
    if a.shape[0] > _MAX_ROWS:
        rows = np.random.default_rng(0).choice(a.shape[0], _MAX_ROWS, replace=False)
        a, b = a[rows], b[rows]
    a1 = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    # ridge, scaled to the inputs: keeps nearly dependent columns from blowing up
    gram = a1.T @ a1
    gram[np.diag_indices_from(gram)] += _RIDGE * (np.trace(gram) / gram.shape[0])
    sol = np.linalg.solve(gram, a1.T @ b)  # [features + 1, out]
    weight, bias = sol[:-1], sol[-1]
    w_shape = const_value(call.args[1]).shape
    if op_kind(call) == "matmul":
        return weight.astype(np.float32), bias.astype(np.float32)
    return weight.T.reshape(w_shape).astype(np.float32), bias.astype(np.float32)


def _apply(mod, fixes: Dict[str, Optional[tuple]]):
    """Each fixed layer gets its new weight and, after it, an add of its new bias."""

    @mutator
    class _Fix(PyExprMutator):
        def visit_var_binding_(self, binding):
            call = binding.value
            name = layer_name(call) if isinstance(call, relax.Call) else None
            fix = fixes.get(name) if name else None
            if fix is None:
                super().visit_var_binding_(binding)
                return
            weight, shift = fix
            args = [self.visit_expr(call.args[0]), const(np.ascontiguousarray(weight))]
            y = self.builder_.emit(with_layer(relax.Call(call.op, args, call.attrs, call.ty_args), name))
            shape = [1] * len(tensor_shape(call))
            axis = 1 if op_kind(call) != "matmul" else len(shape) - 1
            shape[axis] = -1
            out = with_layer(relax.op.add(y, const(shift.reshape(shape))), name)
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, out))

    out = copy_module(mod)
    fixer = _Fix(out)
    out["main"] = fixer.visit_expr(mod["main"])
    return out


def _output_error(reference, mod, data, idx, names) -> float:
    ref = _run_all(reference, data, idx, names)
    got = _run_all(mod, data, idx, names)
    worst = 0.0
    for k in range(len(ref[0])):
        a = np.concatenate([g[k].reshape(-1) for g in got]).astype(np.float64)
        b = np.concatenate([r[k].reshape(-1) for r in ref]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)))
    return worst
