#!/usr/bin/env python3
"""Train the bundled demo model: a small CNN on Fashion-MNIST, exported to ONNX.

Writes (atomically) into tvm_compress/data/:
  fashion_cnn.onnx   float32 model, input "input" [batch,1,28,28] in [0,1]
                     (pixel/255; the dataset mean/std normalisation is inside
                     the model), output "logits" [batch,10]
  fashion_test.npz   images (500,28,28) uint8 + labels (500,) int64: the first
                     500 images of the official test split; calib (200,28,28)
                     uint8 + calib_labels (200,) int64: the first 200 images
                     of the training split, for int8 calibration
  README.md          what the files are, license, measured accuracies

Usage:  python scripts/train_demo.py [--data-dir DIR] [--epochs 3]
Needs torch (the "test" extra) and onnxruntime; the data comes from the
Debian package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUT_DIR = REPO / "tvm_compress" / "data"

# Statistics of the Fashion-MNIST training images, pixel/255 scale.
MEAN = 0.2860
STD = 0.3530

N_BUNDLED_TEST = 500
N_CALIB = 200

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------- data

def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} bytes of data, found {data.size}")
    return data.reshape(dims).copy()


def load_fashion_mnist(data_dir: Path) -> dict[str, np.ndarray]:
    paths = {key: _find(data_dir, stem) for key, stem in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise SystemExit(
            f"error: Fashion-MNIST idx files not found in {data_dir} (missing: "
            f"{', '.join(missing)}, plain or .gz); install them with "
            f"'apt-get install dataset-fashion-mnist' or pass --data-dir DIR")
    out = {key: read_idx(p) for key, p in paths.items()}
    for split, n in (("train", 60000), ("test", 10000)):
        if out[f"{split}_images"].shape != (n, 28, 28) or out[f"{split}_labels"].shape != (n,):
            raise SystemExit(f"error: unexpected {split} shapes in {data_dir}: "
                             f"{out[f'{split}_images'].shape}, {out[f'{split}_labels'].shape}")
    return out


# ---------------------------------------------------------------- model

def build_model():
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

    class FashionCNN(nn.Module):
        """28x28 -> conv16 -> 14x14 -> conv32 -> 7x7 -> conv64 -> 3x3 -> fc128 -> fc10."""

        def __init__(self) -> None:
            super().__init__()
            # Normalisation baked in: users feed pixel/255.
            self.register_buffer("mean", torch.tensor([[[[MEAN]]]]))
            self.register_buffer("inv_std", torch.tensor([[[[1.0 / STD]]]]))
            self.features = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64))
            self.classifier = nn.Sequential(
                nn.Flatten(1),
                nn.Linear(64 * 3 * 3, 128), nn.ReLU(inplace=True),
                nn.Linear(128, 10))

        def forward(self, x):
            x = (x - self.mean) * self.inv_std
            return self.classifier(self.features(x))

    return FashionCNN()


def train(model, images: np.ndarray, labels: np.ndarray, epochs: int, batch: int,
          lr: float, seed: int) -> None:
    import torch
    from torch import nn

    x_all = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    y_all = torch.from_numpy(labels.astype(np.int64))
    n = x_all.shape[0]
    steps_per_epoch = (n + batch - 1) // batch
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = x_all[idx], y_all[idx]
            # light augmentation: random horizontal flip (clothes are symmetric enough)
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * xb.shape[0]
            correct += (out.argmax(1) == yb).sum().item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total_loss / n:.4f} "
              f"train acc {correct / n:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    model.eval()


# ---------------------------------------------------------------- export / eval

def export_onnx(model) -> bytes:
    import torch

    import warnings

    import onnx

    buf = io.BytesIO()
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        # the legacy (TorchScript) exporter is chosen on purpose: plain, static graph
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(), (dummy,), buf, dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    # BatchNorm is folded into the convs at export; give the folded weights
    # readable names instead of "onnx::Conv_44".
    m = onnx.load_from_string(buf.getvalue())
    renames: dict[str, str] = {}
    for k, node in enumerate(n for n in m.graph.node if n.op_type == "Conv"):
        for j, suffix in ((1, "weight"), (2, "bias")):
            if len(node.input) > j and node.input[j].startswith("onnx::"):
                renames[node.input[j]] = f"conv{k + 1}.{suffix}"
    for init in m.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in m.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    m.producer_name = "tvm-compress scripts/train_demo.py"
    return m.SerializeToString()


def ort_session(model_bytes_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])


def ort_accuracy(sess, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        x = images[i:i + batch, None].astype(np.float32) / 255.0
        logits = sess.run(["logits"], {"input": x})[0]
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / len(images)


# ---------------------------------------------------------------- atomic writes

def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


README_TEMPLATE = """\
# Bundled demo data

- `fashion_cnn.onnx`: a small float32 CNN ({params:,} parameters, {size_kb:.0f} KB)
  trained on Fashion-MNIST. Input `input`: float32 `[batch, 1, 28, 28]`, pixel
  values / 255 in [0, 1] (the mean/std normalisation is inside the model); the
  batch dimension is dynamic, fix it with `--input-shape input=1,1,28,28`.
  Output `logits`: float32 `[batch, 10]`. Architecture: 3 x (conv3x3 + BatchNorm
  + ReLU + MaxPool2) with 16/32/64 channels, flatten, Linear(576->128) + ReLU,
  Linear(128->10). ONNX opset 17.
