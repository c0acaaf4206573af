"""Verification data, the onnxruntime reference, and output comparison."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .errors import DataError, ModelError, VerificationError
from .specs import InputSpec

# A float pipeline (no lossy pass) must match onnxruntime within FLOAT_REL_TOL of each output's
# scale (its range or largest magnitude) plus FLOAT_ABS_TOL: reassociation and FMA contraction
# stay far below it. The absolute part keeps near-constant outputs (a sigmoid map that is ~0
# everywhere) from failing on 1e-7 differences.
FLOAT_REL_TOL = 1e-3
FLOAT_ABS_TOL = 1e-5


def random_inputs(specs: Sequence[InputSpec], seed: int = 0) -> List[np.ndarray]:
    """Seeded data respecting each input's dtype: floats in [0, 1), integers in [0, 10)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            out.append(rng.random(s.shape).astype(dt))
        elif dt.kind == "b":
            out.append(rng.integers(0, 2, s.shape).astype(dt))
        else:
            out.append(rng.integers(0, 10, s.shape).astype(dt))
    return out


def load_arrays(path: str | os.PathLike) -> Dict[str, np.ndarray]:
    """``.npz`` -> its arrays by name; ``.npy`` -> {"": array} (single-input models)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    try:
        if path.suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:
        raise DataError(f"{path}: not a readable .npy/.npz file ({type(err).__name__})") from None


def inputs_from_file(path: str | os.PathLike, specs: Sequence[InputSpec]) -> List[np.ndarray]:
    """Arrays named after the model's inputs, checked against their shapes and dtypes."""
    arrays = load_arrays(path)
    out = []
    for s in specs:
        if s.name in arrays:
            arr = arrays[s.name]
        elif len(specs) == 1 and len(arrays) == 1:
            arr = next(iter(arrays.values()))
        else:
            raise DataError(
                f"{path}: no array for input {s.name!r} (has: {', '.join(arrays) or 'none'})"
            )
        if tuple(arr.shape) != tuple(s.shape):
            raise DataError(
                f"{path}: input {s.name!r} has shape {list(arr.shape)}, the model needs {list(s.shape)}"
            )
        if arr.dtype != np.dtype(s.dtype):
            if np.can_cast(arr.dtype, s.dtype, casting="same_kind"):
                arr = arr.astype(s.dtype)
            else:
                raise DataError(
                    f"{path}: input {s.name!r} has dtype {arr.dtype}, the model needs {s.dtype}"
                )
        out.append(np.asarray(arr, order="C"))  # (ascontiguousarray turns 0-d into 1-d)
    return out


def ort_session(model: str | os.PathLike | bytes, threads: int = 2):
    """An onnxruntime session (2 threads) on a model file or serialized model bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001  (onnxruntime's own exception types)
        raise ModelError(f"onnxruntime, the reference, cannot load the model: {_ort_reason(err)}") from None


def _ort_reason(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text.split(" : ", 3)[-1] if "[ONNXRuntimeError]" in text else text or type(err).__name__


def ort_run(model, specs: Sequence[InputSpec], inputs: Sequence[np.ndarray],
            bound: Optional[Mapping[str, np.ndarray]] = None) -> List[np.ndarray]:
    """onnxruntime's outputs for ``inputs`` (and the inputs ``bound`` to fixed values)."""
    sess = ort_session(model)
    try:
        return sess.run(None, {**(bound or {}), **{s.name: x for s, x in zip(specs, inputs)}})
    except Exception as err:  # noqa: BLE001
        raise VerificationError(f"onnxruntime, the reference, cannot run the model: {_ort_reason(err)}") from None


def ort_latency(model_path, specs, inputs, repeat: int, warmup: int = 3,
                bound: Optional[Mapping[str, np.ndarray]] = None) -> List[float]:
    sess = ort_session(model_path)
    feed = {**(bound or {}), **{s.name: x for s, x in zip(specs, inputs)}}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def compare(outputs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> Dict[str, object]:
    """Max abs error and max error relative to each reference output's range."""
    if len(outputs) != len(refs):
        return {"max_abs_err": None, "max_rel_err": None,
                "error": f"{len(outputs)} outputs, onnxruntime gives {len(refs)}"}
    max_abs, max_rel, per_output, within = 0.0, 0.0, [], True
    for i, (o, r) in enumerate(zip(outputs, refs)):
        o = np.asarray(o)
        r = np.asarray(r)
        if o.shape != r.shape:
            return {"max_abs_err": None, "max_rel_err": None,
                    "error": f"output {i} has shape {list(o.shape)}, onnxruntime {list(r.shape)}"}
        of, rf = o.astype(np.float64), r.astype(np.float64)
        # NaN where the reference has NaN (sqrt of a negative), and equal infinities, agree.
        same = (np.isnan(of) & np.isnan(rf)) | (of == rf)
        diff = np.where(same, 0.0, np.abs(of - rf))
        diff = np.where(np.isnan(diff), np.inf, diff)
        abs_err = float(diff.max()) if diff.size else 0.0
        finite = rf[np.isfinite(rf)]
        rng = float(finite.max() - finite.min()) if finite.size else 0.0
        rel_err = abs_err / rng if rng > 0 else abs_err
        scale = max(rng, float(np.abs(finite).max()) if finite.size else 0.0)
        ok = abs_err <= FLOAT_REL_TOL * scale + FLOAT_ABS_TOL
        within = within and ok
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
        per_output.append({"index": i, "max_abs_err": abs_err, "max_rel_err": rel_err, "within_float_tolerance": ok})
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "within_float_tolerance": within,
            "outputs": per_output}


def latency_stats(times_ms: Sequence[float]) -> Optional[Dict[str, float]]:
    if not times_ms:
        return None
    t = np.asarray(times_ms)
    return {
        "median": round(float(np.median(t)), 4),
        "p90": round(float(np.percentile(t, 90)), 4),
        "runs": int(t.size),
    }
