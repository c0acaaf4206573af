#!/usr/bin/env python3
"""Top-1 accuracy on the full Fashion-MNIST test set (10,000 images).

  python scripts/eval_fashion_full.py [MODEL.onnx] [--library LIB.so] [--limit N]

MODEL.onnx (default: the bundled tvm_compress/data/fashion_cnn.onnx) runs in
onnxruntime. With --library, a compiled TVM Relax library also runs, one image
at a time (batch 1), and the two are compared. Inputs are pixel/255, float32
NCHW, as for the bundled model.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "tvm_compress" / "data" / "fashion_cnn.onnx"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(data_dir: Path, stem: str) -> np.ndarray:
    for name in (stem + ".gz", stem):
        path = data_dir / name
        if path.is_file():
            with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
                raw = f.read()
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise SystemExit(f"error: {stem}[.gz] not found in {data_dir}; install it with "
                     f"'apt-get install dataset-fashion-mnist' or pass --data-dir DIR")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="ONNX model")
    ap.add_argument("--library", help="compiled TVM library (.so) to evaluate as well")
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    ap.add_argument("--input-name", default=None, help="ONNX input name (default: the first)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir)
    images = read_idx(data_dir, "t10k-images-idx3-ubyte")[:args.limit]
    labels = read_idx(data_dir, "t10k-labels-idx1-ubyte")[:args.limit].astype(np.int64)
    x_all = images[:, None].astype(np.float32) / 255.0
    n = len(labels)

    import onnxruntime as ort

    if not Path(args.model).is_file():
        raise SystemExit(f"error: model {args.model} not found")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    name = args.input_name or inp.name
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    batch = fixed_batch or 500
    t0 = time.perf_counter()
    ort_pred = np.concatenate([sess.run(None, {name: x_all[i:i + batch]})[0].argmax(1)
                               for i in range(0, n, batch)])
    ort_acc = float((ort_pred == labels).mean())
    print(f"onnxruntime  {args.model}: top-1 {ort_acc:.4f} ({n} images, "
          f"{time.perf_counter() - t0:.1f}s)")

    if args.library:
        import tvm
        from tvm import relax

        if not Path(args.library).is_file():
            raise SystemExit(f"error: library {args.library} not found")
        vm = relax.VirtualMachine(tvm.runtime.load_module(args.library), tvm.cpu())
        t0 = time.perf_counter()
        tvm_pred = np.empty(n, np.int64)
        for i in range(n):
            out = vm["main"](tvm.runtime.tensor(x_all[i:i + 1]))
            if not hasattr(out, "numpy"):  # a tuple of outputs: take the first
                out = out[0]
            tvm_pred[i] = out.numpy().reshape(-1).argmax()
        tvm_acc = float((tvm_pred == labels).mean())
        agree = float((tvm_pred == ort_pred).mean())
        print(f"tvm library  {args.library}: top-1 {tvm_acc:.4f} ({n} images, "
              f"{time.perf_counter() - t0:.1f}s); agrees with onnxruntime on {agree:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
