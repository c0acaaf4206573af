#!/usr/bin/env python3
"""Train the bundled binary network: a binarized CNN on Fashion-MNIST, exported to ONNX.

Binary layers (XNOR-Net style): weights ``alpha * sign(W)`` with one alpha per output channel
(mean |W|), activations ``sign(x)``; both trained with the straight-through estimator (the
sign's gradient passed where |x| <= 1). The first layer (a float conv on the pixels) and the
last (a float Linear on a hardtanh) stay float, as in the literature.

    28x28 -> conv 32 (float) -> BN -> sign
          -> bconv 64 /2 -> BN -> sign -> bconv 64 -> BN -> sign          (14x14)
          -> bconv 128 /2 -> BN -> sign -> bconv 128 -> BN -> sign        (7x7)
          -> bconv 128 /2 -> BN -> sign -> flatten                       (4x4)
          -> blinear 2048 -> 128 -> BN -> hardtanh -> linear 128 -> 10

Exported with the sign ops visible (ONNX ``Sign``) and the binary weights as constants
(batch norms after convolutions folded by the exporter), so ``tvm-compress compile MODEL
--passes binary`` finds the binary layers by itself.

Writes (atomically) into tvm_compress/data/:
  fashion_binary.onnx       input "input" [batch,1,28,28] pixel/255, output "logits" [batch,10]
  fashion_binary_torch.npz  torch's predictions on the full test set (``pred`` uint8 [10000])
                            and ``near_tie`` (bool [10000]): images where some sign's input
                            was within 1e-6 of 0 in torch (float32 rounding may flip that sign)

Usage:  python scripts/train_binary.py [--epochs 5]
Needs torch (the "test" extra), onnxruntime and the Debian package dataset-fashion-mnist.
"""

from __future__ import annotations

import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import (  # noqa: E402
    MEAN, STD, load_fashion_mnist, npz_bytes, ort_accuracy, ort_session, seed_torch, train, training_parser,
    write_atomic,
)

TIE = 1e-6


def build_model():
    import torch
    from torch import nn
    import torch.nn.functional as F

    class SignSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sign(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * (x.abs() <= 1).to(grad.dtype)

    def binary_weight(w):
        alpha = w.abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
        return SignSTE.apply(w) * alpha

    class BinConv(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, binary_weight(self.weight), None, self.stride, self.padding)

    class BinLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, binary_weight(self.weight))

    class Sign(nn.Module):
        """STE sign while training; a plain ``torch.sign`` (ONNX ``Sign``) otherwise."""

        def forward(self, x):
            return SignSTE.apply(x) if self.training else torch.sign(x)

    def bconv(cin, cout, stride):
        return [BinConv(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), Sign()]

    class FashionBinary(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([[[[MEAN]]]]))
            self.register_buffer("inv_std", torch.tensor([[[[1.0 / STD]]]]))
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), Sign(),
                *bconv(32, 64, 2), *bconv(64, 64, 1), *bconv(64, 128, 2), *bconv(128, 128, 1),
                *bconv(128, 128, 2))
            self.classifier = nn.Sequential(
                nn.Flatten(1), BinLinear(128 * 4 * 4, 128, bias=False), nn.BatchNorm1d(128),
                nn.Hardtanh(), nn.Linear(128, 10))

        def forward(self, x):
            x = (x - self.mean) * self.inv_std
            return self.classifier(self.features(x))

    return FashionBinary(), (BinConv, BinLinear, Sign)


def frozen(model, kinds):
    """An eval copy with plain conv/linear layers holding the binary weights (alpha * sign,
    a zero weight as +1): what the ONNX file holds."""
    import copy

    import torch
    from torch import nn

    bin_conv, bin_linear, _ = kinds
    out = copy.deepcopy(model).eval()
    for parent in out.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, (bin_conv, bin_linear)):
                w = child.weight.detach()
                alpha = w.abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
                wb = torch.where(w >= 0, 1.0, -1.0) * alpha
                if isinstance(child, bin_conv):
                    plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                      stride=child.stride, padding=child.padding, bias=False)
                else:
                    plain = nn.Linear(child.in_features, child.out_features, bias=False)
                plain.weight.data.copy_(wb)
                setattr(parent, name, plain.eval())
    return out


def export_onnx(model) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = "tvm-compress scripts/train_binary.py"
    return m.SerializeToString()


def torch_predictions(model, images, sign_kind):
    """(argmax per image, near_tie per image) of the frozen model in float32."""
    import torch

    closest = []

    def hook(_m, inputs, _out):
        closest.append(inputs[0].detach().abs().flatten(1).min(1).values)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, sign_kind)]
    preds, ties = [], []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            closest.clear()
            x = torch.from_numpy(images[i:i + 500, None].astype(np.float32) / 255.0)
            preds.append(model(x).argmax(1).numpy())
            ties.append((torch.stack(closest).min(0).values < TIE).numpy())
    for h in handles:
        h.remove()
    return np.concatenate(preds).astype(np.uint8), np.concatenate(ties)


def main(argv=None) -> int:
    args = training_parser(__doc__.split("\n")[0], 5, "fashion_binary.onnx, fashion_binary_torch.npz").parse_args(argv)
    data = load_fashion_mnist(Path(args.data_dir))
    seed_torch(args.seed, args.threads)
    model, kinds = build_model()
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    t0 = time.perf_counter()
    train(model, data["train_images"], data["train_labels"], args.epochs, args.batch_size, args.lr, args.seed)
    print(f"training time: {time.perf_counter() - t0:.1f}s", flush=True)

    plain = frozen(model, kinds)
    onnx_bytes = export_onnx(plain)
    test_x, test_y = data["test_images"], data["test_labels"].astype(np.int64)
    pred, near_tie = torch_predictions(plain, test_x, kinds[2])
    acc_torch = float((pred == test_y).mean())
    acc_ort = ort_accuracy(ort_session(onnx_bytes), test_x, test_y)
    print(f"accuracy on the full test set: torch {acc_torch:.4f}, onnxruntime {acc_ort:.4f}; "
          f"{int(near_tie.sum())} images with a sign input within {TIE} of 0", flush=True)

    out = Path(args.out_dir)
    write_atomic(out / "fashion_binary.onnx", onnx_bytes)
    write_atomic(out / "fashion_binary_torch.npz", npz_bytes(pred=pred, near_tie=near_tie))
    print(f"wrote {out / 'fashion_binary.onnx'} ({len(onnx_bytes):,} bytes), {out / 'fashion_binary_torch.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
