"""Accuracy-aware fallback: keep the most sensitive layers in float until a budget holds.

Works on one compiled "masked" QDQ module whose extra input ``qmask[layer]`` blends each layer's
quantization in or out, so that measuring N layers costs N runs, not N compilations.

Sensitivity of a layer = relative L2 error of the model outputs (against the float model) with
only that layer in int8. Layers are moved to float in order of sensitivity until
``max_error`` (relative L2 error with all remaining layers in int8) or ``max_accuracy_drop``
(top-1 points on labelled data) holds.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def relative_error(outs: List[List[np.ndarray]], ref: List[List[np.ndarray]]) -> float:
    """max over outputs of ||y - y_ref|| / ||y_ref|| over all evaluated samples."""
    worst = 0.0
    for k in range(len(ref[0])):
        a = np.concatenate([o[k].reshape(o[k].shape[0], -1) for o in outs]).astype("float64")
        b = np.concatenate([r[k].reshape(r[k].shape[0], -1) for r in ref]).astype("float64")[: a.shape[0]]
        denom = max(np.linalg.norm(b), 1e-12)
        worst = max(worst, float(np.linalg.norm(a - b) / denom))
    return worst


def top1(outs: List[List[np.ndarray]], labels: np.ndarray) -> float:
    logits = np.concatenate([o[0].reshape(o[0].shape[0], -1) for o in outs])
    n = min(len(labels), logits.shape[0])
    return 100.0 * float(np.mean(np.argmax(logits[:n], axis=1) == labels[:n]))


def choose_fallback(masked_mod, data, batch, names, float_outputs, n_eval, int8_layers,
                    layer_names: Dict[int, str], cfg, log) -> dict:
    from ._host import flatten, host_run

    run = host_run(masked_mod)
    num_layers = max(layer_names) + 1

    def evaluate(enabled) -> List[List[np.ndarray]]:
        mask = np.zeros(num_layers, "float32")
        mask[list(enabled)] = 1.0
        outs, seen = [], 0
        for feed, idx in data.batches(batch, limit=n_eval):
            res = flatten(run(*[feed[n] for n in names], mask))
            outs.append([r[: len(idx)] for r in res])
            seen += len(idx)
        return outs

    ref = float_outputs
    labels = None if data.labels is None else data.labels[:n_eval]
    use_acc = cfg.max_accuracy_drop is not None
    float_acc = top1(ref, labels) if use_acc else None

    sensitivity = {}
    for layer in int8_layers:
        sensitivity[layer] = relative_error(evaluate([layer]), ref)
        log(f"quantize: sensitivity of {layer_names[layer]}: output error {sensitivity[layer]:.4g}")

    def measure(enabled):
        outs = evaluate(enabled)
        err = relative_error(outs, ref)
        acc = top1(outs, labels) if use_acc else None
        return err, acc

    def within(err, acc):
        if use_acc:
            return float_acc - acc <= float(cfg.max_accuracy_drop) + 1e-9
        return err <= float(cfg.max_error)

    enabled = list(int8_layers)
    err, acc = measure(enabled)
    start_err, start_acc = err, acc
    order = sorted(int8_layers, key=lambda l: -sensitivity[l])
    fallen, reasons, steps = [], {}, []
    budget = (f"--max-accuracy-drop {cfg.max_accuracy_drop}" if use_acc else f"--max-error {cfg.max_error}")
    for rank, layer in enumerate(order):
        if within(err, acc):
            break
        before = (err, acc)
        enabled.remove(layer)
        err, acc = measure(enabled)
        fallen.append(layer)
        what = (f"top-1 drop {float_acc - before[1]:.2f} -> {float_acc - acc:.2f} points" if use_acc
                else f"output error {before[0]:.4g} -> {err:.4g}")
        reasons[layer] = (
            f"most sensitive remaining layer (rank {rank + 1}: output error {sensitivity[layer]:.4g} "
            f"with only this layer in int8); kept float for {budget} ({what})"
        )
        steps.append({"layer": layer_names[layer], "error": err, "accuracy": acc})
        log(f"quantize: {layer_names[layer]} kept in float ({what})")
    info = {
        "budget": budget,
        "eval_samples": int(min(n_eval, data.count)),
        "float_layers": fallen,
        "float_layer_names": [layer_names[l] for l in fallen],
        "error_all_int8": start_err,
        "error_final": err,
        "float_accuracy": float_acc,
        "accuracy_all_int8": start_acc,
        "accuracy_final": acc,
        "met": bool(within(err, acc)),
        "steps": steps,
        "sensitivity": {l: sensitivity[l] for l in int8_layers},
        "reasons": reasons,
        "measured_on": "fake-quantized (QDQ) model on the host, calibration samples",
    }
    return info
