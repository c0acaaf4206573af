#!/usr/bin/env python
"""Per-layer times: our compiled float model against onnxruntime's profile of the same layers.

Each conv / Gemm / MatMul node of the ONNX model (graph order) is matched to the TVM kernel
that first reads a weight of its shape (the conv with its fused epilogue) and to onnxruntime's
node of the same name (its fused Conv+activation, NCHWc Conv ...). TVM kernels are timed one by
one with TVM's time evaluator, in the compiled library, on the buffers of a real run;
onnxruntime's times are the medians of its profiler's per-node events over the runs. Both sides
also get totals, including what is not a layer (onnxruntime's layout reorders, our pools and
element-wise kernels).

    python scripts/bench_layers.py --model det --trials 0 --runs 30
    python scripts/bench_layers.py --onnx common_det.onnx [--shape 1,3,416,416] --trials 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import MODELS  # noqa: E402
from bench_int8 import _conv_panels, _kernel_calls, _panels, _time_call  # noqa: E402

import tvm_compress  # noqa: E402
from tvm_compress.bench import wait_idle  # noqa: E402

LAYER_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# What onnxruntime fuses into a conv (its NCHWc conv names the fused node after the last output).
EPILOGUE_TYPES = ("Relu", "Clip", "Add", "Sigmoid", "HardSigmoid", "LeakyRelu", "BatchNormalization")


def _phase_weight(node, weight: tuple) -> tuple:
    """The weight shape of the convolution a ConvTranspose becomes (``ConvTransposeToConv``):
    every output phase's taps, ``[OC * prod(strides), IC / group, ceil(K' / stride)...]``."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group = attrs.get("group", 1)
    taps = weight[2:]
    strides = attrs.get("strides", [1] * len(taps))
    dilations = attrs.get("dilations", [1] * len(taps))
    reach = [(k - 1) * d + 1 for k, d in zip(taps, dilations)]
    return (weight[1] * group * int(np.prod(strides)), weight[0] // group,
            *(-(-r // s) for r, s in zip(reach, strides)))


def onnx_layers(prepared_model: onnx.ModelProto) -> list:
    """(name, op type, weight shape our kernel reads, names onnxruntime may give its node, the
    ONNX weight shape) of every layer with a constant weight, graph order."""
    graph = prepared_model.graph
    inits = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    readers = defaultdict(list)
    for n in graph.node:
        for t in n.input:
            readers[t].append(n)
    layers = []
    for n in graph.node:
        if n.op_type not in LAYER_TYPES or len(n.input) < 2 or n.input[1] not in inits:
            continue
        names, out = {n.name, n.output[0]}, n.output[0]
        while len(readers[out]) == 1 and readers[out][0].op_type in EPILOGUE_TYPES:
            out = readers[out][0].output[0]
            names.add(out)
        weight = tuple(inits[n.input[1]])
        ours = _phase_weight(n, weight) if n.op_type == "ConvTranspose" else weight
        layers.append((n.name, n.op_type, ours, names, weight))
    return layers


def _ort_key(node_name: str) -> str:
    name = node_name[len("fused "):] if node_name.startswith("fused ") else node_name
    return name[: -len("_nchwc")] if name.endswith("_nchwc") else name


def ort_profile(model_bytes: bytes, feed: dict, runs: int) -> dict:
    """Node name -> median ms per run (onnxruntime, 2 threads, all optimizations)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())  # the warm-up only
        opts.profile_file_prefix = str(Path(tmp) / "ort2")
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 5):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1e3)
    # drop the first runs (warm-up) of each node
    return {k: float(np.median(v[5:] if len(v) > 5 else v)) for k, v in per_node.items()}


def tvm_kernels(lib: Path, x: np.ndarray) -> list:
    """[(name, argument shapes, ms, a digest of the second argument: the weight)]."""
    calls = _kernel_calls(lib, x)
    return [(name, [tuple(a.shape) for a in args], _time_call((owner, name, args), repeat=5),
             hashlib.sha1(args[1].numpy().tobytes()).hexdigest() if len(args) > 1 else None)
            for owner, name, args in calls]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="det")
    ap.add_argument("--trials", type=int, default=0, help="tuning budget of our build (cached records reused)")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out-dir", default="bench-out/layers")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--onnx", help="another model file (one input; give --shape if it is dynamic)")
    ap.add_argument("--shape", help="the input's shape instead of the model's usual one, e.g. 1,3,416,416")
    args = ap.parse_args(argv)

    get_path, shapes = MODELS[args.model]
    if args.onnx:
        get_path, shapes = (lambda: Path(args.onnx)), {onnx.load(args.onnx).graph.input[0].name: None}
        args.model = Path(args.onnx).stem
    if args.shape:
        shapes = {next(iter(shapes)): tuple(int(d) for d in args.shape.split(","))}
    shapes = {k: v for k, v in shapes.items() if v is not None}
    path = get_path()
    prepared = tvm_compress.prepare_onnx(path, shapes)
    layers = onnx_layers(prepared.model)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"{args.model}-{args.target}-{args.trials}.so"
    print(f"{args.model}: compiling ({args.trials} tuning trials)", flush=True)
    tvm_compress.compile(path, lib, target=args.target, input_shapes=shapes, tune_trials=args.trials,
                         bench_runs=3, log=lambda m: None)
    x = np.random.default_rng(0).random(prepared.inputs[0].shape, dtype=np.float32)
    print(f"{args.model}: timing {len(layers)} layers", flush=True)
    # Each side alone on the cores: onnxruntime in a process of its own, started once this
    # process's threads (the build's test runs) are idle and ended before our kernels run. In
    # one process, whichever side ran second was slowed by the other's spinning pool threads
    # (our first layers up to 2x; onnxruntime's nodes, profiled after ours, up to 2x too).
    wait_idle(os.getpid())
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        ort_ms = pool.submit(ort_profile, prepared.model.SerializeToString(),
                             {prepared.inputs[0].name: x}, args.runs).result()
    kernels = tvm_kernels(lib, x)
    from tvm_compress.targets import get_family, get_target

    profile = get_target(args.target)
    lanes = get_family(profile.family).vector_lanes(profile)

    rows, used = [], set()
    ort_by_key = {_ort_key(n): t for n, t in ort_ms.items()}
    for name, op, wshape, keys, shown in layers:
        if op in ("Conv", "ConvTranspose") and len(wshape) == 3:  # 1-D convs run as 2-D ones of height 1
            wshape = (*wshape[:2], 1, wshape[2])
        shapes = {wshape, wshape[::-1]} if len(wshape) == 2 else {wshape}  # matmul weights are [K, N]
        if len(wshape) >= 4:  # channels-last convs read HWIO (DHWIO) weights, or those in panels
            shapes |= {(*wshape[2:], wshape[1], wshape[0]), *_conv_panels(wshape, lanes)}
        if len(wshape) == 2:  # PadDenseColumns widens [K, N] to whole registers
            shapes |= {(wshape[0], n) for n in range(wshape[1], wshape[1] + 16)}
        # packed dense weights: panels [N / P, K, P], or one panel [1, K, N] (1x1 convs run so;
        # that shape only as the kernel's weight argument: a flattened map [1, H * W, C] can
        # have it too)
        dense = (wshape[1], wshape[0]) if len(wshape) >= 4 and set(wshape[2:]) == {1} else \
            tuple(wshape) if len(wshape) == 2 else None
        one_panel = set()
        if dense is not None:
            shapes |= _panels(dense, lanes)
            one_panel = {(1, *dense), (1, *dense[::-1])}

        def reads_weight(args):
            return bool(shapes & set(args[1:])) or (len(args) > 1 and args[1] in one_panel)

        # the first kernel not yet taken that reads such a weight: the VM may run a branch (a
        # ResNet's downsample conv) before the layer the graph lists first
        j = next((i for i in range(len(kernels)) if i not in used and reads_weight(kernels[i][1])), None)
        ort = next((ort_by_key[key] for key in keys if key in ort_by_key), None)
        # a conv run by regions or bands of frames: the kernels right after it on the same weight
        taken = [] if j is None else [j]
        while taken and taken[-1] + 1 < len(kernels) and taken[-1] + 1 not in used \
                and kernels[taken[-1] + 1][3] == kernels[j][3]:
            taken.append(taken[-1] + 1)
        used.update(taken)
        tvm_t = sum(kernels[i][2] for i in taken) if taken else None
        rows.append({"layer": name, "op": op, "weight": list(shown), "tvm_ms": tvm_t, "ort_ms": ort,
                     "ratio": tvm_t / ort if tvm_t and ort else None})
    tvm_total = sum(k[2] for k in kernels)
    tvm_other = sum(k[2] for i, k in enumerate(kernels) if i not in used)
    ort_total = sum(ort_ms.values())
    ort_other = ort_total - sum(r["ort_ms"] for r in rows if r["ort_ms"])

    print(f"\n{args.model} ({args.target}, {args.trials} trials): per layer, ms\n")
    print("| # | layer | weight | ours | onnxruntime | ours / ort |")
    print("|---:|---|---|---:|---:|---:|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for i, r in enumerate(rows):
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"| {i} | {r['layer']} | {'x'.join(map(str, r['weight']))} | {fmt(r['tvm_ms'])} | "
              f"{fmt(r['ort_ms'])} | {ratio} |")
    print(f"| | layers matched on both sides | | {sum(r['tvm_ms'] or 0 for r in rows if r['ort_ms']):.3f} | "
          f"{sum(r['ort_ms'] or 0 for r in rows if r['tvm_ms']):.3f} | |")
    print(f"| | everything else (pools, element-wise, layout reorders, resizes ...) | | {tvm_other:.3f} | "
          f"{ort_other:.3f} | |")
    print(f"| | sum of kernel / node times | | {tvm_total:.3f} | {ort_total:.3f} | "
          f"{tvm_total / ort_total:.2f}x |")
    worst = sorted((r for r in rows if r["ratio"]), key=lambda r: r["tvm_ms"] - r["ort_ms"], reverse=True)[:8]
    print("\nLargest gaps (ours - onnxruntime, ms): " +
          ", ".join(f"{r['layer']} {r['tvm_ms'] - r['ort_ms']:+.3f}" for r in worst))
    unmatched = [r["layer"] for r in rows if r["ratio"] is None]
    if unmatched:
        print(f"Not matched on one side ({len(unmatched)}): {', '.join(unmatched[:10])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tvm_total_ms": tvm_total, "ort_total_ms": ort_total,
                                               "tvm_other_ms": tvm_other, "ort_other_ms": ort_other}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
