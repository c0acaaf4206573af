"""LowRank: split dense and convolution layers into thinner factors where that is measured
faster, and the ``lowrank`` preset with its CLI flags.

Needs: a float Relax module from the importer (layers named by ``tvm_compress.layers``); with
``calib`` data for the whitened method. Runs after import, before ``quantize`` (which then
quantizes the factors); rewrites every Relax function. No fine-tuning.

- dense / matmul with a constant weight ``W [K, N]``: ``x @ W`` becomes ``(x @ A) @ B`` with
  ``A [K, r]``, ``B [r, N]`` (a bias stays after ``B``);
- conv2d (one group), ``channel``: a KxK convolution with ``r`` filters, then a 1x1 one to the
  outputs; ``tucker2`` (Kim et al. 2016): 1x1 to ``r_in`` channels, a KxK core to ``r_out``,
  1x1 to the outputs. Grouped and depthwise convolutions are left alone.

Ranks come from the kept spectral energy (``energy``), a parameter budget per layer
(``ratio``) or a fixed ``rank``, rounded up to whole vectors of the target
(``PassEnv.facts.vector_lanes``). ``whitened`` (SVD-LLM) factors ``L^T W`` where ``L L^T`` is
the Gram matrix of the layer's inputs on calibration data, so the truncation minimises the
layer's output error on that data rather than the weight's; ``svd`` factors ``W`` itself.
A layer is split only when the split has fewer MACs and its kernels, timed on the target
(``PassEnv.measure``), beat the original by ``min_speedup``; where the target cannot be timed
here, the MAC ratio stands in for the speed-up, and the report says so. The report gives each
layer's rank, energy kept, weight error, output error on held-out calibration data and the two
kernels' times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.calib_data import CalibDataConfig, load_calibration
from tvm_compress.console import Progress
from tvm_compress.errors import PassOptionError
from tvm_compress.layers import layer_name, op_kind, with_layer
from tvm_compress.pass_registry import PassEnv, PassPreset, register_pass
from tvm_compress.relax_utils import const, const_value, copy_module, emit_like, is_constant, relax_functions, tensor_shape

from ._host import expose, flatten, host_run
from ._prune_recover import _patches

METHODS = ("auto", "svd", "whitened")
CONV_MODES = ("channel", "tucker2")
# Calibration rows (pixels x samples) per layer for the input Gram matrices, at most.
_MAX_ROWS = 32768


@dataclass(frozen=True)
class LowRankConfig(CalibDataConfig):
    """energy: spectral energy kept, in (0, 1] (default 0.99 when neither ratio nor rank is
    given); ratio: parameters of the split over the original's, in (0, 1); rank: a fixed rank;
    method: ``svd``, ``whitened`` or ``auto`` (whitened when calibration data is given);
    conv: ``channel`` or ``tucker2``; skip: layers left alone (names); min_speedup: the split
    must be measured this much faster (0: split every layer, unmeasured, even without fewer MACs)."""

    energy: Optional[float] = None
    ratio: Optional[float] = None
    rank: Optional[int] = None
    method: str = "auto"
    conv: str = "channel"
    skip: Tuple[str, ...] = ()
    min_speedup: float = 1.05
    eval_samples: int = 16

    def __post_init__(self):
        given = [n for n, v in (("--lowrank-energy", self.energy), ("--lowrank-ratio", self.ratio),
                                ("--lowrank-rank", self.rank)) if v is not None]
        if len(given) > 1:
            raise PassOptionError(f"lowrank: give one of {' / '.join(given)}, not both")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise PassOptionError(f"--lowrank-energy must be in (0, 1], got {self.energy}")
        if self.ratio is not None and not 0.0 < float(self.ratio) < 1.0:
            raise PassOptionError(f"--lowrank-ratio must be in (0, 1), got {self.ratio}")
        if self.rank is not None and int(self.rank) < 1:
            raise PassOptionError(f"--lowrank-rank must be >= 1, got {self.rank}")
        if self.method not in METHODS:
            raise PassOptionError(f"--lowrank-method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.conv not in CONV_MODES:
            raise PassOptionError(f"--lowrank-conv must be one of {', '.join(CONV_MODES)}, got {self.conv!r}")
        if float(self.min_speedup) < 0:
            raise PassOptionError(f"--lowrank-min-speedup must be >= 0, got {self.min_speedup}")

    @property
    def whitened(self) -> bool:
        return self.method == "whitened" or (self.method == "auto" and self.calib is not None)

    def needs_calibration(self, model) -> bool:
        return self.method == "whitened"


@dataclass
class _Layer:
    name: str
    var: relax.Var
    call: relax.Call
    kind: str  # "matmul" | "conv2d"
    weight: np.ndarray  # matmul [K, N]; conv [O, C, kh, kw]


def _layers(func: relax.Function) -> List[_Layer]:
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            kind = op_kind(call) if isinstance(b, relax.VarBinding) else None
            if kind not in ("matmul", "conv2d") or not is_constant(call.args[1]) or not layer_name(call):
                continue
            w = const_value(call.args[1])
            if kind == "matmul" and w.ndim != 2:
                continue
            if kind == "conv2d" and (int(call.attrs.groups) != 1 or str(call.attrs.kernel_layout) != "OIHW"
                                     or str(call.attrs.data_layout) != "NCHW"):
                continue
            out.append(_Layer(layer_name(call), b.var, call, kind, w))
    return out


def _round_rank(r: int, lanes: int, limit: int) -> int:
    return int(min(limit, max(1, -(-max(1, r) // lanes) * lanes)))


def _rank(s: np.ndarray, cfg: LowRankConfig, params_full: int, params_per_rank: int, lanes: int) -> int:
    limit = len(s)
    if cfg.rank is not None:
        r = int(cfg.rank)
    elif cfg.ratio is not None:
        r = int(cfg.ratio * params_full // params_per_rank)
        if r < 1:
            raise PassOptionError(
                f"--lowrank-ratio {cfg.ratio} leaves a rank < 1 for a layer of {params_full} parameters")
    else:
        energy = 0.99 if cfg.energy is None else float(cfg.energy)
        cum = np.cumsum(s.astype(np.float64) ** 2)
        r = int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)) + 1)
    return _round_rank(r, lanes, limit)


def factor_dense(w: np.ndarray, rank: int, gram: Optional[np.ndarray] = None):
    """``w [K, N]`` -> (A [K, r], B [r, N], singular values, energy kept): plain SVD, or whitened
    by the input Gram matrix ``gram [K, K]`` (SVD-LLM)."""
    w = w.astype(np.float64)
    if gram is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a, b = u[:, :rank] * s[:rank], vt[:rank]
    else:
        lower = _cholesky(gram)
        u, s, vt = np.linalg.svd(lower.T @ w, full_matrices=False)
        a = np.linalg.solve(lower.T, u[:, :rank] * s[:rank])
        b = vt[:rank]
    energy = float((s[:rank] ** 2).sum() / max((s ** 2).sum(), 1e-30))
    return a.astype(np.float32), b.astype(np.float32), s, energy


def _cholesky(gram: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a Gram matrix, damped until it is positive definite."""
    gram = gram.astype(np.float64)
    damp = 1e-6 * max(np.trace(gram) / gram.shape[0], 1e-12)
    for _ in range(8):
        try:
            return np.linalg.cholesky(gram + damp * np.eye(gram.shape[0]))
        except np.linalg.LinAlgError:
            damp *= 10
    return np.linalg.cholesky(gram + damp * np.eye(gram.shape[0]))


