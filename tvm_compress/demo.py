"""``tvm-compress demo``: a small ``bench`` of the bundled Fashion-MNIST CNN.

Compiles the model for this x86 CPU (short tuning budget) and for aarch64 (verified under qemu),
without compression and with each preset that applies to a float-trained model (int8, pruning,
low-rank; binary needs a network trained binarized, which the bundled one is not),
then reports top-1 on the bundled test images, latency and size next to onnxruntime fp32 and
int8, as ``bench`` does (tables, ``report.json``, PNG plots in the output folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np


from . import verify
from .bench import PassSet, run_bench
from .pass_registry import pass_names

DEMO_TRIALS = 128
DEMO_TARGETS = ("x86", "aarch64")
# Channel pruning repaired by least squares on the calibration images: 30 % of the channels cost
# 1.6 points of top-1 with it, 55 without (docs/benchmarks.md, pruning).
DEMO_OPTIONS = {"prune": {"recover": "lstsq"}}
# The presets that compress the bundled float-trained model; ``binary`` finds no layer of a
# binarized network in it (post-training binarization left 10 % top-1: docs/benchmarks.md).
DEMO_PASSES = ("quantize", "prune", "lowrank")
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


def demo_pass_sets() -> list:
    """No compression, then each of ``DEMO_PASSES`` that is registered, in registry order."""
    return [PassSet("none", ())] + [PassSet(n, (n,)) for n in pass_names() if n in DEMO_PASSES]


def run_demo(out_dir: Path, tune_trials: Optional[int] = None, log: Callable[[str], None] = print,
             targets: Sequence[str] = DEMO_TARGETS, verbose: bool = False) -> dict:
    """``bench`` of the bundled model: x86 and aarch64, no compression and each of
    ``DEMO_PASSES`` (calibrated on the bundled training-split images, scored on the test images; pruning with
    least-squares recovery)."""
    files = demo_files()
    data = str(files["data"])
    sets = demo_pass_sets()
    return run_bench(
        files["model"], out_dir, targets=list(targets), pass_sets=sets, input_shapes={"input": INPUT_SHAPE},
        pass_configs={n: DEMO_OPTIONS[n] for s in sets for n in s.passes if n in DEMO_OPTIONS},
        calib=f"{data}:calib", eval_data=f"{data}:images",
        tune_trials=DEMO_TRIALS if tune_trials is None else tune_trials, verbose=verbose, log=log,
    )
