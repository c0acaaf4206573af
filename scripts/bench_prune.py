#!/usr/bin/env python3
"""Channel pruning: accuracy against the ratio (with and without recovery), and latency against
MACs, measured here.

    python scripts/bench_prune.py curves [--models demo,cls,det] [--ratios 0,0.1,0.2,0.3,0.4,0.5]
    python scripts/bench_prune.py speed [--models demo,det] [--ratio 0.3] [--trials 256]

``curves``: each model pruned at each ratio (``--target``'s vector lanes round the kept
channels), with recovery ``none``, ``bn`` and ``lstsq`` fitted on calibration data; accuracy on
held-out data, built for the host without tuning (numbers, not speed): the demo's top-1 on the
500 bundled test images; the PP-OCR angle classifier's orientation accuracy on rendered text
lines (half turned by 180 degrees); the PP-OCRv4 detector's text-mask IoU against the float
model on rendered pages. Writes OUT/curves.json, OUT/prune_curves.png and a Markdown table.

``speed``: the float model, the pruned one and, for the detector, ``quantize`` and
``prune,quantize``, each compiled by ``tvm_compress.compile`` with the same MetaSchedule trial
budget for ``--target``, then timed in this process in interleaved rounds (each build in turn,
``--runs`` calls per round); ratios are medians of per-round ratios. Writes OUT/speed.json and a
Markdown table. Data: see scripts/bench_data.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_data import accuracy_vs_reference, cls_data, demo_data, det_data, host_outputs, rapidocr_models  # noqa: E402

RECOVERY = ("none", "bn", "lstsq")


def _models():
    return {
        "demo": (REPO / "tvm_compress" / "data" / "fashion_cnn.onnx", "input", (1, 1, 28, 28)),
        "cls": (rapidocr_models() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", (1, 3, 48, 192)),
        "det": (rapidocr_models() / "ch_PP-OCRv4_det_infer.onnx", "x", (1, 3, 320, 320)),
    }


def _data(key, n_eval):
    """(calibration inputs, evaluation inputs, evaluation labels or None)."""
    if key == "demo":
        calib, _, test, labels = demo_data()
        return calib, test, labels
    if key == "cls":
        calib, _ = cls_data(96, seed=1)
        test, labels = cls_data(n_eval, seed=2)
        return calib, test, labels
    return det_data(24, seed=1), det_data(max(8, n_eval // 25), seed=2), None


def _score(key, ref, out, labels):
    acc = accuracy_vs_reference(key, ref, out, (labels, None) if labels is not None else None)
    return acc["text_mask_iou_vs_float"] if key == "det" else acc["top1_pct"]


def curves(args, log):
    import tvm_compress
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.passes import Prune, PruneConfig
    from tvm_compress.targets import get_family, get_target

    profile = get_target(args.target)
    facts = get_family(profile.family).facts(profile)
    out = Path(args.out)
    results = {}
    for key in args.models:
        path, name, shape = _models()[key]
        calib, test, labels = _data(key, args.eval)
        calib_file = out / f"{key}_calib.npz"
        np.savez(calib_file, **{name: calib})
        base = tvm_compress.load_onnx(path, {name: shape})
        ref = host_outputs(base, test)
        metric = "text-mask IoU vs float" if key == "det" else "top-1 %"
        rows = []
        for ratio in args.ratios:
            for method in RECOVERY if ratio > 0 else ("none",):
                t0 = time.monotonic()
                env = PassEnv(facts=facts, log=lambda m: None)
                cfg = PruneConfig(ratio=ratio, recover=method, calib=str(calib_file) if method != "none" else None,
                                  eval_samples=min(32, len(calib) // 4))
                mod = Prune(cfg, env)(base)
                stats = tvm_compress.layers.layer_stats(mod)
                macs = sum(r["macs"] for r in stats.values())
                score = _score(key, ref, host_outputs(mod, test), labels)
                rec = env.report["prune"].get("recovery", {})
                rows.append({"ratio": ratio, "recover": method, "score": score, "macs": macs,
                             "error_before": rec.get("output_error_before"),
                             "error_after": rec.get("output_error_after")})
                log(f"{key} ratio {ratio} {method}: {metric} {score:.3f}, MACs {macs} "
                    f"({time.monotonic() - t0:.0f} s)")
        results[key] = {"metric": metric, "macs": sum(r["macs"] for r in tvm_compress.layers.layer_stats(base).values()),
                        "float_score": _score(key, ref, ref, labels), "eval": len(test), "rows": rows}
    (out / "curves.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "prune_curves.png")
    print(_curves_table(results, args.target))


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (key, res) in zip(axes[0], results.items()):
        for method in RECOVERY:
            pts = sorted((r["ratio"], r["score"]) for r in res["rows"] if r["recover"] == method or r["ratio"] == 0)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"recover {method}")
        ax.set_title(key)
        ax.set_xlabel("channels removed (ratio)")
        ax.set_ylabel(res["metric"])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _curves_table(results, target) -> str:
    lines = []
    for key, res in results.items():
        lines.append(f"\n{key}: {res['metric']} on {res['eval']} held-out samples (float: "
                     f"{res['float_score']:.3f}), kept channels rounded for {target}\n")
        lines.append("| ratio | MACs kept | none | bn | lstsq |")
        lines.append("|---|---|---|---|---|")
        for ratio in sorted({r["ratio"] for r in res["rows"]}):
            by = {r["recover"]: r for r in res["rows"] if r["ratio"] == ratio}
            macs = next(iter(by.values()))["macs"] / res["macs"]
            cells = [f"{by[m]['score']:.3f}" if m in by else "" for m in RECOVERY]
            lines.append(f"| {ratio} | {macs:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time_interleaved(libs, x, rounds, runs):
    """Per build: per-round medians (ms), each build timed in turn in every round."""
    import tvm
    from tvm import relax

    fns = {}
    for key, lib in libs.items():
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        arg = tvm.runtime.tensor(np.ascontiguousarray(x))
        fns[key] = (vm["main"], arg)
        for _ in range(3):
            vm["main"](arg)
    times = {k: [] for k in libs}
    for _ in range(rounds):
        for key, (fn, arg) in fns.items():
            time.sleep(0.2)  # let the previous build's pool threads stop spinning
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(arg)
                ts.append((time.perf_counter() - t0) * 1e3)
            times[key].append(float(np.median(ts)))
    return times


def speed(args, log):
    import tvm_compress

    out = Path(args.out)
    results = {}
    for key in args.models:
        path, name, shape = _models()[key]
        calib, test, _ = _data(key, 64)
        calib_file = out / f"{key}_calib.npz"
        np.savez(calib_file, **{name: calib})
        variants = {"float": ([], {}), "prune": (["prune"], {"prune": {"ratio": args.ratio}})}
        if key == "det":
            variants["quantize"] = (["quantize"], {"quantize": {"calib": str(calib_file)}})
            variants["prune+quantize"] = (["prune", "quantize"], {"prune": {"ratio": args.ratio},
                                                                   "quantize": {"calib": str(calib_file)}})
        libs, reps = {}, {}
        for label, (passes, cfgs) in variants.items():
            lib = out / f"{key}_{label.replace('+', '_')}.so"
            t0 = time.monotonic()
            reps[label] = tvm_compress.compile(
                path, lib, target=args.target, passes=passes, pass_configs=cfgs, input_shapes={name: shape},
                tune_trials=args.trials, bench_runs=5, log=lambda m: None)
            libs[label] = lib
            log(f"{key} {label}: built in {time.monotonic() - t0:.0f} s")
        times = _time_interleaved(libs, test[:1], args.rounds, args.runs)
        base = times["float"]
        res = {}
        for label, rep in reps.items():
            ratios = [b / t for b, t in zip(base, times[label])]
            res[label] = {"median_ms": float(np.median(times[label])), "speedup_vs_float": float(np.median(ratios)),
                          "macs": rep["macs_after"], "mac_ratio": rep["macs_before"] / rep["macs_after"],
                          "weight_bytes": rep["weight_bytes_after"], "rounds_ms": times[label],
                          "tuning": rep["tuning"]}
        results[key] = res
        log(json.dumps({k: {kk: v[kk] for kk in ("median_ms", "speedup_vs_float", "mac_ratio")}
                        for k, v in res.items()}))
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    print(_speed_table(results, args))


def _speed_table(results, args) -> str:
    lines = [f"\n{args.target}, {args.trials} MetaSchedule trials per build, medians of {args.rounds} "
             f"interleaved rounds x {args.runs} runs\n",
             "| model | build | ms | speed-up vs float | MACs / float | weight bytes |", "|---|---|---|---|---|---|"]
    for key, res in results.items():
        for label, r in res.items():
            lines.append(f"| {key} | {label} | {r['median_ms']:.3f} | {r['speedup_vs_float']:.2f}x | "
                         f"{1 / r['mac_ratio']:.2f} | {r['weight_bytes']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("curves", "speed"))
    ap.add_argument("--models", default=None, help="comma-separated: demo, cls, det")
    ap.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--ratio", type=float, default=0.3, help="speed: the pruning ratio")
    ap.add_argument("--trials", type=int, default=256, help="speed: MetaSchedule trials per build")
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--eval", type=int, default=300, help="curves: evaluation samples (classifiers)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "out" / "bench_prune"))
    args = ap.parse_args(argv)
    args.models = [m for m in (args.models or ("demo,cls,det" if args.part == "curves" else "demo,det")).split(",") if m]
    args.ratios = [float(r) for r in args.ratios.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    (curves if args.part == "curves" else speed)(args, log)


if __name__ == "__main__":
    main()
