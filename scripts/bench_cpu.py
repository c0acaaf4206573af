#!/usr/bin/env python
"""CPU benchmark: onnxruntime fp32 vs TVM (naive, dlight, our default schedule, tuned), one run.

Every variant is built first, then all are timed in the same process, interleaved round by round
on the same input, so the ratios compare like with like even on a busy machine.

    python scripts/bench_cpu.py --models demo,det --trials demo=128,det=1536 --runs 30

Tuning records are cached per (model, target) (see tvm_compress.tuning), so a second run with the
same budget only times. Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

import tvm_compress
from tvm_compress.demo import demo_files
from tvm_compress.pipeline import lowering_passes
from tvm_compress.targets import get_target
from tvm_compress.targets.cpu_schedule import cpu_default_schedule
from tvm_compress.verify import ort_session


def _rapidocr(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # its __init__ needs OpenCV: don't import
    if spec is None:
        sys.exit("bench_cpu: pip install --no-deps rapidocr-onnxruntime==1.4.4 for the PP-OCR models")
    return Path(spec.origin).parent / "models" / name


def _kws() -> Path:
    """A keyword-spotting-like 1-D CNN on 40 x 400 features (seeded random weights): conv, depthwise,
    pointwise, strided and dilated 1-D convolutions with ReLUs, a mean over time, a dense layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(__file__).resolve().parents[1] / "out" / "kws1d.onnx"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x, channels = "x", 40
    # (out channels, kernel, stride, dilation, groups)
    for i, (oc, k, s, d, g) in enumerate([(64, 3, 1, 1, 1), (64, 3, 1, 1, 64), (128, 1, 1, 1, 1),
                                          (128, 5, 2, 1, 1), (128, 3, 1, 2, 1)]):
        w = (rng.standard_normal((oc, channels // g, k)) / np.sqrt(channels // g * k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(oc).astype(np.float32) * 0.1, f"b{i}")]
        pad = d * (k - 1) // 2
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", strides=[s],
                                   pads=[pad, pad], dilations=[d], group=g),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, channels = f"r{i}", oc
    inits.append(numpy_helper.from_array((rng.standard_normal((12, 128)) * 0.1).astype(np.float32), "fw"))
    inits.append(numpy_helper.from_array(np.zeros(12, np.float32), "fb"))
    nodes += [helper.make_node("ReduceMean", [x], ["m"], axes=[2], keepdims=0),
              helper.make_node("Gemm", ["m", "fw", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "kws1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40, 400])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


MODELS = {
    "demo": (lambda: demo_files()["model"], {"input": (1, 1, 28, 28)}),
    "kws": (_kws, {"x": (1, 40, 400)}),
    "det": (lambda: _rapidocr("ch_PP-OCRv4_det_infer.onnx"), {"x": (1, 3, 320, 320)}),
    "cls": (lambda: _rapidocr("ch_ppocr_mobile_v2.0_cls_infer.onnx"), {"x": (1, 3, 48, 192)}),
    "rec": (lambda: _rapidocr("ch_PP-OCRv4_rec_infer.onnx"), {"x": (1, 3, 48, 320)}),
}


def prepared_model(model: str, onnx_path: str | None = None, shape: str | None = None,
                   input_shapes: dict | None = None):
    """(path, prepared model) for a ``MODELS`` key, or another file (``onnx_path``); ``shape``:
    the first input's shape instead of the usual one, e.g. ``"1,3,960,960"``;
    ``input_shapes``: name -> shape for models with several inputs."""
    get_path, shapes = MODELS[model]
    if onnx_path:
        import onnx

        get_path, shapes = (lambda: Path(onnx_path)), {onnx.load(onnx_path).graph.input[0].name: None}
    shapes = {**shapes, **(input_shapes or {})}
    if shape:
        shapes = {next(iter(shapes)): tuple(int(d) for d in shape.split(","))}
    path = get_path()
    return path, tvm_compress.prepare_onnx(path, {k: v for k, v in shapes.items() if v is not None})


def _vm_runner(ex, x):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    arg = tvm.runtime.tensor(x)
    return lambda: vm["main"](arg)


def _lowered(prepared, target):
    with target:
        return tvm.transform.Sequential(lowering_passes())(prepared.to_relax())


def bench_model(name: str, trials: int, runs: int, out_dir: Path, log, dlight: bool = True) -> list:
    get_path, shapes = MODELS[name]
    path = get_path()
    prepared = tvm_compress.prepare_onnx(path, shapes)
    target = get_target("x86").tvm_target()
    x = np.random.default_rng(0).random(prepared.inputs[0].shape, dtype=np.float32)
    runners = {}

    sess = ort_session(path, threads=2)
    feed = {prepared.inputs[0].name: x}
    runners["onnxruntime fp32 (2 threads)"] = lambda: sess.run(None, feed)

    log(f"{name}: building naive / dlight / default-schedule variants")
    # A fresh lowering per variant: a module once given to tvm.compile is not reused.
    with target:
        ours_mod = tvm.transform.Sequential(cpu_default_schedule())(_lowered(prepared, target))
    runners["TVM default schedule (tvm-compress, --tune-trials 0)"] = _vm_runner(tvm.compile(ours_mod, target), x)
    runners["TVM naive loops (plain legalization)"] = _vm_runner(tvm.compile(_lowered(prepared, target), target), x)
    if dlight:  # LLVM needed over 10 minutes for dlight's schedules of the PP-OCR detector
        with target:
            dlight_mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(_lowered(prepared, target))
        runners["TVM dlight CPU rules"] = _vm_runner(tvm.compile(dlight_mod, target), x)

    tuned_so = out_dir / f"{name}_tuned_{trials}.so"
    log(f"{name}: compiling with {trials} tuning trials (cached records are reused)")
    t0 = time.monotonic()
    rep = tvm_compress.compile(path, tuned_so, input_shapes=shapes, tune_trials=trials, bench_runs=3, log=log)
    tuning = rep["tuning"]
    label = f"TVM MetaSchedule, {trials} trials"
    runners[label] = _vm_runner(tvm.runtime.load_module(str(tuned_so)), x)

    # Warm up, then interleave: one run of each variant per round.
    slow = {"TVM naive loops (plain legalization)", "TVM dlight CPU rules"}
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()
    for r in range(runs):
        for k, fn in runners.items():
            if k in slow and r >= max(3, runs // 5):
                continue  # seconds per run on big models; a few runs suffice
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    ort_ms = float(np.median(times["onnxruntime fp32 (2 threads)"]))
    rows = []
    for k, ts in times.items():
        med = float(np.median(ts))
        rows.append({"model": name, "variant": k, "median_ms": med, "p90_ms": float(np.percentile(ts, 90)),
                     "runs": len(ts), "x_vs_onnxruntime": med / ort_ms,
                     **({"tuning": tuning} if k == label else {})})
    rows[-1]["tuning_seconds_this_run"] = round(time.monotonic() - t0, 1)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,det", help=f"comma list of {','.join(MODELS)}")
    ap.add_argument("--trials", default="1536",
                    help="MetaSchedule budget for the tuned variant: N for all models, or MODEL=N,...")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out-dir", default="bench-out")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--no-dlight", action="store_true", help="skip the dlight variant (slow LLVM build on big models)")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if "=" in args.trials:
        trials = {k.strip(): int(v) for k, v in (p.split("=") for p in args.trials.split(","))}
    else:
        trials = {}
    rows = []
    for name in args.models.split(","):
        name = name.strip()
        n = trials.get(name, int(args.trials) if not trials else None)
        if n is None:
            sys.exit(f"bench_cpu: no --trials given for {name}")
        rows += bench_model(name, n, args.runs, out_dir, log, dlight=not args.no_dlight)
    print("\n| model | variant | median ms | p90 ms | runs | time / onnxruntime |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['runs']} | "
              f"{r['x_vs_onnxruntime']:.2f}x |")
    for r in rows:
        if "tuning" in r:
            t = r["tuning"]
            print(f"{r['model']}: {t['trials']} trials over {t['tasks']} tasks "
                  f"({t.get('new_trials', 0)} new this run, {t['seconds']} s tuning this run)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