def factor_conv_channel(w: np.ndarray, rank: int, gram: Optional[np.ndarray] = None):
    """``w [O, C, kh, kw]`` -> (first [r, C, kh, kw], second [O, r, 1, 1], s, energy): the
    conv as a [O, C*kh*kw] matrix acting on patches; its factors as two convolutions."""
    o = w.shape[0]
    a, b, s, energy = factor_dense(w.reshape(o, -1).T, rank, gram)  # patches @ W2^T
    first = a.T.reshape(rank, *w.shape[1:])  # patches @ A: r filters over the same window
    second = b.T.reshape(o, rank, 1, 1)  # @ B: a 1x1 conv to the outputs
    return first.astype(np.float32), second.astype(np.float32), s, energy


def factor_tucker2(w: np.ndarray, r_out: int, r_in: int):
    """``w [O, C, kh, kw]`` -> (into [r_in, C, 1, 1], core [r_out, r_in, kh, kw],
    out [O, r_out, 1, 1], energy): HOSVD of the output and input modes (Kim et al. 2016)."""
    o, c = w.shape[:2]
    w64 = w.astype(np.float64)
    u_o = np.linalg.svd(w64.reshape(o, -1), full_matrices=False)[0][:, :r_out]
    u_c = np.linalg.svd(w64.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("ocij,or,cs->rsij", w64, u_o, u_c)
    approx = np.einsum("rsij,or,cs->ocij", core, u_o, u_c)
    energy = float(1 - np.linalg.norm(w64 - approx) ** 2 / max(np.linalg.norm(w64) ** 2, 1e-30))
    return (u_c.T.reshape(r_in, c, 1, 1).astype(np.float32), core.astype(np.float32),
            u_o.reshape(o, r_out, 1, 1).astype(np.float32), energy)


@tvm.transform.module_pass(opt_level=0, name="LowRank")
class LowRank:
    """Low-rank split of every Relax function's dense and conv layers (see module docstring)."""

    def __init__(self, config: Optional[LowRankConfig] = None, env: Optional[PassEnv] = None):
        self.config = config or LowRankConfig()
        self.env = env or PassEnv()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        cfg, env = self.config, self.env
        mod = relax.transform.FoldConstant()(mod)
        lanes = max(1, int(env.facts.vector_lanes))
        func = mod["main"]  # the function calibration runs: its layers are the candidates
        layers = _layers(func)
        known = {l.name for l in layers}
        for name in cfg.skip:
            if name not in known:
                raise PassOptionError(f"lowrank: no layer named {name!r} (layers: "
                                      f"{', '.join(sorted(known)[:5])}, ...)")
        layers = [l for l in layers if l.name not in cfg.skip]
        grams, held_out = ({}, {})
        if cfg.whitened or cfg.calib is not None:
            grams, held_out = self._statistics(mod, func, layers)
        rows, splits = [], {}
        for layer in layers:
            row, split = self._decide(layer, grams.get(layer.name) if cfg.whitened else None,
                                      held_out.get(layer.name), lanes)
            rows.append(row)
            if split is not None:
                splits[layer.name] = split
        out = _apply(mod, splits) if splits else mod
        env.report["lowrank"] = {"method": "whitened" if cfg.whitened else "svd", "conv": cfg.conv,
                                 "vector_lanes": lanes, "layers": rows}
        env.log(f"lowrank: {len(splits)} of {len(rows)} layers split "
                f"({'whitened' if cfg.whitened else 'plain'} SVD, ranks in multiples of {lanes})")
        return out

    # -- calibration statistics ------------------------------------------------------------
    def _statistics(self, mod, func, layers: List[_Layer]):
        """Per layer: the Gram matrix of its inputs (patches for convolutions) on the fit
        samples, and its raw inputs on a few held-out samples."""
        cfg = self.config
        inputs = [(p.name, tensor_shape(p), str(p.ty.dtype)) for p in func.params]
        data = load_calibration(cfg.calib, inputs, cfg.preprocess, int(cfg.calib_samples), self.env.log,
                                who="lowrank")
        ins = [l.call.args[0] for l in layers]
        if not all(isinstance(v, relax.Var) for v in ins):
            return {}, {}
        params = {p: p.name for p in func.params}  # model inputs: read from the data
        exposed, order = expose(mod, [v for v in ins if v not in params])
        run = host_run(exposed)
        names = [p.name for p in func.params]
        n_eval = min(int(cfg.eval_samples), max(1, data.count // 4)) if data.count > 1 else 0
        grams: Dict[str, np.ndarray] = {}
        held: Dict[str, list] = {l.name: [] for l in layers}
        for i in range(data.count):
            res = flatten(run(*[data.inputs[n][i:i + 1] for n in names]))
            values = res[len(res) - len(order):]
            for layer in layers:
                src = layer.call.args[0]
                if src in params:
                    x = data.inputs[params[src]][i:i + 1]
                else:
                    x = values[next(j for j, v in enumerate(order) if v.same_as(src))]
                if i >= data.count - n_eval:
                    held[layer.name].append(x)
                    continue
                rows = _rows(layer, x)
                if rows.shape[0] > _MAX_ROWS // max(1, data.count - n_eval):
                    pick = np.random.default_rng(i).choice(rows.shape[0], _MAX_ROWS // max(1, data.count - n_eval),
                                                           replace=False)
                    rows = rows[pick]
                g = rows.T @ rows
                grams[layer.name] = g if layer.name not in grams else grams[layer.name] + g
        return grams, {k: v for k, v in held.items() if v}

    # -- one layer ---------------------------------------------------------------------------
    def _decide(self, layer: _Layer, gram, held, lanes):
        cfg, env = self.config, self.env
        w = layer.weight
        row = {"name": layer.name, "op": layer.kind}
        in_shape, out_shape = tensor_shape(layer.call.args[0]), tensor_shape(layer.call)
        if layer.kind == "matmul":
            k, n = w.shape
            s = np.linalg.svd(w.astype(np.float64) if gram is None else _cholesky(gram).T @ w, compute_uv=False)
            r = _rank(s, cfg, k * n, k + n, lanes)
            a, b, s, energy = factor_dense(w, r, gram)
            factors = (a, b)
            approx = a.astype(np.float64) @ b
            macs_full = int(np.prod(out_shape)) * k
            macs_split = int(np.prod(out_shape[:-1])) * r * (k + n)
            row["rank"] = r
        elif cfg.conv == "channel":
            o = w.shape[0]
            w2 = w.reshape(o, -1)
            s = np.linalg.svd(w2.T.astype(np.float64) if gram is None else _cholesky(gram).T @ w2.T,
                              compute_uv=False)
            r = _rank(s, cfg, w.size, w2.shape[1] + o, lanes)
            first, second, s, energy = factor_conv_channel(w, r, gram)
            factors = (first, second)
            approx = (second.reshape(o, r).astype(np.float64) @ first.reshape(r, -1)).reshape(w.shape)
            pixels = int(np.prod(out_shape)) // o
            macs_full = pixels * w.size
            macs_split = pixels * r * (w2.shape[1] + o)
            row["rank"] = r
        else:
            o, c = w.shape[:2]
            s_o = np.linalg.svd(w.reshape(o, -1).astype(np.float64), compute_uv=False)
            s_c = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64), compute_uv=False)
            k2 = int(np.prod(w.shape[2:]))
            r_out = _rank(s_o, cfg, w.size, (c + o + 1) * k2, lanes)
            r_in = _round_rank(int(round(r_out * c / max(o, 1))), lanes, len(s_c)) if cfg.rank is None else \
                _round_rank(int(cfg.rank), lanes, len(s_c))
            into, core, outw, energy = factor_tucker2(w, r_out, r_in)
            factors = (into, core, outw)
            approx = np.einsum("rsij,or,sc->ocij", core, outw[:, :, 0, 0], into[:, :, 0, 0])
            pixels = int(np.prod(out_shape)) // o
            in_pixels = int(np.prod(in_shape)) // c
            macs_full = pixels * w.size
            macs_split = in_pixels * c * r_in + pixels * (r_in * r_out * k2 + r_out * o)
            row.update(rank_in=r_in, rank_out=r_out)
        row.update(energy_kept=energy, weight_error=float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-30)),
                   params_split=int(sum(f.size for f in factors)), params=int(w.size),
                   macs=macs_full, macs_split=macs_split)
        if held:
            row["output_error"] = _output_error(layer, held, approx)
        if float(cfg.min_speedup) == 0:
            row["split"], row["reason"] = True, "forced (--lowrank-min-speedup 0), not measured"
            return row, factors
        if macs_split >= macs_full:
            row["split"], row["reason"] = False, "the split has no fewer MACs"
            return row, None
        x = np.random.default_rng(0).standard_normal(in_shape).astype("float32")
        env.log(Progress(f"lowrank: timing {layer.name}, whole vs split, on the target"))
        times = env.measure([_single(layer, None), _single(layer, factors)], [x])
        if times is not None:
            orig_ms, split_ms = times
            speedup = orig_ms / split_ms
            row.update(original_ms=orig_ms, split_ms=split_ms, speedup=speedup)
        else:
            speedup = macs_full / macs_split
            row.update(speedup_estimate=speedup, note="not timed on this target: MAC ratio used")
        if speedup < float(cfg.min_speedup):
            row["split"], row["reason"] = False, f"split measured {speedup:.2f}x (< --lowrank-min-speedup {cfg.min_speedup})"
            return row, None
        row["split"] = True
        return row, factors


