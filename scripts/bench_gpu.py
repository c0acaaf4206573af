#!/usr/bin/env python3
"""CUDA libraries of the demo model and the PP-OCR classifier and detector, float and int8, run on a GPU.

Four steps, because the machine that builds has no GPU and the GPU machine has no TVM compiler:

    python scripts/bench_gpu.py build out/gpu [--target cuda-sm90]   # here: nvcc, no GPU needed
    python scripts/bench_gpu.py pack out/gpu .gpu/carry               # here: what travels (< 64 MiB)
    bash .gpu/carry/device.sh                                         # on the GPU machine
    python scripts/bench_gpu.py report out/gpu --result DIR           # here: accuracy + table

``pack`` puts the libraries, inputs, references and models in one archive with the TVM runtime
(the installed ``tvm`` package without its compiler library, ``apache-tvm-ffi`` for Python 3.12,
``onnx2torch``; the last two fetched from PyPI) and writes ``device.sh``, which unpacks them and
runs ``run`` with the GPU machine's own Python, onnxruntime and PyTorch, leaving
``gpu_result.json``, ``gpu_outputs.npz`` and ``run.log`` in ``$OUT`` (or ``./gpu_out``).

``build`` compiles each model with ``tvm_compress.compile`` (default schedules, ``--tune-trials 0``
unless ``--trials``), float and ``--passes quantize`` (with ``--cuda-graph`` each also with the
preset feature ``cuda_graph``, named ``*_graph``), and stores the evaluation inputs, the
onnxruntime (CPU, float) outputs on them as the reference, and each model after import
(shapes fixed, shape subgraphs folded) for the GPU-side baselines.

``run`` needs only the TVM runtime (``TVM_USE_RUNTIME_LIB=1`` works: no LLVM, no compiler library),
numpy and onnxruntime. It runs every library on ``cuda:0`` over the evaluation inputs, compares the
float ones with the reference, and times batch-1 calls (median of ``--runs`` in five interleaved
rounds, the device synced around each call, the same Python loop for every engine) next to
onnxruntime's CUDA provider when
it is installed, else onnxruntime on the CPU, and PyTorch on the GPU through ``onnx2torch`` when
that imports (cuDNN float32, TF32 off; and with PyTorch's default TF32 convolutions).

``run --profile`` also records each library's slowest VM calls (the device synced around each
call, so launch overhead included) in ``gpu_result.json``. First run on an NVIDIA H200 on
2026-12-04: ``docs/benchmarks.md``.

``report`` scores the int8 outputs against the reference (detector: text-mask IoU; classifiers:
same class, top-1) and prints the Markdown table of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("demo", "cls", "det", "stem")


# ---- build (here) -------------------------------------------------------------------------

def _stem_model(path: Path) -> Path:
    """A detector stem whose pad fuses into the conv kernel (conv 3x3/2 + bias + relu + pad +
    max pool, PPHGNet-style, 1x3x320x320): dlight's gpu.Matmul cannot schedule that kernel, the
    generic fallback does. Random weights (the timing of that fallback is the point)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Pad", ["r", "pads"], ["p"]),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2], strides=[1, 1])]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 320, 320])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 160, 160])], inits)
    # IR version 8: onnxruntime builds older than this onnx package read it too
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _model_data(key: str, n_eval: int, out: Path):
    """(onnx path, input name, shape, calibration set, evaluation set, labels or None)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_data import cls_data, demo_data, det_data, rapidocr_models

    if key == "demo":
        calib, _, test, labels = demo_data()
        return (REPO / "tvm_compress" / "data" / "fashion_cnn.onnx", "input", (1, 1, 28, 28),
                calib, test[:n_eval], labels[:n_eval])
    if key == "cls":
        calib, _ = cls_data(128, seed=1)
        test, labels = cls_data(n_eval, seed=2)
        return rapidocr_models() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", (1, 3, 48, 192), calib, test, labels
    if key == "det":
        return (rapidocr_models() / "ch_PP-OCRv4_det_infer.onnx", "x", (1, 3, 320, 320),
                det_data(32, seed=3), det_data(n_eval, seed=4), None)
    if key == "stem":
        x = np.random.default_rng(5).standard_normal((2, 3, 320, 320)).astype(np.float32)
        return _stem_model(out / "stem_source.onnx"), "x", (1, 3, 320, 320), x, x, None
    raise SystemExit(f"unknown model {key!r}: {', '.join(MODELS)}")


def build(args) -> None:
    import dataclasses

    import onnx

    import tvm_compress
    from tvm_compress.targets import get_target
    from tvm_compress.verify import ort_session

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = {"target": args.target, "trials": args.trials, "models": {}}
    if (out / "bundle.json").exists():  # models built earlier for the same target stay
        old = json.loads((out / "bundle.json").read_text())
        if (old["target"], old["trials"]) == (args.target, args.trials) and not args.cuda_graph:
            bundle = old
    for key in args.models.split(","):
        n_eval = {"demo": 500, "cls": args.eval, "det": min(args.eval, 8), "stem": 2}[key]
        path, name, shape, calib, test, labels = _model_data(key, n_eval, out)
        # float16-exact inputs: the bundle travels at half the size, the reference is exact for them
        test = test.astype(np.float16).astype(np.float32)
        prepared = tvm_compress.prepare_onnx(path, {name: shape})
        onnx.save(prepared.model, str(out / f"{key}.onnx"))
        sess = ort_session(str(out / f"{key}.onnx"))
        refs = np.concatenate([sess.run(None, {name: x[None]})[0] for x in test])
        np.savez(out / f"{key}_data.npz", inputs=test.astype(np.float16), reference=refs,
                 **({"labels": labels} if labels is not None else {}))
        np.savez(out / f"{key}_calib.npz", calib=calib)
        np.save(out / f"{key}_verify.npy", test[:1])
        libs = {}
        variants = [("float", None, None)]
        if key != "stem":
            variants.append(("int8", "quantize", {"quantize": {"calib": str(out / f"{key}_calib.npz")}}))
        if args.cuda_graph:
            variants += [(f"{v}_graph", passes, cfg) for v, passes, cfg in variants]
        for variant, passes, cfg in variants:
            lib = out / f"{key}_{variant}.so"
            profile = get_target(args.target)
            if variant.endswith("_graph"):
                profile = dataclasses.replace(profile, features={**profile.features, "cuda_graph": True})
            t0 = time.monotonic()
            rep = tvm_compress.compile(path, lib, target=profile, passes=passes, pass_configs=cfg,
                                       input_shapes={name: shape}, verify_input=out / f"{key}_verify.npy",
                                       tune_trials=args.trials, bench_runs=0, log=lambda m: None)
            libs[variant] = {"lib": lib.name, "weight_bytes": rep["weight_bytes_after"],
                             "artifact_bytes": rep["artifact_bytes"],
                             "schedule_fallbacks": len(rep.get("schedule_fallbacks") or []),
                             "build_seconds": round(time.monotonic() - t0, 1)}
            print(f"{key} {variant}: {lib} ({rep['artifact_bytes']} bytes, {libs[variant]['build_seconds']} s)")
        bundle["models"][key] = {"input": name, "shape": list(shape), "onnx": f"{key}.onnx",
                                 "data": f"{key}_data.npz", "libs": libs}
    (out / "bundle.json").write_text(json.dumps(bundle, indent=1))


# ---- run (on the GPU machine) ------------------------------------------------------------

def _tvm_runtime(cuda: bool):
    """The TVM runtime, with its CUDA module loader (the sidecar library a runtime-only import skips)."""
    import tvm

    if cuda and tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    return tvm


def _interleaved_ms(calls: dict, syncs: dict, runs: int, warmup: int, rounds: int = 5) -> dict:
    """Median ms per engine over ``runs`` calls, taken in ``rounds`` interleaved rounds (a clock or
    load change hits every engine alike)."""
    times = {tag: [] for tag in calls}
    for tag, call in calls.items():
        for _ in range(warmup):
            call()
        syncs[tag]()
    for _ in range(rounds):
        for tag, call in calls.items():
            for _ in range(max(runs // rounds, 1)):
                t0 = time.perf_counter()
                call()
                syncs[tag]()
                times[tag].append((time.perf_counter() - t0) * 1e3)
    return {tag: float(np.median(t)) for tag, t in times.items()}


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / max(float(np.ptp(ref)), 1e-12))


def _tvm_engine(tvm, lib_path: Path, dev):
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)

    def infer(x):
        res = vm["main"](tvm.runtime.tensor(x, dev))
        return (res if hasattr(res, "numpy") else res[0]).numpy()

    def timed(x):
        arg = tvm.runtime.tensor(x, dev)
        return lambda: vm["main"](arg)

    return infer, timed


def _torch_engines(onnx_path: Path):
    try:
        import onnx
        import torch
        from onnx2torch import convert
    except ImportError as err:
        return {}, f"PyTorch baseline not run: {err}"
    if not torch.cuda.is_available():
        return {}, "PyTorch baseline not run: torch sees no GPU"
    try:
        model = convert(onnx.load(str(onnx_path))).eval().cuda()
    except Exception as err:  # an op onnx2torch lacks costs the baseline, not the run
        return {}, f"PyTorch baseline not run: onnx2torch: {type(err).__name__}: {err}"
    engines = {}
    for tag, tf32 in (("pytorch_fp32", False), ("pytorch_tf32", True)):
        def timed(x, tf32=tf32):
            arg = torch.from_numpy(x).cuda()

            def call():
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with torch.inference_mode():
                    return model(arg)
            return call

        def infer(x, tf32=tf32):
            out = timed(x, tf32)()
            return (out[0] if isinstance(out, (list, tuple)) else out).float().cpu().numpy()

        engines[tag] = (infer, timed, torch.cuda.synchronize)
    return engines, f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"


def _ort_engine(onnx_path: Path, name: str):
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=(
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]))
    tag = "onnxruntime_cuda" if cuda else "onnxruntime_cpu"  # its default threads: all cores

    def infer(x):
        return sess.run(None, {name: x})[0]

    def timed(x):
        return lambda: sess.run(None, {name: x})

    return tag, (infer, timed, lambda: None), f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}"


def _kernel_profile(tvm, lib_path: Path, dev, x, top: int = 8, calls: int = 5):
    """The library's slowest kernels: each VM call timed with the device synced around it (launch
    included), the median of ``calls`` calls; name, microseconds, percent of the summed time."""
    from tvm.runtime.vm import VirtualMachine

    try:
        vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
        arg = tvm.runtime.tensor(x, dev)
        times: dict = {}
        clock = {}

        def instrument(func, name, before, ret, *args):
            dev.sync()
            if before:
                clock["t0"] = time.perf_counter()
            else:
                times.setdefault(str(name), []).append((time.perf_counter() - clock["t0"]) * 1e6)
            return 0

        vm["main"](arg)
        vm.set_instrument(instrument)
        for _ in range(calls):
            vm["main"](arg)
    except Exception as err:
        return f"no profile: {type(err).__name__}: {str(err)[:200]}"
    # a kernel called k times per inference has k*calls samples: per call, sum its median over k
    per_call = {n: float(np.median(t)) * len(t) / calls for n, t in times.items()}
    total = sum(per_call.values()) or 1.0
    rows = sorted(per_call.items(), key=lambda kv: -kv[1])
    return {"calls_per_inference": sum(len(t) for t in times.values()) // calls, "total_us": round(total, 1),
            "top": [[n, round(us, 1), round(100 * us / total, 1)] for n, us in rows[:top]]}


def run(args) -> None:
    out = Path(args.out)
    bundle = json.loads((out / "bundle.json").read_text())
    cuda = bundle["target"].startswith(("cuda", "jetson"))
    tvm = _tvm_runtime(cuda)
    dev = tvm.cuda(0) if cuda else tvm.cpu(0)
    if not dev.exist:
        raise SystemExit("bench_gpu run: no GPU here")
    result = {"device": getattr(dev, "device_name", str(dev)),
              "compute_version": getattr(dev, "compute_version", None), "runs": args.runs, "models": {}}
    outputs = {}
    for key, spec in bundle["models"].items():
        data = np.load(out / spec["data"])
        xs, refs = data["inputs"].astype(np.float32), data["reference"]
        x0 = np.ascontiguousarray(xs[:1])
        engines = {v: (*_tvm_engine(tvm, out / s["lib"], dev), dev.sync) for v, s in spec["libs"].items()}
        ort_tag, ort_engine, result["onnxruntime"] = _ort_engine(out / spec["onnx"], spec["input"])
        torch_engines, result["pytorch"] = _torch_engines(out / spec["onnx"])
        engines.update({ort_tag: ort_engine, **torch_engines})
        res = {}
        for tag, (infer, _, _) in list(engines.items()):
            try:
                outs = np.concatenate([infer(np.ascontiguousarray(x[None])) for x in xs])
            except Exception as err:  # one engine's failure is reported, the others still run
                print(f"{key} {tag}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
                result.setdefault("failures", {})[f"{key}/{tag}"] = f"{type(err).__name__}: {str(err)[:300]}"
                del engines[tag]
                continue
            outputs[f"{key}/{tag}"] = outs.astype(np.float16) if key == "det" else outs
            res[tag] = {"max_rel_err_vs_reference": _rel_err(outs, refs)}
        medians = _interleaved_ms({t: e[1](x0) for t, e in engines.items()},
                                  {t: e[2] for t, e in engines.items()}, args.runs, args.warmup)
        for tag, ms in medians.items():
            res[tag]["median_ms"] = ms
            print(f"{key} {tag}: {ms:.3f} ms, max rel err {res[tag]['max_rel_err_vs_reference']:.2e}", flush=True)
        if args.profile:
            result.setdefault("kernels", {})[key] = {
                v: _kernel_profile(tvm, out / s["lib"], dev, x0) for v, s in spec["libs"].items()
                if not v.endswith("_graph")}  # a sync inside a graph capture would break it
        result["models"][key] = res
        # written after every model: a later failure leaves the earlier results
        (out / "gpu_result.json").write_text(json.dumps(result, indent=1))
        np.savez_compressed(out / "gpu_outputs.npz", **outputs)


# ---- pack (here) -------------------------------------------------------------------------

_DEVICE_SH = r"""#!/bin/bash
# Made by scripts/bench_gpu.py pack: run from the repository root on the GPU machine.
set -eo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); G=/tmp/tvmc_gpu; OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$G" "$OUT"
nvidia-smi -L
tar -xJf "$HERE/g.tar.xz" -C "$G"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$G/pip" "$HERE"/onnx2torch-*.whl
CUDART=$(find /usr/local /opt /usr/lib -name 'libcudart.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "${CUDART:-/usr/local/cuda/lib64/x}"):${LD_LIBRARY_PATH:-}
export PYTHONPATH=$G/site:$G/pip TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
rc=0; python3 scripts/bench_gpu.py run "$G/b" "$@" 2>&1 | tee "$OUT/run.log" || rc=$?
cp "$G/b/gpu_result.json" "$G/b/gpu_outputs.npz" "$OUT/" 2>/dev/null || true
exit $rc
"""


def pack(args) -> None:
    import shutil
    import subprocess
    import tarfile
    import tempfile

    import tvm

    out, dest = Path(args.out), Path(args.dest)
    bundle = json.loads((out / "bundle.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "whl"
        ffi = f"apache-tvm-ffi=={_dist_version('apache-tvm-ffi')}"
        for spec, plat in ((ffi, ["--python-version", "3.12", "--implementation", "cp", "--platform",
                                  "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64"]),
                           ("onnx2torch==1.5.15", [])):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            *plat, "-d", str(wheels), spec], check=True)
        site = Path(tmp) / "site"
        shutil.copytree(Path(tvm.__file__).parent, site / "tvm", ignore=shutil.ignore_patterns(
            "__pycache__", "libtvm_compiler.so", "3rdparty", "src"))
        (ffi_whl,) = wheels.glob("apache_tvm_ffi-*.whl")
        shutil.unpack_archive(str(ffi_whl), str(site), format="zip")
        for whl in wheels.glob("onnx2torch-*.whl"):
            shutil.copy(whl, dest)
        with tarfile.open(dest / "g.tar.xz", "w:xz") as tar:
            tar.add(site, "site")
            files = ["bundle.json"] + [v for m in bundle["models"].values() for v in (m["onnx"], m["data"])]
            files += [lib["lib"] for m in bundle["models"].values() for lib in m["libs"].values()]
            for name in files:
                tar.add(out / name, f"b/{name}")
    (dest / "device.sh").write_text(_DEVICE_SH)
    size = sum(p.stat().st_size for p in dest.iterdir()) / 2**20
    print(f"packed {dest} ({size:.1f} MiB): on the GPU machine run  bash {dest}/device.sh")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# ---- report (here) -----------------------------------------------------------------------

def report(args) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_data import accuracy_vs_reference

    out = Path(args.out)
    bundle = json.loads((out / "bundle.json").read_text())
    res = json.loads((Path(args.result or out) / "gpu_result.json").read_text())
    outs = np.load(Path(args.result or out) / "gpu_outputs.npz")
    print(f"GPU: {res['device']} (compute {res['compute_version']}); {res['onnxruntime']}; {res['pytorch']}")
    print(f"target {bundle['target']}, tuning trials {bundle['trials']}, median of {res['runs']} batch-1 calls\n")
    print("| model | engine | median ms | vs TVM float | max rel err vs ORT (CPU, float) | agreement with the float reference |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for key, engines in res["models"].items():
        data = np.load(out / bundle["models"][key]["data"])
        refs = data["reference"]
        labels = (data["labels"],) if "labels" in data else None
        base = engines.get("float", {}).get("median_ms", float("nan"))
        for tag, r in engines.items():
            acc = accuracy_vs_reference(key, refs, outs[f"{key}/{tag}"].astype(np.float32), labels) \
                if key != "stem" else {}  # random weights and inputs: the error column says it
            acc_txt = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items()) or "-"
            print(f"| {key} | {tag} | {r['median_ms']:.3f} | {base / r['median_ms']:.2f}x "
                  f"| {r['max_rel_err_vs_reference']:.1e} | {acc_txt} |")
    for what, why in res.get("failures", {}).items():
        print(f"\nfailed: {what}: {why}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build", help="compile the CUDA libraries and store inputs and references")
    b.add_argument("out")
    b.add_argument("--target", default="cuda-sm90")
    b.add_argument("--models", default=",".join(MODELS))
    b.add_argument("--trials", type=int, default=0)
    b.add_argument("--cuda-graph", action="store_true",
                   help="also build each library with features.cuda_graph (kernels replayed as CUDA graphs)")
    b.add_argument("--eval", type=int, default=32, help="classifier samples (detector: at most 8)")
    r = sub.add_parser("run", help="on the GPU machine: run, verify and time the libraries")
    r.add_argument("out")
    r.add_argument("--runs", type=int, default=200)
    r.add_argument("--warmup", type=int, default=20)
    r.add_argument("--profile", action="store_true", help="also record each library's slowest kernels")
    k = sub.add_parser("pack", help="archive the libraries with the TVM runtime for the GPU machine")
    k.add_argument("out")
    k.add_argument("dest", help="folder to write (name it in the device tool's carry)")
    p = sub.add_parser("report", help="score the GPU outputs and print the table")
    p.add_argument("out")
    p.add_argument("--result", help="folder holding gpu_result.json and gpu_outputs.npz (default: OUT)")
    args = ap.parse_args(argv)
    {"build": build, "pack": pack, "run": run, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
