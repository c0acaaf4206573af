#!/usr/bin/env python3
"""Binary layers: speed of the XNOR/popcount kernels against tuned float32 kernels of the same
layers, weight bytes, and accuracy (the trained binary network vs post-training binarization).

    python scripts/bench_binary.py [--target x86-avx2] [--trials 64] [--rounds 7] [--skip-accuracy|--skip-layers]

Layers: a binary 3x3 conv of 256 channels at 14x14 and every layer of the bundled binary network
(tvm_compress/data/fashion_binary.onnx), each as ``sign -> layer`` (what a binary layer is
given): float32 (MetaSchedule, ``--trials``) against the binary pass's kernels (input packing
included), built and timed by the compile flow (``measure_on_target``: interleaved rounds, the
median per layer). The ratio is measured in this run.

Accuracy on the full Fashion-MNIST test set (10,000 images, in batches of 500): the trained binary network
through ``--passes binary`` (and its agreement with torch's predictions), the float demo model,
and the demo model binarized after training (``--binary-layers all --binary-skip-first
--binary-skip-last``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "tvm_compress" / "data"

# name, kind, (C or K, O, H=W, stride)
LAYERS = [
    ("binary conv 256->256 3x3 @14x14", "conv", (256, 256, 14, 1)),
    ("net conv 32->64 /2 @28x28", "conv", (32, 64, 28, 2)),
    ("net conv 64->64 @14x14", "conv", (64, 64, 14, 1)),
    ("net conv 64->128 /2 @14x14", "conv", (64, 128, 14, 2)),
    ("net conv 128->128 @7x7", "conv", (128, 128, 7, 1)),
    ("net conv 128->128 /2 @7x7", "conv", (128, 128, 7, 2)),
    ("net dense 2048->128", "dense", (2048, 128, 1, 1)),
]


def layer_modules(kind, dims, target):
    """(float module, binary module, input) of ``sign -> layer`` with a binary weight."""
    from tvm import relax

    from tvm_compress.layers import with_layer
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.passes import Binary, BinaryConfig
    from tvm_compress.targets import get_family, get_target

    c, o, hw, stride = dims
    rng = np.random.default_rng(0)
    if kind == "conv":
        x_shape, w = (1, c, hw, hw), rng.standard_normal((o, c, 3, 3))
    else:
        x_shape, w = (1, c), rng.standard_normal((c, o))
    w = (np.where(w >= 0, 1.0, -1.0) * 0.05).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.sign(x))
            if kind == "conv":
                y = relax.op.nn.conv2d(s, relax.const(w), strides=stride, padding=1)
            else:
                y = relax.op.matmul(s, relax.const(w))
            gv = bb.emit_output(bb.emit(with_layer(y, "layer")))
        bb.emit_func_output(gv)
    mod = bb.get()
    profile = get_target(target)
    env = PassEnv(facts=get_family(profile.family).facts(profile))
    binary = Binary(BinaryConfig(), env)(mod)
    return mod, binary, rng.standard_normal(x_shape).astype("float32"), env.report["binary"]


def bench_layers(target, trials, rounds):
    from tvm_compress.build import measure_on_target
    from tvm_compress.targets import get_target

    profile = get_target(target)
    rows = []
    for name, kind, dims in LAYERS:
        f_mod, b_mod, x, report = layer_modules(kind, dims, target)
        times = measure_on_target([f_mod, b_mod], [x], profile, rounds=rounds, trials=trials)
        if times is None:
            raise SystemExit(f"error: {target} cannot be timed here")
        f_ms, b_ms = times
        layer = report["layers"]["layer"]
        rows.append((name, f_ms, b_ms, layer["float_bytes"], layer["packed_bytes"]))
        print(f"{name}: float32 {f_ms:.4f} ms, binary {b_ms:.4f} ms, {f_ms / b_ms:.2f}x; weights "
              f"{layer['float_bytes']:,} -> {layer['packed_bytes']:,} bytes "
              f"(1/{layer['float_bytes'] / layer['packed_bytes']:.1f})", file=sys.stderr, flush=True)
    return rows


def _test_set():
    sys.path.insert(0, str(REPO / "scripts"))
    from train_demo import DEFAULT_DATA_DIR, load_fashion_mnist

    data = load_fashion_mnist(Path(DEFAULT_DATA_DIR))
    return data["test_images"], data["test_labels"].astype(np.int64)


BATCH = 500


def _predict(lib, images):
    import tvm_compress

    return np.concatenate([
        tvm_compress.run(lib, {"input": images[i:i + BATCH, None].astype(np.float32) / 255.0}).outputs[0].argmax(1)
        for i in range(0, len(images), BATCH)])


def bench_accuracy(target, trials, tmp: Path):
    import tvm_compress

    images, labels = _test_set()
    torch_ref = np.load(DATA / "fashion_binary_torch.npz")
    quiet = lambda m: None  # noqa: E731
    builds = [
        ("trained binary network, --passes binary", DATA / "fashion_binary.onnx", "binary", {}),
        ("trained binary network, float32 (same graph)", DATA / "fashion_binary.onnx", "", {}),
        ("float demo model", DATA / "fashion_cnn.onnx", "", {}),
        ("float demo model binarized after training", DATA / "fashion_cnn.onnx", "binary",
         {"binary": {"layers": "all", "skip_first": True, "skip_last": True}}),
        ("float demo model, weights only binarized after training (BWN)", DATA / "fashion_cnn.onnx", "binary",
         {"binary": {"layers": "all", "skip_first": True, "skip_last": True, "weights_only": True}}),
    ]
    rows = []
    for name, model, passes, cfg in builds:
        lib = tmp / f"{len(rows)}.so"
        rep = tvm_compress.compile(model, lib, target=target, passes=passes, pass_configs=cfg,
                                   input_shapes={"input": (BATCH, 1, 28, 28)}, tune_trials=trials, bench_runs=1,
                                   log=quiet)
        preds = _predict(lib, images)
        acc = float((preds == labels).mean())
        extra = ""
        if model.name == "fashion_binary.onnx":
            differ = preds != torch_ref["pred"]
            extra = (f"; differs from torch on {int(differ.sum())} images "
                     f"({int((differ & ~torch_ref['near_tie']).sum())} not near a sign tie)")
        rows.append((name, acc, rep["weight_bytes_after"], extra))
        print(f"{name}: top-1 {acc:.2%}, weights {rep['weight_bytes_after']:,} bytes{extra}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per float layer / model")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    args = ap.parse_args(argv)

    rows = [] if args.skip_layers else bench_layers(args.target, args.trials, args.rounds)
    if rows:
        print(f"\n| layer ({args.target}) | float32 tuned ({args.trials} trials) ms | binary ms | speed-up "
              f"| weight bytes float -> binary |")
        print("|---|---:|---:|---:|---|")
    for name, f_ms, b_ms, fb, pb in rows:
        print(f"| {name} | {f_ms:.4f} | {b_ms:.4f} | {f_ms / b_ms:.2f}x | {fb:,} -> {pb:,} (1/{fb / pb:.1f}) |")
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory(prefix="bench-binary-") as tmp:
            acc = bench_accuracy(args.target, 0, Path(tmp))
        print("\n| model (full test set, 10,000 images) | top-1 | weight bytes | |")
        print("|---|---:|---:|---|")
        for name, a, wb, extra in acc:
            print(f"| {name} | {a:.2%} | {wb:,} | {extra.lstrip('; ')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