def _rows(layer: _Layer, x: np.ndarray) -> np.ndarray:
    """The rows the layer's weight multiplies: features of a matmul, patches of a conv."""
    if layer.kind == "matmul":
        return x.reshape(-1, x.shape[-1]).astype(np.float64)
    return _patches(x, layer.call).astype(np.float64)


def _output_error(layer: _Layer, held: List[np.ndarray], approx: np.ndarray) -> float:
    """Relative L2 error of the layer's output with the factored weight, on held-out inputs."""
    w2 = layer.weight.reshape(layer.weight.shape[0], -1).T if layer.kind == "conv2d" else layer.weight
    a2 = approx.reshape(approx.shape[0], -1).T if layer.kind == "conv2d" else approx
    num = den = 0.0
    for x in held:
        rows = _rows(layer, x)
        ref = rows @ w2.astype(np.float64)
        num += float(np.linalg.norm(rows @ a2 - ref) ** 2)
        den += float(np.linalg.norm(ref) ** 2)
    return float(np.sqrt(num / max(den, 1e-30)))


def _emit_split(bb, x, call, kind: str, factors):
    """The factored layer on ``x``; every call named as the layer."""
    if kind == "matmul":
        a, b = factors
        mid = bb.emit(with_layer(relax.op.matmul(x, const(a)), call))
        return with_layer(relax.op.matmul(mid, const(b)), call)
    attrs = call.attrs
    conv = dict(data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW")
    spatial = dict(strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation)
    if len(factors) == 2:
        first, second = factors
        mid = bb.emit(with_layer(relax.op.nn.conv2d(x, const(first), **spatial, **conv), call))
        return with_layer(relax.op.nn.conv2d(mid, const(second), **conv), call)
    into, core, outw = factors
    a = bb.emit(with_layer(relax.op.nn.conv2d(x, const(into), **conv), call))
    b = bb.emit(with_layer(relax.op.nn.conv2d(a, const(core), **spatial, **conv), call))
    return with_layer(relax.op.nn.conv2d(b, const(outw), **conv), call)


def _single(layer: _Layer, factors) -> tvm.IRModule:
    """The layer alone, as it is (``factors`` None) or split: a candidate to time."""
    x = relax.Var("x", relax.TensorType(tensor_shape(layer.call.args[0]), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            if factors is None:
                y = relax.Call(layer.call.op, [x, layer.call.args[1]], layer.call.attrs, layer.call.ty_args)
            else:
                y = _emit_split(bb, x, layer.call, layer.kind, factors)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _apply(mod, splits: Dict[str, tuple]):
    @mutator
    class _Split(PyExprMutator):
        def visit_var_binding_(self, binding):
            call = binding.value
            name = layer_name(call) if isinstance(call, relax.Call) else None
            if name not in splits:
                super().visit_var_binding_(binding)
                return
            y = _emit_split(self.builder_, self.visit_expr(call.args[0]), call, op_kind(call), splits[name])
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, y))

    out = copy_module(mod)
    for gv, func in relax_functions(mod):
        out[gv] = _Split(out).visit_expr(func)
    return out


def add_arguments(group) -> None:
    group.add_argument("--lowrank-energy", dest="lowrank_energy", type=float, metavar="E",
                       help="spectral energy kept per layer, in (0, 1] (default 0.99)")
    group.add_argument("--lowrank-ratio", dest="lowrank_ratio", type=float, metavar="R",
                       help="parameters of the split over the original's, per layer, in (0, 1)")
    group.add_argument("--lowrank-rank", dest="lowrank_rank", type=int, metavar="N",
                       help="a fixed rank for every layer")
    group.add_argument("--lowrank-method", dest="lowrank_method", choices=METHODS,
                       help="svd, or whitened by the layer inputs on --calib data (auto: whitened "
                            "when --calib is given)")
    group.add_argument("--lowrank-conv", dest="lowrank_conv", choices=CONV_MODES,
                       help="convolutions: channel (KxK with r filters + 1x1, default) or tucker2")
    group.add_argument("--lowrank-skip", dest="lowrank_skip", metavar="LAYERS",
                       type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
                       help="layers left whole, comma-separated names")
    group.add_argument("--lowrank-min-speedup", dest="lowrank_min_speedup", type=float, metavar="S",
                       help="split a layer only where its kernels measure S times faster (default 1.05; "
                            "0: split every candidate, unmeasured)")


def _config_from_args(args):
    from tvm_compress.pass_registry import make_config

    values = vars(args)
    own = {f"lowrank_{f}": f for f in ("energy", "ratio", "rank", "method", "conv", "skip", "min_speedup")}
    shared = {f: f for f in ("calib", "calib_samples", "calib_size", "calib_mean", "calib_std",
                             "calib_layout", "calib_bgr")}
    options = {field: values[dest] for dest, field in {**own, **shared}.items() if values.get(dest) is not None}
    return make_config(PRESET, options)


PRESET = register_pass(
    PassPreset(
        name="lowrank",
        help="split dense and conv layers into low-rank factors (SVD, whitened on calibration data, "
             "or Tucker-2) where the split measures faster",
        config_cls=LowRankConfig,
        make=LowRank,
        add_arguments=add_arguments,
        config_from_args=_config_from_args,
        lossy=True,
        reads_calibration=True,
        runs_after=("prune",),
        runs_before=("quantize",),
        order_reason="low-rank factors are quantized after, and split the layers pruning left",
    )
)
