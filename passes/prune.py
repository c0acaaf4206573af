"""Prune: remove whole channels (structured) or blocks of weights (block-sparse), and the
``prune`` preset with its CLI flags.

Needs: a float Relax module from the importer (layers named by ``tvm_compress.layers``).
Runs after import and before ``quantize`` (which then calibrates the smaller model); rewrites
every Relax function. Post-training: no fine-tuning.

``channel``: output channels of conv/dense layers are ranked by their weights (L1 or L2 norm
of each filter, or the scale of a batch norm right after it) and removed physically, with the
matching inputs of every consumer; channels tied by residual adds, concatenation, depthwise
convolutions and element-wise ops form groups pruned together (``_channel_groups``). Kept
counts are rounded to whole vectors of the target (``PassEnv.facts.vector_lanes``). With
calibration data, ``recover`` repairs what the removal changed: ``bn`` re-fits each consumer's
per-channel output scale and shift to the original model's statistics, ``lstsq``
reconstructs each consumer's weights by least squares on calibration activations (He et al.,
2017). The report gives each layer's channels kept and the model's output error on held-out
calibration samples before and after recovery.

``block``: 1x1 convolutions and dense layers with constant weights lose their smallest blocks
(``block`` rows x columns, by L2 norm; default: the target's ``PassEnv.facts.sparse_block``)
until ``ratio`` of each weight is zero. The weights stay dense in the IR; the layers are marked
in the module attribute ``SPARSE_LAYERS_ATTR``. Each layer is built alone both ways for the
target (``PassEnv.measure``: tuned like the model) and timed; only where the sparse kernel
measured at least ``min_speedup`` times faster is it marked ``"kernel": "sparse"``, and the
target's sparse kernel hook then runs it from BSR storage. ``min_speedup`` 0 makes every
eligible layer sparse unmeasured; where the target cannot be timed here (emulated boards
without ``--rpc``), layers stay dense unless forced that way. The report gives each layer's
sparsity, kernel and both times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax

from tvm_compress.calib_data import CalibDataConfig, load_calibration
from tvm_compress.console import Progress
from tvm_compress.errors import PassOptionError
from tvm_compress.layers import layer_name, op_kind
from tvm_compress.pass_registry import PassEnv, PassPreset, register_pass
from tvm_compress.relax_utils import const_value, copy_module, is_constant, relax_functions, tensor_shape
from tvm_compress.specs import SPARSE_LAYERS_ATTR

from ._channel_groups import ChannelGroups, Producer, positions, prune
from ._prune_recover import recover

KINDS = ("channel", "block")
CRITERIA = ("l1", "l2", "bn-scale")
RECOVERY = ("none", "bn", "lstsq")


@dataclass(frozen=True)
class PruneConfig(CalibDataConfig):
    """kind: ``channel`` (structured, default) or ``block`` (block-sparse weights).
    ratio: fraction of channels (or of weights, for ``block``) removed, in [0, 1).
    layers: per-layer ratios, ((name, ratio), ...); skip: layers left alone, by name or index.
    block: (rows, cols) of a sparse block (default: the target's vector lanes x 1).
    criterion: ``l1``, ``l2`` or ``bn-scale`` (channel ranking).
    recover: ``none``, ``bn`` or ``lstsq`` (channel kind; needs ``calib``).
    min_speedup: a block-sparse layer runs sparse only where its kernel measured at least this
        much faster than the dense one (0: sparse wherever the kernels can, unmeasured).
    max_blocks: kept blocks the sparse kernels of one model may bake in (compile time grows by
        about 7 ms per block); layers past it, those saving least per block first, stay dense.
    """

    kind: str = "channel"
    ratio: float = 0.3
    layers: Tuple[Tuple[str, float], ...] = ()
    skip: Tuple[str, ...] = ()
    block: Optional[Tuple[int, int]] = None
    criterion: str = "l1"
    recover: str = "none"
    min_speedup: float = 1.1
    max_blocks: int = 10000
    eval_samples: int = 64

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PassOptionError(f"--prune-kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name, r in (("--prune-ratio", self.ratio), *((f"--prune-layer {n}", r) for n, r in self.layers)):
            if not 0.0 <= float(r) < 1.0:
                raise PassOptionError(f"{name}: ratio must be in [0, 1), got {r}")
        if self.criterion not in CRITERIA:
            raise PassOptionError(f"--prune-criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.recover not in RECOVERY:
            raise PassOptionError(f"--prune-recover must be one of {', '.join(RECOVERY)}, got {self.recover!r}")
        if self.block is not None and (len(self.block) != 2 or min(int(v) for v in self.block) < 1):
            raise PassOptionError(f"--prune-block must be RxC with R, C >= 1, got {self.block!r}")
        if int(self.max_blocks) < 0:
            raise PassOptionError(f"--prune-max-blocks must be >= 0, got {self.max_blocks}")

    def needs_calibration(self, model) -> bool:
        return self.recover != "none"
        if float(self.min_speedup) < 0:
            raise PassOptionError(f"--prune-min-speedup must be >= 0, got {self.min_speedup}")
        if self.recover != "none" and self.kind != "channel":
            raise PassOptionError("--prune-recover applies to --prune-kind channel")


@tvm.transform.module_pass(opt_level=0, name="Prune")
class Prune:
    """Channel or block pruning of every Relax function (see the module docstring)."""

    def __init__(self, config: Optional[PruneConfig] = None, env: Optional[PassEnv] = None):
        self.config = config or PruneConfig()
        self.env = env or PassEnv()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # Bias reshapes and weight transposes of constants become plain constants first.
        mod = relax.transform.FoldConstant()(mod)
        if self.config.kind == "block":
            return self._blocks(mod)
        return self._channels(mod)

    # -- structured channels ------------------------------------------------------------------
    def _channels(self, mod: tvm.IRModule) -> tvm.IRModule:
        cfg, env = self.config, self.env
        lanes = max(1, int(env.facts.vector_lanes))
        out = copy_module(mod)
        rows, layers, all_producers = [], [], []
        for gv, func in relax_functions(mod):
            groups = ChannelGroups(func)
            all_producers += [p.name for p in groups.producers]
            keep = {}
            for g, producers in groups.groups().items():
                decision = self._group_keep(producers, groups.channels[g], lanes, groups, func)
                rows.append(decision[1])
                if decision[0] is not None:
                    keep[g] = decision[0]
            layers += _layer_rows(func, groups, keep)
            pinned = [p for p in groups.producers if groups.is_pinned(p.group)]
            rows += [{"layers": [p.name], "channels": groups.channels[groups.find(p.group)],
                      "kept": groups.channels[groups.find(p.group)],
                      "reason": f"channels kept whole: {groups.pin_reason(p.group)}"} for p in pinned]
            if keep:
                out[gv] = prune(out, gv, groups, keep)
        self._check_names(all_producers)
        report = {"kind": "channel", "criterion": cfg.criterion, "vector_lanes": lanes, "groups": rows,
                  "layers": layers,
                  "channels_before": int(sum(r["channels"] for r in rows)),
                  "channels_after": int(sum(r["kept"] for r in rows))}
        pruned = sum(r["channels"] - r["kept"] for r in rows)
        env.log(f"prune: {pruned} of {report['channels_before']} channels removed in "
                f"{sum(1 for r in rows if r['kept'] < r['channels'])} of {len(rows)} groups "
                f"(kept counts multiples of {lanes})")
        if cfg.recover != "none" or cfg.calib is not None:
            kept = {r["name"]: np.array(r["kept_outputs"]) for r in layers if "kept_outputs" in r}
            out, report["recovery"] = self._recover(mod, out, kept)
        env.report["prune"] = report
        return out

    def _ratio(self, producers: List[Producer]) -> Tuple[float, str]:
        names = {p.name for p in producers}
        for name, r in self.config.layers:
            if name in names:
                return float(r), f"--prune-layer {name}"
        return float(self.config.ratio), "--prune-ratio"

    def _group_keep(self, producers, channels, lanes, groups, func):
        names = [p.name for p in producers]
        row = {"layers": names, "channels": channels}
        skipped = [n for n in names if n in self.config.skip]
        if skipped:
            return None, {**row, "kept": channels, "reason": f"{skipped[0]} in --prune-skip"}
        ratio, source = self._ratio(producers)
        remove = int(round(ratio * channels))
        if remove >= channels:
            raise PassOptionError(
                f"{source} {ratio} removes every channel of {names[0]} ({channels} channels)")
        # the nearest whole number of vectors, at least one (kernels then run whole vectors)
        kept = channels if remove == 0 else \
            min(channels, max(lanes, int(round((channels - remove) / lanes)) * lanes))
        row.update(ratio=ratio, kept=kept)
        if kept >= channels:
            return None, {**row, "kept": channels,
                          "reason": f"{channels} channels: rounding to multiples of {lanes} keeps all"}
        score = self._scores(producers, func)
        keep = np.sort(np.argsort(-score, kind="stable")[:kept])
        return keep, row

    def _scores(self, producers: List[Producer], func) -> np.ndarray:
        """Importance of each channel of a group: every producer's filter norms (or batch-norm
        scales), each normalized by its mean so that no layer dominates by its scale."""
        total = None
        for p in producers:
            s = self._bn_scale(p, func) if self.config.criterion == "bn-scale" else None
            if s is None:
                s = p.out_norms("l2" if self.config.criterion == "l2" else "l1")
            s = s / max(float(np.mean(s)), 1e-12)
            total = s if total is None else total + s
        return total

    def _bn_scale(self, producer: Producer, func) -> Optional[np.ndarray]:
        """|gamma| of a batch norm that reads the producer's output (exporters fold most of
        them into the convolution: then None, and the filter norms rank instead)."""
        bn_op = tvm.ir.Op.get("relax.nn.batch_norm")
        found = []

        def visit(e):
            if isinstance(e, relax.Call) and e.op.same_as(bn_op) and e.args[0].same_as(producer.var) \
                    and is_constant(e.args[1]):
                found.append(np.abs(const_value(e.args[1])).astype(np.float64))

        relax.analysis.post_order_visit(func, visit)
        return found[0] if found else None

    def _check_names(self, producers: List[str]) -> None:
        known = set(producers)
        for name in [n for n, _ in self.config.layers] + list(self.config.skip):
            if name not in known:
                some = ", ".join(producers[:5])
                raise PassOptionError(f"prune: no prunable layer named {name!r} (layers: {some}, ...)")

    def _recover(self, original: tvm.IRModule, pruned: tvm.IRModule, kept_outputs):
        cfg, env = self.config, self.env
        func = original["main"]
        inputs = [(p.name, tensor_shape(p), str(p.ty.dtype)) for p in func.params]
        data = load_calibration(cfg.calib, inputs, cfg.preprocess, int(cfg.calib_samples), env.log,
                                who="prune")
        return recover(original, pruned, data, cfg.recover, int(cfg.eval_samples), env.log, kept_outputs)

    # -- block-sparse ---------------------------------------------------------------------------
    def _blocks(self, mod: tvm.IRModule) -> tvm.IRModule:
        cfg, env = self.config, self.env
        if env.facts.sparse_block is None:
            raise PassOptionError(
                f"--prune-kind block: target {env.facts.target or '?'} has no block-sparse kernels "
                "(use --prune-kind channel)")
        block = tuple(int(v) for v in (cfg.block or env.facts.sparse_block))
        out = copy_module(mod)
        found = []
        for gv, func in relax_functions(mod):
            new_func, layers = _BlockPruner(block, cfg).run(out, func)
            out[gv] = new_func
            found += layers
        self._check_names([name for name, _, _ in found])
        marks, rows = {}, []
        over = self._over_budget(found, block)
        for name, rec, call in found:
            rows.append(rec)
            if call is not None:
                rec.update(over.get(name) or self._decide(name, call, block, rec["sparsity"]))
                if rec["kernel"] == "dense":  # the zeros stay stored and multiplied
                    rec["macs"][1], rec["weight_bytes"][1] = rec["macs"][0], rec["weight_bytes"][0]
                marks[name] = {"block": list(block), "sparsity": rec["sparsity"], "kernel": rec["kernel"]}
        n_sparse = sum(1 for m in marks.values() if m["kernel"] == "sparse")
        env.log(f"prune: {len(marks)} of {len(rows)} 1x1-conv/dense layers block-pruned "
                f"({block[0]}x{block[1]} blocks), {n_sparse} run sparse kernels")
        env.report["prune"] = {"kind": "block", "block": list(block), "min_speedup": float(cfg.min_speedup),
                               "max_blocks": int(cfg.max_blocks), "layers": rows}
        return out.with_attr(SPARSE_LAYERS_ATTR, json.dumps(marks)) if marks else out

    def _over_budget(self, found, block) -> dict:
        """Layers left dense so that the kept blocks baked into sparse kernels stay within
        ``max_blocks``: every block of a layer saves as many multiply-adds as the layer has output
        pixels (batch rows), so layers with the most pixels get their kernels first."""
        budget = int(self.config.max_blocks)
        per_block = block[0] * block[1]
        candidates = sorted((rec for _, rec, call in found if call is not None),
                            key=lambda rec: -rec["macs"][0] // max(1, rec["params"][0]))
        used, over = 0, {}
        for rec in candidates:
            blocks = rec["params"][1] // per_block
            if used + blocks <= budget:
                used += blocks
                continue
            over[rec["name"]] = {"kernel": "dense", "reason": (
                f"compile budget: {blocks} kept blocks would pass --prune-max-blocks {budget} "
                f"({used} already baked into layers saving more per block)")}
        if over:
            self.env.log(f"prune: {len(over)} layers stay dense to keep the sparse kernels within "
                         f"{budget} blocks (--prune-max-blocks)")
        return over

    def _decide(self, name: str, call: relax.Call, block, sparsity: float) -> dict:
        """Which kernel runs the layer: its sparse kernel timed against the dense one, alone."""
        cfg, env = self.config, self.env
        if float(cfg.min_speedup) == 0:
            return {"kernel": "sparse", "reason": "forced (--prune-min-speedup 0), not measured"}
        dense_mod = _single_layer(call)
        mark = {name: {"block": list(block), "sparsity": sparsity, "kernel": "sparse"}}
        x = np.random.default_rng(0).standard_normal(tensor_shape(call.args[0])).astype("float32")
        env.log(Progress(f"prune: timing {name}, dense vs sparse kernel, on the target"))
        times = env.measure([dense_mod, dense_mod.with_attr(SPARSE_LAYERS_ATTR, json.dumps(mark))], [x])
        if times is None:
            return {"kernel": "dense", "reason": "not measured (the target cannot be timed here: "
                    "use --rpc, or --prune-min-speedup 0 to force sparse kernels)"}
        dense_ms, sparse_ms = times
        speedup = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
        rec = {"dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4), "speedup": round(speedup, 3)}
        if speedup >= float(cfg.min_speedup):
            rec.update(kernel="sparse", reason=f"sparse kernel measured {speedup:.2f}x faster")
        else:
            rec.update(kernel="dense", reason=f"sparse kernel measured {speedup:.2f}x, below "
                       f"--prune-min-speedup {cfg.min_speedup:g}")
        env.log(f"prune: {name}: {rec['kernel']} (dense {dense_ms:.3f} ms, sparse {sparse_ms:.3f} ms)")
        return rec


def _single_layer(call: relax.Call) -> tvm.IRModule:
    """A module whose main runs only ``call`` (its constant weight kept) on a fresh input."""
    x = relax.Var("x", relax.TensorType(tensor_shape(call.args[0]), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.Call(call.op, [x, *call.args[1:]], call.attrs, call.ty_args, call.span))
        bb.emit_func_output(y)
    return bb.get()


def _layer_rows(func, groups: ChannelGroups, keep) -> List[dict]:
    """Per named layer: output and input channels before/after, and the input channels kept
    (indices along the axis its weight reads: channels, or flattened features for a matmul)."""
    rows = []
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            kind = op_kind(call) if isinstance(b, relax.VarBinding) else None
            if kind not in ("conv1d", "conv2d", "matmul") or not layer_name(call):
                continue
            out_c = tensor_shape(call)[1 if kind != "matmul" else -1]
            in_c = tensor_shape(call.args[0])[1 if kind != "matmul" else -1]
            out_info, in_info = groups.info.get(b.var), groups.info.get(call.args[0])
            out_pos = positions(out_info, groups, keep) if out_info is not None else None
            in_pos = positions(in_info, groups, keep) if in_info is not None else None
            row = {"name": layer_name(call), "op": kind,
                   "out_channels": [out_c, out_c if out_pos is None else len(out_pos)],
                   "in_channels": [in_c, in_c if in_pos is None else len(in_pos)]}
            if in_pos is not None:
                row["kept_inputs"] = [int(i) for i in in_pos]
            if out_pos is not None:
                row["kept_outputs"] = [int(i) for i in out_pos]
            rows.append(row)
    return rows


class _BlockPruner:
    """Zeroes the smallest blocks of each eligible layer's weight (1x1 conv, dense)."""

    def __init__(self, block, cfg: PruneConfig):
        self.block = block
        self.cfg = cfg

    def run(self, mod, func):
        from tvm.relax.expr_functor import PyExprMutator, mutator

        found: List[tuple] = []
        outer = self

        @mutator
        class _Zero(PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if errors:
                    return call
                try:
                    rec = outer._layer(call, len(found))
                except PassOptionError as err:  # raised after the visit: the builder must finish
                    errors.append(err)
                    return call
                if rec is None:
                    return call
                found.append(rec)
                return rec[2] if rec[2] is not None else call

        errors: List[PassOptionError] = []
        new_func = _Zero(mod).visit_expr(func)
        if errors:
            raise errors[0]
        return new_func, found

    def _layer(self, call, index):
        kind = op_kind(call)
        if kind not in ("conv2d", "matmul") or not is_constant(call.args[1]):
            return None
        w = const_value(call.args[1])
        name = layer_name(call) or f"{kind}_{index}"
        if kind == "conv2d" and (w.ndim != 4 or w.shape[2:] != (1, 1) or int(call.attrs.groups) != 1
                                 or any(int(v) != 1 for v in (*call.attrs.strides, *call.attrs.dilation))
                                 or any(int(v) != 0 for v in call.attrs.padding)):
            return None  # the sparse kernels take stride-1 unpadded 1x1 convolutions
        if kind == "matmul" and w.ndim != 2:
            return None
        # As [out, in]: conv OI11 -> OI; matmul [K, N] -> [N, K].
        w2 = w.reshape(w.shape[0], w.shape[1]) if kind == "conv2d" else w.T
        if name in self.cfg.skip:
            return name, {"name": name, "op": kind, "reason": "in --prune-skip"}, None
        ratio = dict(self.cfg.layers).get(name, self.cfg.ratio)
        r, c = self.block
        pixels = int(np.prod(tensor_shape(call)[2:])) if kind == "conv2d" else None
        if pixels is not None and pixels < max(r, 2):
            return name, {"name": name, "op": kind, "reason": f"{pixels} output pixels: too few for the "
                          "sparse kernel's pixel vectors"}, None
        if (w2.shape[0] % r or w2.shape[1] % c) and not self.cfg.block:
            # the target's default block: layers it does not fit stay as they are
            return name, {"name": name, "op": kind, "reason": f"the default {r}x{c} block does not divide "
                          f"its {w2.shape[0]}x{w2.shape[1]} weight"}, None
        if w2.shape[0] % r or w2.shape[1] % c:
            raise PassOptionError(
                f"--prune-block {r}x{c} does not divide layer {name}'s weight ({w2.shape[0]} out x "
                f"{w2.shape[1]} in)")
        pruned, sparsity = zero_blocks(w2, (r, c), float(ratio))
        new_w = pruned.reshape(w.shape) if kind == "conv2d" else np.ascontiguousarray(pruned.T)
        kept = int(np.count_nonzero(np.any(pruned.reshape(w2.shape[0] // r, r, w2.shape[1] // c, c) != 0,
                                           axis=(1, 3)))) * r * c
        uses = int(np.prod(tensor_shape(call))) // w2.shape[0]  # output pixels / batch rows
        rec = {"name": name, "op": kind, "shape_out_in": list(w2.shape), "sparsity": sparsity,
               "params": [int(w2.size), kept], "macs": [uses * int(w2.size), uses * kept],
               "weight_bytes": [int(w2.size) * 4, kept * 4]}
        new_call = relax.Call(call.op, [call.args[0], relax.const(new_w)], call.attrs, call.ty_args, call.span)
        return name, rec, new_call


def zero_blocks(w: np.ndarray, block: Tuple[int, int], ratio: float) -> Tuple[np.ndarray, float]:
    """``w`` [out, in] with the ``ratio`` share of its (r x c) blocks of smallest L2 norm set to
    zero; returns it and the share of zero blocks."""
    r, c = block
    o, i = w.shape
    blocks = w.reshape(o // r, r, i // c, c)
    norms = np.sqrt((blocks.astype(np.float64) ** 2).sum(axis=(1, 3)))
    n_zero = int(round(ratio * norms.size))
    mask = np.ones(norms.size, bool)
    mask[np.argsort(norms, axis=None, kind="stable")[:n_zero]] = False
    mask = mask.reshape(norms.shape)
    out = blocks * mask[:, None, :, None]
    return out.reshape(o, i).astype(w.dtype), float(1.0 - mask.mean())


def _pairs(text: str):
    """``NAME=R`` -> (NAME, R) (argparse type of --prune-layer)."""
    import argparse

    name, sep, value = str(text).rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=RATIO, got {text!r}") from None


def _block(text: str):
    import argparse

    try:
        r, c = (int(v) for v in str(text).lower().split("x"))
        return r, c
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RxC (e.g. 8x1), got {text!r}") from None


def add_arguments(group) -> None:
    group.add_argument("--prune-kind", dest="prune_kind", choices=KINDS,
                       help="channel: remove whole channels (default); block: block-sparse weights")
    group.add_argument("--prune-ratio", dest="prune_ratio", type=float, metavar="R",
                       help="fraction of channels (or of weights, for block) removed, in [0, 1) (default 0.3)")
    group.add_argument("--prune-layer", dest="prune_layers", type=_pairs, action="append", metavar="NAME=R",
                       help="ratio for one layer (repeat)")
    group.add_argument("--prune-block", dest="prune_block", type=_block, metavar="RxC",
                       help="block of a block-sparse weight (default: the target's vector lanes x 1)")
    group.add_argument("--prune-criterion", dest="prune_criterion", choices=CRITERIA,
                       help="channel ranking (default l1)")
    group.add_argument("--prune-skip", dest="prune_skip", metavar="LAYERS",
                       type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
                       help="layers left unpruned, comma-separated names")
    group.add_argument("--prune-recover", dest="prune_recover", choices=RECOVERY,
                       help="repair without training, on --calib data: bn (per-channel statistics) "
                            "or lstsq (least-squares weights of the next layers); default none")
    group.add_argument("--prune-max-blocks", dest="prune_max_blocks", type=int, metavar="N",
                       help="block kind: kept blocks the model's sparse kernels may bake in (default 10000; "
                            "compile time grows by about 7 ms per block)")
    group.add_argument("--prune-min-speedup", dest="prune_min_speedup", type=float, metavar="S",
                       help="block kind: a layer runs sparse only where measured S times faster than dense "
                            "(default 1.1; 0: sparse wherever possible, unmeasured)")


def _config_from_args(args):
    from tvm_compress.pass_registry import make_config

    values = vars(args)
    own = {f"prune_{f}": f for f in ("kind", "ratio", "layers", "block", "criterion", "skip", "recover",
                                      "min_speedup", "max_blocks")}
    shared = {f: f for f in ("calib", "calib_samples", "calib_size", "calib_mean", "calib_std",
                             "calib_layout", "calib_bgr")}
    options = {field: values[dest] for dest, field in {**own, **shared}.items() if values.get(dest) is not None}
    if "layers" in options:
        options["layers"] = tuple(options["layers"])
    return make_config(PRESET, options)


PRESET = register_pass(
    PassPreset(
        name="prune",
        help="remove whole channels (structured, the model shrinks) or blocks of weights "
             "(block-sparse kernels where they measure faster); post-training",
        config_cls=PruneConfig,
        make=Prune,
        add_arguments=add_arguments,
        config_from_args=_config_from_args,
        lossy=True,
        reads_calibration=True,
        runs_before=("quantize",),
        order_reason="quantize calibrates the pruned model",
    )
)