- `fashion_test.npz`:
  - `images` uint8 `(500, 28, 28)`, `labels` int64 `(500,)`: the first 500
    images of the official Fashion-MNIST test set (`t10k-*`).
  - `calib` uint8 `(200, 28, 28)`, `calib_labels` int64 `(200,)`: the first 200
    images of the training set (`train-*`), for int8 calibration (never test data).
- `fashion_binary.onnx`: a binarized CNN (689,002 parameters, 2.8 MB as float32 ONNX)
  trained on Fashion-MNIST by `scripts/train_binary.py` (5 epochs, seed 0): float conv 32,
  five binary 3x3 convs (64 /2, 64, 128 /2, 128, 128 /2), binary Linear 2048->128, float
  Linear 128->10; batch norm and `Sign` after each binary layer. Same input and output as
  `fashion_cnn.onnx`. Top-1 on the full test set: 90.83% (torch and onnxruntime). Compile it
  with `--passes binary` (see docs/binary.md).
- `fashion_binary_torch.npz`: `pred` uint8 `(10000,)`, torch's predictions of that network on
  the full test set; `near_tie` bool `(10000,)`, the 251 images where some sign's input was
  within 1e-6 of zero in torch's float32 (there float rounding may decide the sign).

Classes: {classes}.

Float model top-1 accuracy (onnxruntime, CPU):

- full test set (10,000 images): {acc_full:.2%}
- the 500 bundled test images: {acc_500:.2%}

Fashion-MNIST is (c) Zalando SE, released under the MIT license
(https://github.com/zalandoresearch/fashion-mnist).

Regenerate (about 1 minute of training on 2 idle CPU cores, more under load;
needs torch, from the `test` extra, and the Debian package `dataset-fashion-mnist`):

    python scripts/train_demo.py

Training is seeded (seed {seed}) and uses deterministic torch algorithms: reruns
on one machine give identical weights; other machines or torch versions may
differ slightly.

Full-test-set accuracy of any model, or of a compiled library:

    python scripts/eval_fashion_full.py [MODEL.onnx] [--library LIB.so]
"""


# ---------------------------------------------------------------- main

def training_parser(description: str, epochs: int, outputs: str) -> argparse.ArgumentParser:
    """The options every training script here takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                    help=f"directory with the Fashion-MNIST idx files (default {DEFAULT_DATA_DIR})")
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help=f"where to write {outputs}")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def seed_torch(seed: int, threads: int) -> None:
    """Seeded, deterministic torch on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> int:
    args = training_parser(__doc__.split("\n")[0], 3,
                           "fashion_cnn.onnx, fashion_test.npz, README.md").parse_args(argv)

    data = load_fashion_mnist(Path(args.data_dir))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: output directory {out_dir} is not writable")

    seed_torch(args.seed, args.threads)
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    t0 = time.perf_counter()
    train(model, data["train_images"], data["train_labels"],
          args.epochs, args.batch_size, args.lr, args.seed)
    train_s = time.perf_counter() - t0
    print(f"training time: {train_s:.1f}s", flush=True)

    onnx_bytes = export_onnx(model)
    import onnx
    onnx.checker.check_model(onnx.load_from_string(onnx_bytes), full_check=True)

    sess = ort_session(onnx_bytes)
    for b in (1, 7):  # dynamic batch works
        out = sess.run(["logits"], {"input": np.zeros((b, 1, 28, 28), np.float32)})[0]
        assert out.shape == (b, 10), out.shape
    test_x, test_y = data["test_images"], data["test_labels"].astype(np.int64)
    acc_full = ort_accuracy(sess, test_x, test_y)
    acc_500 = ort_accuracy(sess, test_x[:N_BUNDLED_TEST], test_y[:N_BUNDLED_TEST])
    print(f"onnxruntime accuracy: full test set (10000) {acc_full:.4f}, "
          f"bundled {N_BUNDLED_TEST} images {acc_500:.4f}", flush=True)

    npz = npz_bytes(
        images=np.ascontiguousarray(test_x[:N_BUNDLED_TEST], dtype=np.uint8),
        labels=np.ascontiguousarray(test_y[:N_BUNDLED_TEST], dtype=np.int64),
        calib=np.ascontiguousarray(data["train_images"][:N_CALIB], dtype=np.uint8),
        calib_labels=np.ascontiguousarray(data["train_labels"][:N_CALIB], dtype=np.int64))
    readme = README_TEMPLATE.format(
        params=n_params, size_kb=len(onnx_bytes) / 1024, classes=", ".join(CLASSES),
        acc_full=acc_full, acc_500=acc_500, seed=args.seed)

    write_atomic(out_dir / "fashion_cnn.onnx", onnx_bytes)
    write_atomic(out_dir / "fashion_test.npz", npz)
    write_atomic(out_dir / "README.md", readme.encode())
    print(f"wrote {out_dir / 'fashion_cnn.onnx'} ({len(onnx_bytes):,} bytes), "
          f"{out_dir / 'fashion_test.npz'} ({len(npz):,} bytes), {out_dir / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
