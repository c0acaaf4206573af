"""``tvm-compress demo``: the bundled Fashion-MNIST CNN, compiled, verified and measured.

Compiles the model for this x86 CPU with a short tuning budget (float, plus every lossy
preset that is registered, e.g. int8), then prints top-1 accuracy of each compiled library on
the bundled test images next to onnxruntime's, and latency next to onnxruntime's.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np


from . import verify
from .build import compile as compile_model
from .pass_registry import get_preset, pass_names

DEMO_TRIALS = 128
INPUT_SHAPE = (1, 1, 28, 28)


def demo_files() -> Dict[str, Path]:
    data = resources.files("tvm_compress") / "data"
    return {"model": Path(str(data / "fashion_cnn.onnx")), "data": Path(str(data / "fashion_test.npz"))}


def demo_images(split: str = "test"):
    """(float32 N x 1 x 28 x 28 in [0, 1], int64 labels) from the bundled npz."""
    with np.load(demo_files()["data"]) as d:
        key, lkey = ("images", "labels") if split == "test" else ("calib", "calib_labels")
        return (d[key].astype(np.float32) / 255.0)[:, None, :, :], d[lkey].astype(np.int64)


def _top1_tvm(lib_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    correct = 0
    for x, y in zip(images, labels):
        out = vm["main"](tvm.runtime.tensor(x[None]))
        correct += int(np.argmax(out.numpy()) == y)
    return correct / len(labels)


def _top1_ort(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    sess = verify.ort_session(model_path)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[None]})[0] for x in images])
    return float((logits.argmax(1) == labels).mean())


def run_demo(out_dir: Path, tune_trials: Optional[int] = None, log: Callable[[str], None] = print) -> List[dict]:
    files = demo_files()
    trials = DEMO_TRIALS if tune_trials is None else tune_trials
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = demo_images("test")
    verify_file = out_dir / "verify_input.npz"
    np.savez(verify_file, input=images[:1])
    # Lossy presets calibrate on the bundled training-split images (never the test images).
    variants = [("float32", [])] + [(n, [n]) for n in pass_names() if get_preset(n).lossy]
    configs = {n: {"calib": str(files["data"])} for _, ps in variants for n in ps}
    rows = []
    ort_top1 = _top1_ort(files["model"], images, labels)
    for label, passes in variants:
        lib = out_dir / f"fashion_{label}_x86.so"
        log(f"demo: compiling {label} for x86 ({trials} tuning trials)")
        t0 = time.monotonic()
        rep = compile_model(
            files["model"], lib, target="x86", passes=passes,
            pass_configs={n: configs[n] for n in passes},
            input_shapes={"input": INPUT_SHAPE}, verify_input=verify_file,
            tune_trials=trials, report=out_dir / f"fashion_{label}_x86.report.json", log=log,
        )
        rows.append({
            "variant": label,
            "target": "x86",
            "top1": _top1_tvm(lib, images, labels),
            "top1_onnxruntime": ort_top1,
            "latency_ms": rep["latency_ms"]["median"],
            "onnxruntime_ms": rep["onnxruntime_latency_ms"]["median"],
            "weight_bytes": rep["weight_bytes_after"],
            "artifact_bytes": rep["artifact_bytes"],
            "max_rel_err": rep["max_rel_err"],
            "seconds": time.monotonic() - t0,
        })
    _print_table(rows, len(labels), trials)
    return rows


def _print_table(rows: List[dict], n: int, trials: int) -> None:
    print(f"\nFashion-MNIST CNN, {n} bundled test images, x86 ({trials} tuning trials per variant)")
    head = f"{'variant':10s} {'target':7s} {'top-1':>7s} {'ORT top-1':>9s} {'ms':>8s} {'ORT ms':>8s} {'ratio':>6s} {'weights B':>10s} {'.so B':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['variant']:10s} {r['target']:7s} {r['top1'] * 100:6.2f}% {r['top1_onnxruntime'] * 100:8.2f}% "
            f"{r['latency_ms']:8.3f} {r['onnxruntime_ms']:8.3f} {r['onnxruntime_ms'] / r['latency_ms']:5.2f}x "
            f"{r['weight_bytes']:>10d} {r['artifact_bytes']:>9d}"
        )
    print("ratio = onnxruntime time / ours (above 1: ours is faster); both measured now, same input.")
