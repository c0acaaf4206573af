#!/usr/bin/env python
"""Float builds with the C library's exp/tanh/erf calls against the vectorized forms
(``targets/fast_math.py``).

For each model: two float libraries, identical but for the lowering of those intrinsics
(default schedules), each verified against onnxruntime by ``compile``; then ``bench_libs.py``
times both next to onnxruntime fp32, each engine in its own process, in interleaved rounds.

    python scripts/bench_fast_math.py --out out/fastmath --target x86 --models silu,gelu,rec,det

Models: ``silu``, a YOLO-style CNN of Conv-BN-SiLU blocks with a C2f-like split/concat
(random weights, seed 0, 1x3x320x320; SiLU is ``x * sigmoid(x)`` in ONNX); ``gelu``, four
ViT-S MLP blocks (LayerNorm, 384 -> 1536 -> 384 with exact GELU, i.e. ``Erf``; 197 tokens,
random weights, seed 0); ``vit``, two whole ViT-S blocks (pre-norm, 6 heads,
``softmax(q k^T / 8) v``, the same MLP); ``rec``, the PP-OCRv4 recognizer (swish blocks and softmax
attention); ``det``, the PP-OCRv4 detector (one sigmoid, at its output).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def _silu_model(path: Path) -> Path:
    import warnings

    import torch
    from torch import nn

    def cbs(cin, cout, k=3, s=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    class C2f(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.m = cbs(c, c, 1), nn.Sequential(cbs(c // 2, c // 2), cbs(c // 2, c // 2))
            self.cv2 = cbs(c + c // 2, c, 1)

        def forward(self, x):
            a, b = self.cv1(x).chunk(2, 1)
            return self.cv2(torch.cat([a, b, self.m(b)], 1))

    torch.manual_seed(0)
    layers, c = [cbs(3, 16, 3, 2)], 16
    for _ in range(4):
        layers += [cbs(c, 2 * c, 3, 2), C2f(2 * c)]
        c *= 2
    net = nn.Sequential(*layers).eval()
    for mod in net.modules():  # non-trivial statistics, so that the folded BN is not identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
    torch.onnx.export(net, torch.randn(1, 3, 320, 320), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return path


def _gelu_model(path: Path) -> Path:
    import warnings

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=384):
            super().__init__()
            self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    net = nn.Sequential(*[Block() for _ in range(4)]).eval()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
    torch.onnx.export(net, torch.randn(1, 197, 384), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return path


def _vit_model(path: Path) -> Path:
    import warnings

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=384, heads=6):
            super().__init__()
            self.heads, self.n1, self.qkv, self.proj = heads, nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.n2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(self.n1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
            x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, d))
            return x + self.fc2(self.act(self.fc1(self.n2(x))))

    torch.manual_seed(0)
    net = nn.Sequential(Block(), Block()).eval()
    warnings.filterwarnings("ignore")  # the TorchScript exporter's notices
    torch.onnx.export(net, torch.randn(1, 197, 384), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/fastmath")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--models", default="silu,gelu,rec,det")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)

    import tvm_compress
    from bench_cpu import MODELS
    from tvm_compress.targets import fast_math

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key in args.models.split(","):
        if key == "silu":
            path, shapes = _silu_model(out / "silu.onnx"), {"x": (1, 3, 320, 320)}
        elif key == "gelu":
            path, shapes = _gelu_model(out / "gelu.onnx"), {"x": (1, 197, 384)}
        elif key == "vit":
            path, shapes = _vit_model(out / "vit.onnx"), {"x": (1, 197, 384)}
        else:
            get_path, shapes = MODELS[key]
            path = get_path()
        libs = {}
        for name, on in (("libm", False), ("fast_math", True)):
            fast_math.set_enabled(on)
            lib = out / f"{key}_{name}.so"
            rep = tvm_compress.compile(path, lib, target=args.target, input_shapes=shapes, bench_runs=0,
                                       log=lambda m: None)
            err = rep.get("max_rel_err")
            print(f"{key} {name}: {lib}, max rel err vs onnxruntime {err if err is None else f'{err:.2e}'}",
                  flush=True)
            libs[name] = lib
        fast_math.set_enabled(True)
        shape = ",".join(str(d) for d in next(iter(shapes.values())))
        cmd = [sys.executable, str(REPO / "scripts" / "bench_libs.py"), "--target", args.target,
               "--rounds", str(args.rounds), "--runs", str(args.runs), "--shape", shape,
               *(["--onnx", str(path)] if key in ("silu", "gelu", "vit") else ["--model", key]),
               *(f"{n}={p}" for n, p in libs.items())]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
