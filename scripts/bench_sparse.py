#!/usr/bin/env python3
"""Block-sparse (BSR) fp32 kernels vs MetaSchedule-tuned dense kernels of the same shape.

    python scripts/bench_sparse.py [--target x86-avx2] [--trials 128] [--rounds 15] [--json out.json]

For each shape (MobileNet-like 1x1 convolutions, batch-1 dense layers) and each sparsity in
``--sparsities``: the sparse kernel of ``targets/sparse_kernels.py`` (blocks of R = the target's
float32 vector lanes x C = 1, pattern from ``prune_blocks`` on random weights, baked into the
kernel), the MetaSchedule-tuned dense kernel (``tvm_compress.tuning``; records cached per shape
and target, so a rerun with the same ``--trials`` only times) and our default-scheduled dense
kernel (``cpu_schedule.cpu_default_schedule``, what ``--tune-trials 0`` gives).

Every kernel is built first; then all are timed in the same process in interleaved rounds (one
``time_evaluator`` batch of each kernel per round, the order rotated each round), so a busy
machine slows all alike. Reported: the median over rounds of each kernel's time, and the median
over rounds of the per-round ratio tuned-dense / sparse. Kernels are timed as bare PrimFuncs
(no VM call around them). ``--tune-only`` fills the tuning cache and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tvm_compress  # noqa: E402,F401  (sets TVM_NUM_THREADS before TVM's pool starts)
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm_compress.targets.sparse_hook import MAX_BLOCKS  # noqa: E402

# (name, kind, dims): conv (I, O, H, W) NCHW 1x1 batch 1; dense (B, I, O).
SHAPES = [
    ("conv 128->128 @28x28", "conv", (128, 128, 28, 28)),
    ("conv 256->256 @14x14", "conv", (256, 256, 14, 14)),
    ("conv 512->512 @7x7", "conv", (512, 512, 7, 7)),
    ("conv 96->24 @40x40", "conv", (96, 24, 40, 40)),
    ("dense 512->512 b1", "dense", (1, 512, 512)),
    ("dense 1024->1024 b1", "dense", (1, 1024, 1024)),
]
SPARSITIES = (0.5, 0.65, 0.8, 0.9, 0.95)


def dense_relax(kind: str, dims) -> tvm.IRModule:
    """The dense layer as Relax, weight a parameter (the tuned kernel is the same as with a
    constant weight; the tuning cache key does not depend on the weight's values). Dense
    weights come as [I, O]: what FoldConstant leaves of ``x @ W.T`` with a constant W."""
    bb = relax.BlockBuilder()
    if kind == "conv":
        i, o, h, w = dims
        x = relax.Var("x", relax.TensorType((1, i, h, w), "float32"))
        wt = relax.Var("w", relax.TensorType((o, i, 1, 1), "float32"))
        with bb.function("main", [x, wt]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.conv2d(x, wt, out_dtype="float32"))
            bb.emit_func_output(y)
    else:
        b, i, o = dims
        x = relax.Var("x", relax.TensorType((b, i), "float32"))
        wt = relax.Var("w", relax.TensorType((i, o), "float32"))
        with bb.function("main", [x, wt]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.matmul(x, wt, out_dtype="float32"))
            bb.emit_func_output(y)
    return bb.get()


def lowered(kind, dims, target) -> tvm.IRModule:
    from tvm_compress.pipeline import lowering_passes

    with target:
        return tvm.transform.Sequential(lowering_passes())(dense_relax(kind, dims))


def _prim_func(mod: tvm.IRModule):
    funcs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    if len(funcs) != 1:
        raise RuntimeError(f"expected one kernel, got {len(funcs)}")
    return funcs[0]


def tuned_dense(kind, dims, target, trials, log):
    """The MetaSchedule-tuned dense kernel (PrimFunc) and the tuning summary."""
    from tvm_compress import tuning

    mod = lowered(kind, dims, target)
    work_dir = tuning.database_dir(mod, target)
    summary = tuning.tune(mod, target, trials, work_dir, log=log)
    mod = tuning.apply_database(mod, target, work_dir)
    return _prim_func(mod), summary.as_dict()


def default_dense(kind, dims, target):
    from tvm_compress.targets.cpu_schedule import cpu_default_schedule

    mod = lowered(kind, dims, target)
    with target:
        mod = tvm.transform.Sequential(cpu_default_schedule())(mod)
    return _prim_func(mod)


def sparse_kernel(kind, dims, sparsity, target):
    """The BSR kernel (PrimFunc) for random weights pruned to ``sparsity`` in target-lane x 1
    blocks, and the BSR."""
    from tvm_compress.targets import sparse_kernels as sk

    isa = sk.target_isa(target)
    if kind == "conv":
        i, o, h, w = dims
        x_shape, w_shape = (1, i, h, w), (o, i)
    else:
        b, i, o = dims
        x_shape, w_shape = (b, i), (o, i)
    weight = np.random.default_rng(0).standard_normal(w_shape).astype("float32")
    bsr = sk.bsr_from_dense(sk.prune_blocks(weight, (isa.lanes, 1), sparsity), (isa.lanes, 1))
    if bsr.nnz_blocks > MAX_BLOCKS:
        return None, bsr
    with target:
        func = sk.sparse_prim_func("conv1x1" if kind == "conv" else "dense", bsr, x_shape)
    return func, bsr


def _args(func, rng):
    out = []
    for p in func.params:
        ty = p.ty
        shape = [int(d) for d in ty.shape]
        out.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(ty.dtype))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x86-avx2", help="target preset (default: AVX2+FMA)")
    ap.add_argument("--trials", type=int, default=128, help="MetaSchedule trials per dense shape")
    ap.add_argument("--shapes", default="all", help="comma list of shape indexes (0-based) or 'all'")
    ap.add_argument("--sparsities", default=",".join(str(v) for v in SPARSITIES))
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--tune-only", action="store_true", help="only fill the tuning cache")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    from tvm_compress.targets import get_target

    target = get_target(args.target).tvm_target()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")]
    results = []
    for name, kind, dims in shapes:
        t0 = time.monotonic()
        tuned, summary = tuned_dense(kind, dims, target, args.trials, log)
        log(f"{name}: tuned ({summary.get('trials')} trials) in {time.monotonic() - t0:.0f} s")
        if args.tune_only:
            continue
        kernels = {"tuned": tuned, "default": default_dense(kind, dims, target)}
        for sp in sparsities:
            t0 = time.monotonic()
            func, bsr = sparse_kernel(kind, dims, sp, target)
            if func is None:
                log(f"{name}: {sp:.0%} skipped ({bsr.nnz_blocks} blocks > {MAX_BLOCKS})")
                continue
            kernels[sp] = func
            log(f"{name}: {sp:.0%} sparse kernel ({bsr.nnz_blocks} blocks) in {time.monotonic() - t0:.0f} s")
        rng = np.random.default_rng(0)
        built = {}
        for key, func in kernels.items():
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
            built[key] = (lib.jit(), _args(func, rng))
        dev = tvm.cpu()
        times = {k: [] for k in built}
        keys = list(built)
        for r in range(args.rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                lib, fargs = built[k]
                times[k].append(lib.time_evaluator("main", dev, number=20, repeat=1)(*fargs).mean * 1e3)
        tuned_ms = float(np.median(times["tuned"]))
        row = {"shape": name, "tuned_ms": tuned_ms, "default_ms": float(np.median(times["default"])),
               "sparse": {}}
        for sp in [k for k in keys if isinstance(k, float)]:
            ratio = float(np.median(np.array(times["tuned"]) / np.array(times[sp])))
            row["sparse"][f"{sp:g}"] = {"ms": float(np.median(times[sp])), "speedup_vs_tuned": ratio}
        results.append(row)
        cells = "  ".join(f"{k}: {v['speedup_vs_tuned']:.2f}x" for k, v in row["sparse"].items())
        print(f"{name:24s} tuned {tuned_ms:.3f} ms  default {row['default_ms']:.3f} ms  sparse/tuned speed-up  {cells}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"target": args.target, "trials": args.trials, "results": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
