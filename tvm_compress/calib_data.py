"""Calibration data for the passes that measure the model (quantize, prune recovery, ...):
.npy/.npz arrays, a folder of images, or random.

Every source ends as ``CalibData``: one float array per model input, shaped (N, *input_shape[1:]),
plus optional labels. uint8 arrays and images get the stated preprocessing (x / 255, then
(x - mean) / std per channel, resize for images, NCHW or NHWC to match the model input).
``CalibDataConfig`` holds the options every such pass's config shares (its fields are the CLI's
``--calib*`` flags, added once by ``add_calib_arguments``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvm_compress.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".pnm")


@dataclass(frozen=True)
class Preprocess:
    """How uint8 arrays and image files become model inputs."""

    size: Optional[Tuple[int, int]] = None  # (height, width); default: the model input's
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # of the model input
    bgr: bool = False  # channel order of 3-channel inputs


@dataclass
class CalibData:
    inputs: Dict[str, np.ndarray]  # name -> (N, *shape[1:]) in the model's dtype
    labels: Optional[np.ndarray] = None
    source: str = ""
    random: bool = False
    # each input's leading dimension in the model where it is not the first input's (a
    # recurrent state (1, 1, H) beside a (T, F) sequence): its rows per batch; 0 for a 0-d
    # input (a sample rate), one value per batch
    sizes: Dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

    def batches(self, batch: int, limit: Optional[int] = None):
        """Dicts of (batch, ...) arrays (an input of another leading size: that many rows, in
        turn); a short tail is filled up with the first samples."""
        n = self.count if limit is None else min(self.count, limit)
        for k, start in enumerate(range(0, n, batch)):
            idx = np.arange(start, start + batch) % n
            feed = {}
            for name, arr in self.inputs.items():
                size = self.sizes.get(name, batch)
                if size == 0:
                    feed[name] = arr[k % len(arr)]
                else:
                    feed[name] = arr[idx] if size == batch else arr[np.arange(k * size, (k + 1) * size) % len(arr)]
            yield feed, idx[: min(batch, n - start)]


def _channels(shape: Sequence[int], layout: str) -> int:
    return int(shape[1] if layout == "NCHW" else shape[-1])


def _normalize(x: np.ndarray, prep: Preprocess, channels: int, layout: str) -> np.ndarray:
    """uint8 samples (N, H, W, C) or (N, C, H, W) in the model layout -> float32 normalized."""
    x = x.astype("float32") / 255.0
    mean = np.asarray(prep.mean, "float32")
    std = np.asarray(prep.std, "float32")
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise DataError(
            f"calibration preprocessing: mean/std need 1 or {channels} values, got {mean.size}/{std.size}"
        )
    if np.any(std == 0):
        raise DataError("calibration preprocessing: std must not be 0")
    bshape = (1, -1, 1, 1) if layout == "NCHW" else (1, 1, 1, -1)
    if x.ndim == 4:
        x = (x - mean.reshape(bshape)) / std.reshape(bshape)
    else:
        x = (x - mean.reshape(-1)[0]) / std.reshape(-1)[0]
    return x.astype("float32")


def _fit_array(arr: np.ndarray, name: str, shape: Sequence[int], dtype: str, prep: Preprocess, what: str):
    """(N, ...) array -> (N, *shape[1:]) of ``dtype``; one-line DataError when it does not fit."""
    want = tuple(int(d) for d in shape[1:])
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise DataError(f"calibration data {what} for input {name!r} is empty")
    got = tuple(arr.shape[1:])
    if got != want:
        if len(want) == 3 and got == want[1:] and want[0] == 1 and prep.layout == "NCHW":
            arr = arr[:, None]
        elif len(want) == 3 and got == want[:2] and want[2] == 1 and prep.layout == "NHWC":
            arr = arr[..., None]
        elif len(want) == 3 and len(got) == 3 and prep.layout == "NCHW" and got == (want[1], want[2], want[0]):
            arr = np.transpose(arr, (0, 3, 1, 2))  # HWC images for a CHW model
        else:
            raise DataError(
                f"calibration data {what} for input {name!r} has sample shape {got}, "
                f"the model expects {want}"
            )
    if arr.dtype == np.uint8 and dtype.startswith("float"):
        arr = _normalize(arr, prep, _channels(shape, prep.layout), prep.layout)
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"calibration data {what} for input {name!r} is not numeric ({arr.dtype})")
    return np.asarray(arr.astype(dtype), order="C")


def _pick_npz_key(keys: List[str], input_name: str, requested: Optional[str], path: str) -> str:
    if requested is not None:
        if requested not in keys:
            raise DataError(f"calibration file {path} has no array {requested!r} (has {', '.join(keys)})")
        return requested
    for key in (input_name, "calib", "images", "x", "data", "inputs"):
        if key in keys:
            return key
    if len(keys) == 1:
        return keys[0]
    raise DataError(
        f"calibration file {path}: cannot tell which array feeds input {input_name!r}; "
        f"name one as {path}:KEY (has {', '.join(keys)})"
    )


def _labels_for(npz, key: str) -> Optional[np.ndarray]:
    for cand in (f"{key}_labels", "calib_labels" if key == "calib" else "labels", "labels", "y"):
        if cand in npz.files:
            return np.asarray(npz[cand]).reshape(-1)
    return None


# ---- images (Pillow) ---------------------------------------------------------------------------

# Pillow modes read as one gray channel; everything else (palette, RGBA, CMYK, YCbCr...) as RGB.
_GRAY_MODES = ("1", "L", "LA", "La")
# 16-bit (and Pillow's 32-bit "I") gray, full range 0..65535: scaled to 8 bits, not clipped.
_GRAY16_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _read_image(path: Path) -> np.ndarray:
    """An image file -> (H, W, 1) or (H, W, 3) uint8; a one-line DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in _GRAY16_MODES:
                arr = np.asarray(im).astype("float64") / 257.0
                arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            else:
                arr = np.asarray(im.convert("L" if im.mode in _GRAY_MODES else "RGB"))
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown format or damaged header)") from None
    except Exception as err:  # truncated data, bad chunks, decompression bombs, I/O errors
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise DataError(f"{path}: not a readable image ({reason})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of an (H, W, C) uint8 image (align_corners=False, like cv2/PIL)."""
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    ys = np.clip((np.arange(h) + 0.5) * ih / h - 0.5, 0, ih - 1)
    xs = np.clip((np.arange(w) + 0.5) * iw / w - 0.5, 0, iw - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, ih - 1), np.minimum(x0 + 1, iw - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype("float32")
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return np.clip(np.rint(top * (1 - wy) + bot * wy), 0, 255).astype(np.uint8)


def _load_image_folder(folder: Path, shape: Sequence[int], prep: Preprocess, limit: int) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"calibration folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:limit]
    if len(shape) != 4:
        raise DataError(f"calibration images need a 4-d model input, the model input is {tuple(shape)}")
    if prep.layout == "NCHW":
        c, h, w = shape[1], shape[2], shape[3]
    else:
        h, w, c = shape[1], shape[2], shape[3]
    if prep.size is not None:
        h, w = prep.size
    out = []
    for path in files:
        img = _resize(_read_image(path), int(h), int(w))
        if c == 1 and img.shape[2] == 3:
            img = np.rint(img.astype("float32") @ np.array([0.299, 0.587, 0.114], "float32"))
            img = img.astype(np.uint8)[..., None]
        elif c == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if c == 3 and prep.bgr:
            img = img[..., ::-1]
        out.append(img if prep.layout == "NHWC" else np.transpose(img, (2, 0, 1)))
    return np.stack(out)


def missing_calibration(who: str) -> DataError:
    """The error for a pass ``who`` that needs calibration data and was given none."""
    return DataError(f"{who} needs calibration data: --calib FILE.npz|FILE.npy|IMAGE_DIR "
                     "(or --calib random, accuracy unknown)")


def load_calibration(
    spec, inputs: Sequence[Tuple[str, Sequence[int], str]], prep: Preprocess, limit: int, log=print,
    who: str = "quantize",
) -> CalibData:
    """``spec``: a path (``file.npz[:key]``, ``file.npy``, image folder), ``"random"``, or arrays.

    ``inputs``: (name, shape, dtype) of the model inputs, batch first; ``who``: the pass, for
    messages.
    """
    data = _load_calibration(spec, inputs, prep, limit, log, who)
    data.sizes = {name: int(shape[0]) if len(shape) else 0 for name, shape, _ in inputs}
    return data


def _load_calibration(spec, inputs, prep: Preprocess, limit: int, log, who: str) -> CalibData:
    names = [n for n, _, _ in inputs]
    if spec is None:
        raise missing_calibration(who)
    if isinstance(spec, Mapping) or isinstance(spec, np.ndarray):
        arrays = dict(spec) if isinstance(spec, Mapping) else {names[0]: spec}
        labels = arrays.pop("labels", None)
        out = {}
        for name, shape, dtype in inputs:
            if name not in arrays:
                raise DataError(f"calibration data has no array for input {name!r}")
            out[name] = _fit_array(np.asarray(arrays[name])[:limit], name, shape, dtype, prep, "(in memory)")
        return CalibData(out, None if labels is None else np.asarray(labels)[:limit], "in-memory arrays")
    spec = str(spec)
    if spec == "random":
        log(f"{who}: warning: calibrating on random data: the result's accuracy is unknown")
        rng = np.random.default_rng(0)
        n = min(limit, 32)
        out = {}
        for name, shape, dtype in inputs:
            arr = rng.random((n, *shape[1:]), dtype="float32") if dtype.startswith("float") else \
                rng.integers(0, 10, (n, *shape[1:])).astype(dtype)
            out[name] = arr.astype(dtype)
        return CalibData(out, None, "random", random=True)

    key = None
    path = Path(spec)
    if not path.exists() and ":" in spec:
        head, key = spec.rsplit(":", 1)
        path = Path(head)
    if not path.exists():
        raise DataError(f"calibration data {spec} does not exist")
    if path.is_dir():
        if len(inputs) != 1:
            raise DataError("an image folder can only calibrate a model with one input")
        name, shape, dtype = inputs[0]
        arr = _load_image_folder(path, shape, prep, limit)
        fitted = _fit_array(arr, name, shape, dtype, prep, str(path))
        return CalibData({name: fitted}, None, str(path))
    suffix = path.suffix.lower()
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"calibration data {path} is not a .npy/.npz file ({type(err).__name__})") from None
    out, labels = {}, None
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise DataError(f"{path} holds one array but the model has {len(inputs)} inputs; use .npz")
        name, shape, dtype = inputs[0]
        out[name] = _fit_array(loaded[:limit], name, shape, dtype, prep, str(path))
    else:
        with loaded as npz:
            if not npz.files:
                raise DataError(f"calibration file {path} is empty")
            for name, shape, dtype in inputs:
                k = _pick_npz_key(list(npz.files), name, key if len(inputs) == 1 else None, str(path))
                out[name] = _fit_array(np.asarray(npz[k])[:limit], name, shape, dtype, prep, f"{path}:{k}")
                if labels is None and len(inputs) == 1:
                    labels = _labels_for(npz, k)
    del suffix
    if labels is not None:
        labels = labels[:limit]
        if labels.shape[0] != next(iter(out.values())).shape[0]:
            labels = None
    return CalibData(out, labels, str(path))


@dataclass(frozen=True)
class CalibDataConfig:
    """Calibration-data options shared by the configs of passes that read it (subclass it)."""

    calib: Optional[str] = None
    calib_samples: int = 256
    calib_size: Optional[Tuple[int, int]] = None
    calib_mean: Tuple[float, ...] = (0.0,)
    calib_std: Tuple[float, ...] = (1.0,)
    calib_layout: str = "NCHW"
    calib_bgr: bool = False

    def needs_calibration(self, model) -> bool:
        """Whether the pass, so configured, reads calibration data on the ONNX ``model``
        (``onnx.ModelProto``): the driver refuses a missing ``calib`` before importing it.
        Passes for which the data is optional say when it is not needed."""
        return True

    @property
    def preprocess(self) -> Preprocess:
        size = tuple(int(v) for v in self.calib_size) if self.calib_size else None
        return Preprocess(size, tuple(self.calib_mean), tuple(self.calib_std), self.calib_layout,
                          bool(self.calib_bgr))


def tuple_arg(kind):
    """argparse type: ``"a,b,c"`` (or ``"HxW"``) -> a tuple of ``kind``."""
    def parse(text: str):
        try:
            return tuple(kind(v) for v in str(text).replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")

    return parse


def add_calib_arguments(group) -> None:
    """The ``--calib*`` flags (``CalibDataConfig`` fields), added once to the compile command."""
    group.add_argument("--calib", dest="calib", metavar="DATA",
                       help="calibration data: FILE.npz[:KEY], FILE.npy, an image folder, or 'random' "
                            "(accuracy unknown)")
    group.add_argument("--calib-samples", dest="calib_samples", type=int, metavar="N",
                       help="calibration samples used at most (default 256)")
    group.add_argument("--calib-size", dest="calib_size", type=tuple_arg(int), metavar="HxW",
                       help="resize calibration images to HxW (default: the model input's)")
    group.add_argument("--calib-mean", dest="calib_mean", type=tuple_arg(float), metavar="M[,M,M]",
                       help="per-channel mean subtracted after x/255 (uint8 data and images)")
    group.add_argument("--calib-std", dest="calib_std", type=tuple_arg(float), metavar="S[,S,S]",
                       help="per-channel std divided after the mean")
    group.add_argument("--calib-layout", dest="calib_layout", choices=("NCHW", "NHWC"),
                       help="layout of the model input (default NCHW)")
    group.add_argument("--calib-bgr", dest="calib_bgr", action="store_true", default=None,
                       help="feed 3-channel images as BGR")
