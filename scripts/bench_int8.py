#!/usr/bin/env python3
"""int8 vs float vs onnxruntime static int8: weight bytes, accuracy, latency.

    python scripts/bench_int8.py [--models demo,cls,det] [--trials 512] [--target x86-avx2]

For each model: a float TVM build and an int8 TVM build (``--passes quantize``), both tuned with
the same MetaSchedule trial budget through ``tvm_compress.build.compile``; onnxruntime float and
onnxruntime's own static int8 (QDQ, per-channel int8 weights, calibrated on the same data).
Latency: median of ``--runs`` runs, batch 1, 2 threads for onnxruntime, this machine;
``--remeasure`` times the artifacts again in interleaved rounds, every engine by the same Python
loop, onnxruntime with 1 and 2 threads (the faster counts).

Models and data:
- demo: the bundled Fashion-MNIST CNN; top-1 on the 500 bundled test images; calibration on the
  200 bundled training images.
- cls / det: PP-OCR angle classifier and PP-OCRv4 text detector shipped by
  ``rapidocr-onnxruntime==1.4.4`` (``pip install --no-deps rapidocr-onnxruntime==1.4.4``).
  No photos ship with the packages here, so their inputs are text lines / pages rendered with
  the DejaVu fonts (Debian ``fonts-dejavu-core``) by Pillow, half of the lines turned by 180
  degrees; calibration and evaluation sets are disjoint.

Writes ``OUT/bench_int8.json`` and prints a Markdown table.
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

from bench_data import (  # noqa: E402  (scripts/ is on sys.path when run as a script)
    accuracy_vs_reference as _accuracy,
    cls_data,
    demo_data,
    det_data,
    rapidocr_models as _rapidocr_models,
)


# ---- onnxruntime static int8 ----------------------------------------------------------------

def ort_int8_variants(prepared_path: Path, out: Path, input_name: str, calib: np.ndarray) -> dict:
    """onnxruntime static int8, QDQ, per-channel int8 weights, with int8 (S8S8) and uint8 (U8S8)
    activations: {"s8s8": path, "u8s8": path}. The faster one is the comparison point."""
    from onnxruntime.quantization import QuantType

    paths = {}
    for tag, act in (("s8s8", QuantType.QInt8), ("u8s8", QuantType.QUInt8)):
        path = out / ("ort_int8.onnx" if tag == "s8s8" else "ort_int8_u8s8.onnx")
        if not path.exists():
            ort_int8(prepared_path, path, input_name, calib, act)
        paths[tag] = path
    return paths


def ort_int8(prepared_path: Path, out_path: Path, input_name: str, calib: np.ndarray, act=None) -> Path:
    from onnxruntime.quantization import QuantType

    from tvm_compress.bench import ort_static_int8

    return ort_static_int8(prepared_path, out_path, {input_name: calib},
                           activations="uint8" if act == QuantType.QUInt8 else "int8")


def ort_outputs(path, name, xs):
    from tvm_compress.verify import ort_session

    sess = ort_session(path)
    return np.concatenate([sess.run(None, {name: x[None]})[0] for x in xs])


def ort_median_ms(path, name, x, runs):
    """Median ms of ``runs`` batch-1 onnxruntime runs (2 threads) after 5 warm-up runs."""
    from tvm_compress.specs import InputSpec
    from tvm_compress.verify import ort_latency

    spec = InputSpec(name, tuple(x[None].shape), str(x.dtype))
    return float(np.median(ort_latency(path, [spec], [x[None]], runs, warmup=5)))


# Pause before timing each engine: the previous one's worker threads spin for a while after a
# run and take a core from the next on this 2-core machine.
_SETTLE_S = 0.2


def tvm_outputs(lib: Path, xs):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    fn = vm["main"]
    outs = []
    for x in xs:
        res = fn(tvm.runtime.tensor(np.ascontiguousarray(x[None])))
        res = res if hasattr(res, "numpy") else res[0]
        outs.append(res.numpy())
    return np.concatenate(outs)


def _symbolic_dims(model: Path, out: Path) -> Path:
    """Paddle exports write -1 for dynamic dims; make them symbolic so shapes can be fixed."""
    import onnx

    m = onnx.load(str(model))
    changed = False
    for inp in m.graph.input:
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.ClearField("dim_value")
                d.dim_param = f"{inp.name}_d{i}"
                changed = True
    if not changed:
        return model
    path = out / model.name
    onnx.save(m, str(path))
    return path


# ---- per-layer speed from the compiled artifacts ------------------------------------------

def _kernel_calls(lib_path, x):
    """The VM's kernel calls for one run of the artifact: [(module, name, args)]."""
    import tvm
    from tvm import relax

    lib = tvm.runtime.load_module(str(lib_path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    calls = []

    def record(_func, name, before, _ret, *args):
        if before and args and all(isinstance(a, tvm.runtime.Tensor) for a in args):
            owner = next((m for m in [lib, *lib.imports] if m.implements_function(name)), None)
            if owner is not None:
                # Copies: the VM reuses storage, so by the end of the run a kernel's input may
                # hold what later kernels wrote there (float timings can depend on the values).
                calls.append((owner, name, [tvm.runtime.tensor(a.numpy()) for a in args]))
        return 0

    vm.set_instrument(record)
    vm["main"](tvm.runtime.tensor(x))
    return calls


def _segments(calls, indices):
    """Per layer, its kernel call and the calls after it up to the next layer's kernel (the
    element-wise tail, reshapes and resizes the two builds fuse differently); None where the
    layer has no kernel. Calls before the first layer's kernel belong to no layer."""
    starts = sorted(i for i in indices if i is not None)
    return [None if i is None else calls[i:next((j for j in starts if j > i), len(calls))] for i in indices]


def _layer_call_indices(calls, candidates, sizes=None):
    """Per layer (graph order), the index in ``calls`` of the first later kernel call reading a
    weight of one of its shapes, and writing as many elements as the layer's output where
    ``sizes`` gives that (two layers can share a weight shape: a squeeze-excite conv on one
    pixel and an upsampling conv); None for a layer with no such call."""
    found, start = [], 0
    sizes = sizes or [None] * len(candidates)

    def match(i, shapes, size):
        args = calls[i][2]
        return any(tuple(a.shape) in shapes for a in args[1:]) and (
            size is None or int(np.prod(args[-1].shape)) == size)

    for shapes, size in zip(candidates, sizes):
        i = next((j for j in range(start, len(calls)) if match(j, shapes, size)), None)
        if i is None:
            i = next((j for j in range(start, len(calls)) if match(j, shapes, None)), None)
        found.append(i)
        start = start if i is None else i + 1
    return found


# Per-shape timing: the two builds' kernels alternate this many times.
_ROUNDS = 3


def _time_call(call, repeat=15, batch_s=1e-3):
    """ms of one kernel call: the fastest of ``repeat`` batches of about ``batch_s`` each.
    On this shared VM the noise only adds time (medians of 7 batches of one 0.3 ms kernel
    ranged 301-604 us in one process); the minimum is what the kernel itself costs."""
    import tvm

    owner, name, args = call
    once = min(owner.time_evaluator(name, tvm.cpu(), number=1, repeat=3)(*args).results)
    number = max(1, min(1000, int(batch_s / max(once, 1e-7))))
    results = owner.time_evaluator(name, tvm.cpu(), number=number, repeat=repeat)(*args).results
    return 1e3 * float(min(results))


def _nchw_out(w, args, onnx_out=None):
    """The kernel's output shape as the imported (NCHW) graph has it: the key QuantizeRealize
    looks layers up by. A float conv that ran channels-last reads an HWIO weight, or that
    weight in panels ``[O / P, KH, KW, I, P]``; a 1x1 one that ran as a dense layer over the
    flattened map writes ``[N, H * W, O]`` (the ONNX graph's ``onnx_out`` then)."""
    out = tuple(args[-1].shape)
    if len(w) == 4 and len(out) == 3 and onnx_out is not None:
        return tuple(onnx_out)
    hwio = (w[2], w[3], w[1], w[0]) if len(w) == 4 else None
    if hwio is None:
        return out
    shapes = [tuple(a.shape) for a in args[1:-1]]
    panels = any(len(a) == 5 and a[1:4] == hwio[:3] and a[0] * a[4] == w[0] for a in shapes)
    if panels or (hwio != tuple(w) and hwio in shapes):
        return (out[0], out[3], out[1], out[2])
    return out


def _panels(w, lanes):
    """The packed float dense weight's shapes for a 2-D layer weight (either orientation)."""
    from tvm_compress.targets.packed_dense import panel_width

    shapes = set()
    for inner, columns in (w, w[::-1]):
        panel = panel_width(columns, lanes)
        if panel is not None:
            shapes.add((columns // panel, inner, panel))
    return shapes


def _conv_panels(w, lanes):
    """The packed float conv weight's shapes for an OIHW (or OIDHW) weight (``[O / P, KH, KW,
    I, P]``; one panel of all ``O`` where a conv with its pool takes the weight in one)."""
    from tvm_compress.targets.packed_dense import panel_width

    panel = panel_width(w[0], lanes)
    taps = tuple(w[2:])
    return {(1, *taps, w[1], w[0]), *([(w[0] // panel, *taps, w[1], panel)] if panel is not None else [])}


def _onnx_out_shapes(model) -> dict:
    """Output shape of each ONNX node (by name, or its first output's), shapes inferred."""
    from tvm_compress.loader import value_shapes

    shapes = value_shapes(model)
    return {node.name or node.output[0]: shapes.get(node.output[0]) for node in model.graph.node}


def speed_table(float_lib, int8_lib, layers, x, profile, out_shapes=None):
    """Per layer shape: time of its kernel (conv/matmul + fused epilogue) in each artifact.
    ``out_shapes``: the ONNX graph's output shape per layer name (``_onnx_out_shapes``)."""
    from tvm_compress.passes.quantize_realize import layer_key
    from tvm_compress.targets.int8_conv import column_taps, pack_depthwise_weight, pack_weight
    from tvm_compress.targets import get_family
    from tvm_compress.targets.int8_intrin import KERNELS
    from tvm_compress.targets.int8_pack import target_kernel

    dot = target_kernel(profile)
    lanes = get_family(profile.family).vector_lanes(profile)
    f_shapes, q_shapes = [], []
    for layer in layers:
        w = tuple(layer["weight_shape"])
        # float convs may run channels-last, their weights then HWIO, 1x1 ones as dense layers;
        # float dense weights [K, N] are packed in panels [N / P, K, P] (one: [1, K, N])
        if len(w) == 4 and w[2:] == (1, 1):
            f_shapes.append({w, (1, 1, w[1], w[0]), (1, w[1], w[0]), *_panels((w[1], w[0]), lanes)})
        elif len(w) == 4:
            f_shapes.append({w, (w[2], w[3], w[1], w[0]), *_conv_panels(w, lanes)})
        else:
            f_shapes.append({w, *_panels(w, lanes)})
        packed = {w}
        if dot is not None:  # a matmul [K, N] runs as the 1x1 conv [N, K, 1, 1] (packed_matmul)
            zeros = np.zeros(w if len(w) == 4 else (w[1], w[0], 1, 1), np.int8)
            for k in (dot, *([KERNELS[dot.exact_fallback]] if dot.exact_fallback else [])):
                # the fallback: layers the fast kernel cannot run exactly (layer_kernel)
                packed.add(pack_weight(zeros, k).shape)
                if zeros.shape[1] == 1 and zeros.shape[3] > 1:  # one input channel (column_taps)
                    packed.add(pack_weight(column_taps(zeros, k.depth), k).shape)
            if len(w) == 4 and w[1] == 1:
                packed.add(pack_depthwise_weight(zeros, dot).shape)
                packed.add(pack_depthwise_weight(zeros, dot, "NHWC").shape)  # channels-last int8
                packed.add(pack_depthwise_weight(zeros, dot, "NHWC", pairs=True).shape)  # two taps a step
        q_shapes.append(packed)
    outs = [(out_shapes or {}).get(layer["name"]) for layer in layers]
    sizes = [int(np.prod(o)) if o else None for o in outs]
    f_all, q_all = _kernel_calls(float_lib, x), _kernel_calls(int8_lib, x)
    f_idx, q_idx = _layer_call_indices(f_all, f_shapes, sizes), _layer_call_indices(q_all, q_shapes, sizes)
    table, skipped = {}, {}
    # Interleaved, so both sides see the same machine state.
    for layer, f_seg, q_seg in zip(layers, _segments(f_all, f_idx), _segments(q_all, q_idx)):
        if f_seg is None or q_seg is None:
            skipped[layer["name"]] = "no kernel found in " + ("the float build" if f_seg is None else "the int8 build")
            continue
        f_ms, q_ms = [float("inf")] * len(f_seg), [float("inf")] * len(q_seg)
        for _ in range(_ROUNDS):
            f_ms = [min(t, _time_call(c)) for t, c in zip(f_ms, f_seg)]
            q_ms = [min(t, _time_call(c)) for t, c in zip(q_ms, q_seg)]
        kind = "conv2d" if len(layer["weight_shape"]) == 4 else "matmul"
        key = layer_key(kind, layer["weight_shape"],
                        _nchw_out(layer["weight_shape"], f_seg[0][2], (out_shapes or {}).get(layer["name"])))
        row = {"float_ms": f_ms[0], "int8_ms": q_ms[0], "speedup": f_ms[0] / q_ms[0], "layer": layer["name"],
               "float_segment_ms": sum(f_ms), "int8_segment_ms": sum(q_ms),
               "segment_speedup": sum(f_ms) / sum(q_ms),
               "segment_kernels": {"float": [c[1] for c in f_seg], "int8": [c[1] for c in q_seg]}}
        f_out, q_out = (int(np.prod(seg[0][2][-1].shape)) for seg in (f_seg, q_seg))
        if f_out != q_out:
            # a squeeze-excite conv whose kernel also scales the whole map in one build only:
            # the kernels do different work, their segments the same
            row.update(float_ms=None, int8_ms=None, speedup=None,
                       note=f"fused differently: its kernel writes {f_out} elements in float, {q_out} in int8")
        table[key] = row
    return {"target": profile.name,
            "source": f"fastest kernel time (conv/matmul with its fused epilogue; segment: that kernel and "
                      f"the kernels after it up to the next layer's) in the compiled float and int8 "
                      f"artifacts, {_ROUNDS} interleaved rounds",
            "layers": table, "skipped": skipped}


# ---- one model ------------------------------------------------------------------------------

def bench_model(key, model, input_name, shape, calib, evalset, labels, args, profile, log):
    from tvm_compress.build import compile as tc_compile
    from tvm_compress.loader import prepare_onnx
    import onnx

    out = Path(args.out) / key
    out.mkdir(parents=True, exist_ok=True)
    model = _symbolic_dims(Path(model), out)
    calib_file = out / "calib.npz"
    extra = {"calib_labels": labels[1]} if labels is not None and labels[1] is not None else {}
    np.savez(calib_file, calib=calib, **extra)
    shapes = {input_name: shape}
    res = {"model": str(model), "input_shape": list(shape), "trials": args.trials, "target": profile.name}

    prepared = prepare_onnx(model, shapes)
    prepared_path = out / "float_prepared.onnx"
    fixed = prepared.model
    opset = max((o.version for o in fixed.opset_import if o.domain in ("", "ai.onnx")), default=13)
    if opset < 13:
        # per-channel QDQ (DequantizeLinear axis) needs opset 13
        from onnx import version_converter

        fixed = version_converter.convert_version(fixed, 13)
    onnx.save(fixed, str(prepared_path))
    x0 = evalset[:1][0]
    np.save(out / "verify.npy", x0[None])

    qcfg = {"calib": str(calib_file), **args.quant_options}

    def build(variant, passes, cfg):
        t0 = time.monotonic()
        rep = tc_compile(model, out / f"{variant}.so", target=profile, passes=passes, pass_configs=cfg,
                         input_shapes=shapes, verify_input=str(out / "verify.npy"),
                         tune_trials=args.trials, bench_runs=args.runs, log=log)
        res[variant] = {
            "latency_ms": rep["latency_ms"]["median"] if rep.get("latency_ms") else None,
            "weight_bytes": rep["weight_bytes_after"],
            "weight_bytes_ratio": rep["weight_bytes_after"] / rep["weight_bytes_before"],
            "artifact_bytes": rep["artifact_bytes"],
            "tuning": rep["tuning"],
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        q = rep["pass_reports"].get("quantize")
        if q is not None:
            res[variant]["layers"] = [
                {k: l.get(k) for k in ("name", "op", "status", "reason", "weight_shape")}
                for l in q.get("layers", [])
            ]
            (out / f"quantize_report_{variant}.json").write_text(json.dumps(q, indent=1))
        return rep

    rep = build("float", None, None)
    res["onnxruntime_float_latency_ms"] = rep["onnxruntime_latency_ms"]["median"]
    build("int8", "quantize", {"quantize": qcfg})
    _speed_report(res, out, model, input_name, shape, x0[None], profile, args, log)
    if res["segments_slower_in_int8"] and not args.skip_mixed:
        # The pass's answer to "int8 is slower for these shapes here": keep them float.
        build("int8_mixed", "quantize", {"quantize": {**qcfg, "speed_table": str(out / "speed_table.json"),
                                                      "slow_layers": "float"}})
        res["int8_mixed"]["float_layers"] = sum(l["status"] != "int8" for l in res["int8_mixed"]["layers"])

    variants = ort_int8_variants(prepared_path, out, input_name, calib)
    lat = {tag: ort_median_ms(p, input_name, x0, args.runs) for tag, p in variants.items()}
    best = min(lat, key=lat.get)
    ort_q = variants[best]
    res["onnxruntime_int8_latency_ms"] = lat[best]
    res["onnxruntime_int8_variant"] = best
    res["onnxruntime_int8_latency_ms_by_variant"] = lat
    res["onnxruntime_float_latency_ms_here"] = ort_median_ms(prepared_path, input_name, x0, args.runs)

    # accuracy / agreement
    f_out = tvm_outputs(out / "float.so", evalset)
    o_out = ort_outputs(ort_q, input_name, evalset)
    acc = {"samples": int(len(evalset))}
    for variant in [v for v in ("int8", "int8_mixed") if v in res]:
        q_out = tvm_outputs(out / f"{variant}.so", evalset)
        acc[variant] = _accuracy(key, f_out, q_out, labels)
    acc["ort_int8"] = {**_accuracy(key, f_out, o_out, labels), "variant": best}
    res["accuracy"] = acc
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return res


def dtype_check(args, profile, log):
    """uint8 x int8 against int8 x int8 (and float) for one conv layer with its epilogue, each
    tuned with the same trials: the measurement behind the activation dtype default."""
    import tvm
    from tvm import relax

    from tvm_compress import tuning
    from tvm_compress.pipeline import lowering_passes

    target = profile.tvm_target()
    rng = np.random.default_rng(0)
    c, hw = 64, 40
    w = rng.integers(-127, 128, (c, c, 3, 3)).astype("int8")
    results = {}
    for dt in ("float32", "int8", "uint8"):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, c, hw, hw), dt))
        with bb.function("main", [x]):
            with bb.dataflow():
                if dt == "float32":
                    y = bb.emit(relax.op.nn.conv2d(x, relax.const(w.astype("float32")), padding=1))
                    y = bb.emit(relax.op.add(y, relax.const(np.ones((1, c, 1, 1), "float32"))))
                    out = bb.emit_output(relax.op.nn.relu(y))
                else:
                    acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, out_dtype="int32"))
                    y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"),
                                                  relax.const(np.full((1, c, 1, 1), 1e-3, "float32"))))
                    y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(np.ones((1, c, 1, 1), "float32")))))
                    out = bb.emit_output(relax.op.quantize(y, relax.const(0.05, "float32"),
                                                           relax.const(0, "uint8"), out_dtype="uint8"))
            bb.emit_func_output(out)
        mod = bb.get()
        with target:
            mod = tvm.transform.Sequential(lowering_passes())(mod)
        work = Path(args.out) / "dtype_check" / dt
        tuning.tune(mod, target, args.trials, work, log=log)
        mod = tuning.apply_database(mod, target, work)
        ex = tvm.compile(mod, target)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        xin = tvm.runtime.tensor(rng.integers(0, 100, (1, c, hw, hw)).astype(dt))
        t = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=5)(xin)
        results[dt] = 1e3 * float(np.median(t.results))
        log(f"dtype check: {dt} conv3x3 {c}->{c} {hw}x{hw}: {results[dt]:.3f} ms")
    results["shape"] = f"conv3x3 {c}->{c}, {hw}x{hw}, batch 1, fused epilogue"
    results["trials"] = args.trials
    return results


