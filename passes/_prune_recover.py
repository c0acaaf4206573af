"""Recovery after channel pruning, without training: the layers that lost input channels are
re-fitted, one after the other in graph order, to what the original model computed on
calibration data.

``bn``: a layer's outputs get the original per-channel mean and spread back: the scale folds
into its weights, the shift becomes an add after it (the batch-norm statistics of a folded
model, re-estimated). ``lstsq``: the layer's weights (and a bias) become the least-squares map
from the pruned model's inputs of the layer to the original model's outputs of it (He et al.
2017), regularized towards the pruned weights, so that a layer with few calibration rows
(a dense layer sees one row per sample) stays close to what it was.

Layers are fitted in graph order on the pruned model as already repaired upstream: the
weights and biases of the layers being fitted are runtime parameters of one host build, so
each layer costs one run over the calibration samples, not a compilation. The report gives
the model's output error on held-out samples before and after.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.layers import layer_name, op_kind, with_layer
from tvm_compress.relax_utils import const, const_value, copy_module, emit_like, is_constant, tensor_shape

from ._host import expose, flatten, host_run

# Rows of a least-squares system (pixels x samples), at most.
_MAX_ROWS = 16384
_RIDGE = 1e-3


def _layer_bindings(func: relax.Function) -> Dict[str, tuple]:
    """Named layer (conv/matmul with a constant weight) -> (binding var, call), in graph order."""
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


def _channel_axis(call, ndim: int) -> int:
    return 1 if op_kind(call) != "matmul" else ndim - 1


def recover(original, pruned, data, method: str, eval_samples: int, log, kept_outputs=None):
    """(recovered module, report). ``method`` ``none`` only measures the error;
    ``kept_outputs``: layer -> the output channels it kept (layers that lost some)."""
    orig_layers = _layer_bindings(original["main"])
    new_layers = _layer_bindings(pruned["main"])
    targets = [n for n, (_, c) in new_layers.items()
               if n in orig_layers and _in_channels(c) != _in_channels(orig_layers[n][1])
               and int(getattr(c.attrs, "groups", 1) or 1) == 1]
    n_eval = min(eval_samples, max(1, data.count // 4)) if data.count > 1 else 0
    fit_idx, eval_idx = np.arange(data.count - n_eval), np.arange(data.count - n_eval, data.count)
    check_idx = eval_idx if eval_idx.size else fit_idx
    names = [p.name for p in original["main"].params]
    report = {"method": method, "layers": targets, "fit_samples": int(fit_idx.size),
              "eval_samples": int(eval_idx.size), "source": data.source}
    report["output_error_before"] = _output_error(original, pruned, data, check_idx, names)
    if method == "none" or not targets:
        log(f"prune: output error {report['output_error_before']:.4g} (relative L2 vs the unpruned "
            f"model, {check_idx.size} samples)")
        return pruned, report

    # what the original model computes at each fitted layer (its kept channels)
    y_orig = _capture(original, [orig_layers[n][0] for n in targets], data, fit_idx, names)
    for k, name in enumerate(targets):
        if name in (kept_outputs or {}):
            call = new_layers[name][1]
            y_orig[k] = np.take(y_orig[k], kept_outputs[name], axis=_channel_axis(call, y_orig[k].ndim))

    fitting = _Parametrized(pruned, targets)
    run = host_run(fitting.module)
    for k, name in enumerate(targets):
        _, call = new_layers[name]
        x, y = fitting.capture(run, name, data, fit_idx, names)
        if method == "bn":
            fitting.params[name] = _refit_bn(call, fitting.params[name], y, y_orig[k])
        else:
            fitting.params[name] = _refit_lstsq(call, fitting.params[name], x, y_orig[k])
    out = _apply(pruned, fitting.params)
    report["output_error_after"] = _output_error(original, out, data, check_idx, names)
    log(f"prune: recovery {method} on {len(targets)} layers: output error "
        f"{report['output_error_before']:.4g} -> {report['output_error_after']:.4g} (relative L2 vs "
        f"the unpruned model, {check_idx.size} held-out samples)")
    return out, report


class _Parametrized:
    """The pruned model with each fitted layer's weight and a bias after it as parameters of
    ``main`` (after the model's inputs), and each fitted layer's input and output exposed."""

    def __init__(self, pruned, targets: List[str]):
        layers = _layer_bindings(pruned["main"])
        self.targets = targets
        self.params = {}
        for name in targets:
            call = layers[name][1]
            w = const_value(call.args[1])
            out_c = tensor_shape(call)[_channel_axis(call, len(tensor_shape(call)))]
            self.params[name] = (w, np.zeros(out_c, np.float32))
        param_vars = {n: (relax.Var(f"w{k}", relax.TensorType(self.params[n][0].shape, "float32")),
                          relax.Var(f"b{k}", relax.TensorType(self.params[n][1].shape, "float32")))
                      for k, n in enumerate(targets)}

        @mutator
        class _Lift(PyExprMutator):
            def __init__(self, mod):
                super().__init__(mod)
                self.exposed = []

            def visit_var_binding_(self, binding):
                call = binding.value
                name = layer_name(call) if isinstance(call, relax.Call) else None
                if name not in param_vars:
                    super().visit_var_binding_(binding)
                    return
                w, b = param_vars[name]
                x = self.visit_expr(call.args[0])
                y = self.builder_.emit(relax.Call(call.op, [x, w], call.attrs, call.ty_args))
                shape = [1] * len(tensor_shape(call))
                shape[_channel_axis(call, len(shape))] = -1
                out = emit_like(self.builder_, binding.var, relax.op.add(y, relax.op.reshape(b, shape)))
                self.set_var_remap(binding.var, out)
                self.exposed.extend([(name, "x", x), (name, "y", y)])

        mod = copy_module(pruned)
        lift = _Lift(mod)
        func = lift.visit_expr(pruned["main"])
        extra = [v for n in targets for v in param_vars[n]]
        func = relax.Function(list(func.params) + extra, func.body, func.ret_ty, func.is_pure, func.attrs)
        if func.attrs is not None and "num_input" in func.attrs:
            func = func.with_attr("num_input", len(func.params))
        lift.builder_.update_func(mod.get_global_var("main"), func)
        self.exposed = lift.exposed  # (layer, "x" | "y", var)
        self.param_names = [p.name for p in func.params]
        self.module, self.order = expose(lift.builder_.get(), [v for _, _, v in lift.exposed])
        self.batch = _batch(pruned)

    def capture(self, run, name, data, idx, names):
        """(inputs, outputs) of layer ``name`` on samples ``idx`` with the current parameters."""
        extra = [a for n in self.targets for a in self.params[n]]
        outs = _run_all(run, data, idx, names, self.batch, extra)
        n_model = len(outs[0]) - len(self.order)
        got = {}
        for layer, kind, var in self.exposed:
            if layer != name:
                continue
            if var.name in self.param_names and not any(v.same_as(var) for v in self.order):
                got[kind] = np.concatenate([data.inputs[var.name][idx]])  # a model input
            else:
                k = next(i for i, v in enumerate(self.order) if v.same_as(var))
                got[kind] = np.concatenate([o[n_model + k] for o in outs])
        return got["x"], got["y"]


def _batch(mod) -> int:
    shape = tensor_shape(mod["main"].params[0])
    return int(shape[0]) if shape else 1


def _run_all(run, data, idx, names, batch: int, extra=()) -> List[List[np.ndarray]]:
    """Outputs of ``run`` per batch of the samples ``idx`` (a short last batch is padded with
    its last sample, and the padding cut from batch-major outputs)."""
    outs = []
    for start in range(0, len(idx), batch):
        sel = idx[start:start + batch]
        take = len(sel)
        sel = np.concatenate([sel, np.repeat(sel[-1:], batch - take)])
        res = flatten(run(*[data.inputs[n][sel] for n in names], *extra))
        outs.append([r[:take] if r.ndim and r.shape[0] == batch else r for r in res])
    return outs


def _capture(mod, vars_, data, idx, names) -> List[np.ndarray]:
    """The values of ``vars_`` of ``main`` on the samples ``idx`` (concatenated on axis 0)."""
    exposed, order = expose(mod, vars_)
    outs = _run_all(host_run(exposed), data, idx, names, _batch(mod))
    n_model = len(outs[0]) - len(order)
    return [np.concatenate([o[n_model + next(i for i, v in enumerate(order) if v.same_as(w))] for o in outs])
            for w in vars_]


def _refit_bn(call, params, y: np.ndarray, y_orig: np.ndarray):
    """Scale and shift so that the layer's outputs get the original per-channel mean/spread."""
    w, b = params
    axis = _channel_axis(call, y_orig.ndim)
    red = tuple(a for a in range(y_orig.ndim) if a != axis)
    mu_o, sd_o = y_orig.mean(axis=red), y_orig.std(axis=red)
    mu_p, sd_p = y.mean(axis=red), y.std(axis=red)
    scale = np.where(sd_p > 1e-8, sd_o / np.maximum(sd_p, 1e-8), 1.0)
    shift = mu_o - scale * mu_p
    w = w * (scale.reshape(-1, *([1] * (w.ndim - 1))) if op_kind(call) != "matmul" else scale[None, :])
    return w.astype(np.float32), shift.astype(np.float32)


def _patches(x: np.ndarray, call) -> np.ndarray:
    """im2col of NCHW (or NCW) ``x`` for the conv ``call``: rows = output pixels, cols = the
    weight's (C, kh, kw) order."""
    attrs = call.attrs
    w_shape = const_value(call.args[1]).shape
    if x.ndim == 3:  # conv1d: H = 1
        x = x[:, :, None, :]
        kh, kw, sh, sw, dh, dw = 1, w_shape[2], 1, int(attrs.strides[0]), 1, int(attrs.dilation[0])
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


def _refit_lstsq(call, params, x: np.ndarray, y_orig: np.ndarray):
    """Weights and bias mapping the layer's current inputs to the original outputs, ridge
    towards the current weights (strongly where rows are few against the unknowns)."""
    w0, b0 = params
    if op_kind(call) == "matmul":
        a = x.reshape(-1, x.shape[-1]).astype(np.float64)
        t = y_orig.reshape(-1, y_orig.shape[-1]).astype(np.float64)
        prior = np.concatenate([w0, b0[None, :]]).astype(np.float64)  # [K + 1, N]
    else:
        a = _patches(x, call).astype(np.float64)
        t = np.moveaxis(y_orig, 1, -1).reshape(-1, y_orig.shape[1]).astype(np.float64)
        prior = np.concatenate([w0.reshape(w0.shape[0], -1).T, b0[None, :]]).astype(np.float64)
    if a.shape[0] > _MAX_ROWS:
        rows = np.random.default_rng(0).choice(a.shape[0], _MAX_ROWS, replace=False)
        a, t = a[rows], t[rows]
    a1 = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    gram = a1.T @ a1
    lam = _RIDGE * np.trace(gram) / gram.shape[0] * max(1.0, gram.shape[0] / a1.shape[0])
    gram[np.diag_indices_from(gram)] += lam
    sol = np.linalg.solve(gram, a1.T @ t + lam * prior)
    weight, bias = sol[:-1], sol[-1]
    if op_kind(call) == "matmul":
        return weight.astype(np.float32), bias.astype(np.float32)
    return weight.T.reshape(w0.shape).astype(np.float32), bias.astype(np.float32)


def _apply(mod, params: Dict[str, tuple]):
    """Each fitted layer with its new weight and, after it, an add of its bias."""

    @mutator
    class _Fix(PyExprMutator):
        def visit_var_binding_(self, binding):
            call = binding.value
            name = layer_name(call) if isinstance(call, relax.Call) else None
            if name not in params:
                super().visit_var_binding_(binding)
                return
            weight, bias = params[name]
            args = [self.visit_expr(call.args[0]), const(np.ascontiguousarray(weight))]
            y = self.builder_.emit(with_layer(relax.Call(call.op, args, call.attrs, call.ty_args), name))
            shape = [1] * len(tensor_shape(call))
            shape[_channel_axis(call, len(shape))] = -1
            out = with_layer(relax.op.add(y, const(bias.reshape(shape))), name)
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, out))

    out = copy_module(mod)
    out["main"] = _Fix(out).visit_expr(mod["main"])
    return out


def _output_error(reference, mod, data, idx, names) -> float:
    ref = _run_all(host_run(reference), data, idx, names, _batch(reference))
    got = _run_all(host_run(mod), data, idx, names, _batch(mod))
    worst = 0.0
    for k in range(len(ref[0])):
        a = np.concatenate([g[k].reshape(-1) for g in got]).astype(np.float64)
        b = np.concatenate([r[k].reshape(-1) for r in ref]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)))
    return worst
