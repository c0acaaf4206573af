"""Evaluation data and metrics the benchmarks share.

- demo: the bundled Fashion-MNIST images (calibration split and 500 test images, labelled).
- PP-OCR (``rapidocr-onnxruntime==1.4.4``): no photos ship with the packages here, so text lines
  and pages are rendered with the DejaVu fonts (Debian ``fonts-dejavu-core``) by Pillow; for the
  angle classifier half of the lines are turned by 180 degrees (the label); calibration and
  evaluation sets come from different seeds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-/%()"


def rapidocr_models() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        sys.exit("install the PP-OCR models: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    return Path(spec.origin).parent / "models"


# ---- rendered text data ---------------------------------------------------------------------

def fonts():
    files = sorted(FONT_DIR.glob("DejaVu*.ttf"))
    if not files:
        sys.exit(f"no DejaVu fonts under {FONT_DIR} (apt-get install fonts-dejavu-core)")
    return files


def render_line(rng, font_files):
    """A cropped text line (H, W, 3) uint8 on a noisy light/dark background."""
    return render_text_line(rng, font_files)[0]


def render_text_line(rng, font_files):
    """``render_line``'s image and the text it shows."""
    from PIL import Image, ImageDraw, ImageFont

    text = "".join(rng.choice(list(CHARS), rng.integers(4, 24))).strip() or "TEXT"
    font = ImageFont.truetype(str(font_files[rng.integers(len(font_files))]), int(rng.integers(18, 40)))
    dark_on_light = rng.random() < 0.8
    bg = tuple(int(v) for v in (rng.integers(170, 256, 3) if dark_on_light else rng.integers(0, 90, 3)))
    fg = tuple(int(v) for v in (rng.integers(0, 80, 3) if dark_on_light else rng.integers(180, 256, 3)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 8))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    arr = np.asarray(img).astype("float32")
    arr += rng.normal(0, rng.uniform(0, 12), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8), text


def cls_input(img: np.ndarray) -> np.ndarray:
    """PP-OCR angle classifier preprocessing: height 48, width <= 192, (x/255 - 0.5) / 0.5."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(192, int(math.ceil(48 * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((new_w, 48), Image.BILINEAR)).astype("float32")
    x = (resized / 255.0 - 0.5) / 0.5
    out = np.zeros((3, 48, 192), "float32")
    out[:, :, :new_w] = x.transpose(2, 0, 1)
    return out


def cls_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    font_files = fonts()
    xs, ys = [], []
    for i in range(n):
        img = render_line(rng, font_files)
        flip = i % 2 == 1
        if flip:
            img = img[::-1, ::-1]
        xs.append(cls_input(np.ascontiguousarray(img)))
        ys.append(int(flip))
    return np.stack(xs), np.array(ys)


def rec_input(img: np.ndarray, width: int = 320) -> np.ndarray:
    """PP-OCRv4 recognizer preprocessing: height 48, width <= ``width``, (x/255 - 0.5) / 0.5."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(width, int(math.ceil(48 * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((new_w, 48), Image.BILINEAR)).astype("float32")
    out = np.zeros((3, 48, width), "float32")
    out[:, :, :new_w] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def rec_data(n: int, seed: int):
    """Rendered text lines for the recognizer and their texts."""
    rng = np.random.default_rng(seed)
    font_files = fonts()
    xs, texts = [], []
    for _ in range(n):
        img, text = render_text_line(rng, font_files)
        xs.append(rec_input(img))
        texts.append(text)
    return np.stack(xs), texts


def rec_charset(model_path) -> list:
    """The recognizer's CTC classes: blank, the characters in its metadata, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return ["", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, charset) -> list:
    """Greedy CTC: per time step the best class, repeats merged, blanks dropped."""
    out = []
    for seq in probs.argmax(-1).reshape(len(probs), -1):
        chars, prev = [], -1
        for k in seq:
            if k != prev and k != 0:
                chars.append(charset[k])
            prev = k
        out.append("".join(chars))
    return out


def det_data(n: int, seed: int, size: int = 320):
    """Pages of rendered text lines, PP-OCR det preprocessing (ImageNet mean/std on x/255)."""
    rng = np.random.default_rng(seed)
    font_files = fonts()
    mean = np.array([0.485, 0.456, 0.406], "float32").reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], "float32").reshape(3, 1, 1)
    out = []
    for _ in range(n):
        base = rng.integers(120, 256, 3).astype("float32")
        grad = np.linspace(0, rng.uniform(-60, 60), size, dtype="float32")[:, None, None]
        page = np.clip(base[None, None, :] + grad + rng.normal(0, 6, (size, size, 3)), 0, 255)
        for _ in range(int(rng.integers(3, 9))):
            line = render_line(rng, font_files).astype("float32")
            lh, lw = line.shape[:2]
            if lw > size or lh > size:
                line = line[: min(lh, size), : min(lw, size)]
                lh, lw = line.shape[:2]
            y, x = int(rng.integers(0, size - lh + 1)), int(rng.integers(0, size - lw + 1))
            page[y : y + lh, x : x + lw] = line
        x = (page.transpose(2, 0, 1) / 255.0 - mean) / std
        out.append(x.astype("float32"))
    return np.stack(out)


def demo_data():
    data = np.load(REPO / "tvm_compress" / "data" / "fashion_test.npz")
    calib = (data["calib"].astype("float32") / 255.0)[:, None]
    test = (data["images"].astype("float32") / 255.0)[:, None]
    return calib, data["calib_labels"], test, data["labels"]


def host_outputs(mod, xs):
    """``mod``'s main on each sample of ``xs`` (one at a time, batch 1) in a host build."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    outs = []
    for x in xs:
        res = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[None])))
        outs.append((res if hasattr(res, "numpy") else res[0]).numpy())
    return np.concatenate(outs)


def accuracy_vs_reference(key, ref_out, out, labels) -> dict:
    """Agreement of ``out`` with the reference outputs ``ref_out`` (the float build): the text
    mask IoU (probability > 0.3) for the detector, same class (and top-1 with labels) for the
    classifiers."""
    if key == "det":
        a, b = out > 0.3, ref_out > 0.3
        return {"rel_l2_vs_float": float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)),
                "text_mask_iou_vs_float": float((a & b).sum() / max((a | b).sum(), 1))}
    n = len(ref_out)
    fa, qa = ref_out.reshape(n, -1).argmax(1), out.reshape(n, -1).argmax(1)
    res = {"same_class_as_float_pct": 100 * float(np.mean(fa == qa))}
    if labels is not None:
        res["float_top1_pct"] = 100 * float(np.mean(fa == labels[0]))
        res["top1_pct"] = 100 * float(np.mean(qa == labels[0]))
    return res