def _loop_ms(call, runs) -> float:
    """Mean ms of ``runs`` calls from Python after 3 warm-up calls: the same clock and call
    overhead for every engine (a user calls both from Python)."""
    for _ in range(3):
        call()
    t0 = time.perf_counter()
    for _ in range(runs):
        call()
    return (time.perf_counter() - t0) * 1e3 / runs


def _median_ratio(a, b) -> float:
    return float(np.median(np.asarray(a) / np.asarray(b)))


def remeasure(args, log):
    """Time the existing artifacts again, interleaved, so all engines see the same machine load.

    Every engine is timed by the same Python loop. onnxruntime runs with 1 and with 2 intra-op
    threads and is credited with the faster of the two (on small models its thread pool costs
    more than it gains); TVM runs with its default pool (one thread per physical core)."""
    import tvm
    from tvm import relax

    from tvm_compress.verify import ort_session

    path = Path(args.out) / "bench_int8.json"
    results = json.loads(path.read_text())
    for key, r in results.items():
        out = Path(args.out) / key
        x = np.load(out / "verify.npy")
        name = {"demo": "input"}.get(key, "x")
        calls = {}
        for variant in [v for v in ("float", "int8", "int8_mixed") if v in r]:
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / f"{variant}.so")), tvm.cpu())
            calls[variant] = (lambda f=vm["main"], xin=tvm.runtime.tensor(x): f(xin))
        calib = np.load(out / "calib.npz")["calib"]
        variants = ort_int8_variants(out / "float_prepared.onnx", out, name, calib)
        models = {"ort_float": out / "float_prepared.onnx",
                  **{f"ort_int8_{tag}": p for tag, p in variants.items()}}
        for k, p in models.items():
            for threads in (1, 2):
                sess = ort_session(p, threads)
                calls[f"{k}@{threads}"] = (lambda s=sess: s.run(None, {name: x}))
        times = {k: [] for k in calls}
        per_round = max(1, args.runs // args.rounds)
        for _ in range(args.rounds):
            for k, call in calls.items():
                time.sleep(_SETTLE_S)
                times[k].append(_loop_ms(call, per_round))
        med = {k: float(np.median(v)) for k, v in times.items()}
        log(f"{key}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items()))
        log(f"{key} per-round range: " + ", ".join(f"{k} {min(v):.3f}-{max(v):.3f}" for k, v in times.items()))
        for variant in [v for v in ("float", "int8", "int8_mixed") if v in r]:
            r[variant]["latency_ms"] = med[variant]
            r[variant]["latency_range_ms"] = [min(times[variant]), max(times[variant])]

        def best(k):
            threads = min((1, 2), key=lambda t: med[f"{k}@{t}"])
            return med[f"{k}@{threads}"], threads

        r["onnxruntime_float_latency_ms"], r["onnxruntime_float_threads"] = best("ort_float")
        ort8 = {tag: best(f"ort_int8_{tag}") for tag in variants}
        tag = min(ort8, key=lambda t: ort8[t][0])
        r["onnxruntime_int8_latency_ms"], r["onnxruntime_int8_threads"] = ort8[tag]
        r["onnxruntime_int8_variant"] = tag
        r["onnxruntime_int8_latency_range_ms"] = [min(times[f"ort_int8_{tag}@{ort8[tag][1]}"]),
                                                 max(times[f"ort_int8_{tag}@{ort8[tag][1]}"])]
        r["onnxruntime_latency_ms_by_engine"] = {e: med[e] for m in models
                                                 for e in (f"{m}@1", f"{m}@2")}
        r.pop("onnxruntime_int8_latency_ms_by_variant", None)
        # Paired per-round ratios: both engines of a round saw the same machine load.
        ort8_key = f"ort_int8_{tag}@{ort8[tag][1]}"
        r["round_ratios"] = {
            f"{a}/{b}": _median_ratio(times[a], times[b])
            for a, b in (("float", "int8"), (ort8_key, "int8"), ("float", ort8_key))}
        log(f"{key} median per-round ratios: " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["round_ratios"].items()))
        r["rounds_ms"] = times
        r["latency_note"] = (f"re-measured interleaved (scripts/bench_int8.py --remeasure): "
                             f"{args.rounds} rounds of {per_round} Python-loop runs per engine")
    path.write_text(json.dumps(results, indent=1))
    print(table(results))


def _speed_report(res, out, model, input_name, shape, x, profile, args, log):
    """Per-shape speed table of the float and int8 artifacts, then the pass run again with it:
    its report says which layers are slower in int8 on this target."""
    from tvm_compress.loader import prepare_onnx
    from tvm_compress.pass_registry import PassEnv, get_preset, make_config
    from tvm_compress.specs import InputSpec
    from tvm_compress.targets import get_family

    out_shapes = _onnx_out_shapes(prepare_onnx(model, {input_name: tuple(shape)}).model)
    table = speed_table(out / "float.so", out / "int8.so", res["int8"]["layers"], x, profile, out_shapes)
    (out / "speed_table.json").write_text(json.dumps(table, indent=1))
    res["per_shape_speed"] = table["layers"]
    res["shapes_slower_in_int8"] = [k for k, v in table["layers"].items() if v["int8_ms"] and v["int8_ms"] > v["float_ms"]]
    res["segments_slower_in_int8"] = [k for k, v in table["layers"].items()
                                      if v["int8_segment_ms"] > v["float_segment_ms"]]
    env = PassEnv(inputs=[InputSpec(input_name, tuple(shape), "float32")],
                  facts=get_family(profile.family).facts(profile), log=log)
    preset = get_preset("quantize")
    cfg = make_config(preset, {"calib": str(out / "calib.npz"), **args.quant_options,
                               "speed_table": str(out / "speed_table.json")})
    preset.make(cfg, env)(prepare_onnx(model, {input_name: tuple(shape)}).to_relax())
    (out / "quantize_report.json").write_text(json.dumps(env.report["quantize"], indent=1))
    log(f"{len(table['layers'])} layer shapes timed, slower in int8: kernels {res['shapes_slower_in_int8']}, "
        f"with their tails {res['segments_slower_in_int8']}")


def tables(args, log):
    """Per-shape speed tables from an earlier run's artifacts, and the pass's report with them."""
    from tvm_compress.targets import get_target

    path = Path(args.out) / "bench_int8.json"
    results = json.loads(path.read_text())
    for key, r in results.items():
        out = Path(args.out) / key
        name = {"demo": "input"}.get(key, "x")
        _speed_report(r, out, Path(r["model"]), name, r["input_shape"], np.load(out / "verify.npy"),
                      get_target(r["target"]), args, log)
    path.write_text(json.dumps(results, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,cls,det")
    ap.add_argument("--trials", type=int, default=512, help="MetaSchedule trials per build (same for both)")
    ap.add_argument("--target", default="x86-avx2", help="target preset (default: AVX2+FMA, no VNNI)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5,
                    help="--remeasure: interleaved rounds (each engine in turn, runs/rounds runs each)")
    ap.add_argument("--out", default=str(REPO / "out" / "bench_int8"))
    ap.add_argument("--calib-method", default="percentile")
    ap.add_argument("--act-dtype", default="auto")
    ap.add_argument("--eval", type=int, default=400, help="evaluation samples for cls/det")
    ap.add_argument("--skip-mixed", action="store_true",
                    help="do not build the variant that keeps the shapes slower in int8 as float")
    ap.add_argument("--tables", action="store_true",
                    help="only build the per-shape speed tables of an earlier run and report with them")
    ap.add_argument("--remeasure", action="store_true",
                    help="only time the artifacts of an earlier run again, interleaved")
    ap.add_argument("--dtype-check", action="store_true",
                    help="only time one conv as float, int8 x int8 and uint8 x int8")
    args = ap.parse_args(argv)
    args.quant_options = {"calib_method": args.calib_method, "activation_dtype": args.act_dtype}

    from tvm_compress.targets import get_target

    profile = get_target(args.target)

    def log(msg):
        print(msg, flush=True)

    results = {}
    if args.remeasure:
        remeasure(args, log)
        return
    if args.tables:
        tables(args, log)
        return
    if args.dtype_check:
        res = dtype_check(args, profile, log)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dtype_check.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for key in models:
        t0 = time.monotonic()
        if key == "demo":
            calib, calib_y, test, test_y = demo_data()
            r = bench_model("demo", REPO / "tvm_compress" / "data" / "fashion_cnn.onnx", "input",
                            (1, 1, 28, 28), calib, test, (test_y, calib_y), args, profile, log)
        elif key == "cls":
            calib, _ = cls_data(128, seed=1)
            test, test_y = cls_data(args.eval, seed=2)
            r = bench_model("cls", _rapidocr_models() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "x",
                            (1, 3, 48, 192), calib, test, (test_y, None), args, profile, log)
        elif key == "det":
            calib = det_data(32, seed=3)
            test = det_data(min(args.eval, 32), seed=4)
            r = bench_model("det", _rapidocr_models() / "ch_PP-OCRv4_det_infer.onnx", "x",
                            (1, 3, 320, 320), calib, test, None, args, profile, log)
        else:
            sys.exit(f"unknown model {key!r}: demo, cls, det")
        r["seconds"] = round(time.monotonic() - t0, 1)
        results[key] = r
        log(json.dumps({k: v for k, v in r.items() if k not in ("int8",)}, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_int8.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(results)
    path.write_text(json.dumps(old, indent=1))
    print(table(old))


def _acc_text(key, acc: dict) -> str:
    if key == "det":
        return f"mask IoU {acc['text_mask_iou_vs_float']:.3f}, rel. L2 {acc['rel_l2_vs_float']:.3f}"
    text = f"same class {acc['same_class_as_float_pct']:.2f}%"
    if "top1_pct" in acc:
        text += f", top-1 {acc['float_top1_pct']:.1f} -> {acc['top1_pct']:.1f}"
    return text


def _ort_acc_text(key, r) -> str:
    acc = r["accuracy"]["ort_int8"]
    text = _acc_text(key, acc)
    if acc.get("variant", r["onnxruntime_int8_variant"]) != r["onnxruntime_int8_variant"]:
        text += f" (of its {acc['variant']} variant)"
    return text


def table(results) -> str:
    rows = ["| model | build | weight bytes vs float | accuracy vs float | ms | vs TVM float | "
            "vs ORT int8 | trials |",
            "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        f, o8 = r["float"]["latency_ms"], r["onnxruntime_int8_latency_ms"]
        rows.append(f"| {key} | TVM float | 1 | - | {f:.3f} | 1.00x | {o8 / f:.2f}x | {r['trials']} |")
        for variant, label in (("int8", "TVM int8 (all layers)"), ("int8_mixed", "TVM int8, slow shapes float")):
            if variant not in r:
                continue
            v = r[variant]
            if variant == "int8_mixed":
                label += f" ({v['float_layers']} of {len(v['layers'])})"
            rows.append(f"| {key} | {label} | {v['weight_bytes_ratio']:.3f} | "
                        f"{_acc_text(key, r['accuracy'][variant])} | {v['latency_ms']:.3f} | "
                        f"**{f / v['latency_ms']:.2f}x** | {o8 / v['latency_ms']:.2f}x | {r['trials']} |")
        th = {k: f", {r[k]} thr" if k in r else "" for k in
              ("onnxruntime_float_threads", "onnxruntime_int8_threads")}
        rows.append(f"| {key} | onnxruntime float{th['onnxruntime_float_threads']} | - | - | {r['onnxruntime_float_latency_ms']:.3f} | "
                    f"{f / r['onnxruntime_float_latency_ms']:.2f}x | - | - |")
        rows.append(f"| {key} | onnxruntime int8 ({r['onnxruntime_int8_variant']}"
                    f"{th['onnxruntime_int8_threads']}) | - | "
                    f"{_ort_acc_text(key, r)} | {o8:.3f} | {f / o8:.2f}x | 1.00x | - |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
