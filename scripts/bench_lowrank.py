#!/usr/bin/env python3
"""Low-rank split: kernels, factorization error and model accuracy, measured here.

    python scripts/bench_lowrank.py dense [--trials 128] [--target x86-avx2]
    python scripts/bench_lowrank.py error [--models demo,rec] [--ranks 8,16,32,64]
    python scripts/bench_lowrank.py models [--models demo,rec] [--energies 0.9,0.95,0.98,0.99]
    python scripts/bench_lowrank.py speed [--models demo] [--energy 0.99] [--trials 64]
    python scripts/bench_lowrank.py libs --models rec [--eval 200] float=float.so lowrank=lr.so

``dense``: batch-1 dense layers ``x @ W`` against their split ``(x @ A) @ B`` at 50 % of the
parameters (rank rounded to the target's lanes), both built for ``--target`` the way the compile
flow builds a layer it decides on (``build.measure_on_target``: MetaSchedule with ``--trials``
per variant, records cached) and timed in interleaved rounds in one process.

``error``: whitened (SVD-LLM, calibration inputs) against plain SVD at equal rank: each layer's
relative output error on held-out calibration samples, per rank; a table and
OUT/lowrank_error.png.

``models``: the demo model (top-1 on its 500 test images) and the PP-OCRv4 recognizer
(exact-string accuracy, spaces ignored, on rendered text lines; ``bench_data.py``) split at
each energy with the whitened method on calibration data (every candidate split, unmeasured:
``min_speedup 0``), built for the host without tuning (numbers, not speed): accuracy, params and
MACs of the split layers before/after.

``speed``: the float model and ``lowrank`` (whitened at ``--energy``, the pass deciding per layer
by timing on the target) compiled by ``tvm_compress.compile`` with the same trial budget, then
timed in this process in interleaved rounds (``bench_prune.py``'s timing loop).
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

from bench_data import ctc_decode, demo_data, host_outputs, rapidocr_models, rec_charset, rec_data  # noqa: E402

DENSE = [(1024, 1024), (512, 2048), (2048, 512)]


def _models():
    return {
        "demo": (REPO / "tvm_compress" / "data" / "fashion_cnn.onnx", "input", (1, 1, 28, 28)),
        "rec": (rapidocr_models() / "ch_PP-OCRv4_rec_infer.onnx", "x", (1, 3, 48, 320)),
    }


def _data(key, n_eval):
    if key == "demo":
        calib, _, test, labels = demo_data()
        return calib[:64], test[:n_eval], labels[:n_eval]
    calib, _ = rec_data(32, seed=1)
    test, texts = rec_data(n_eval, seed=2)
    return calib, test, texts


def _score(key, out, labels, charset=None) -> float:
    if key == "demo":
        return 100 * float(np.mean(out.reshape(len(out), -1).argmax(1) == labels))
    texts = ctc_decode(out, charset)
    return 100 * float(np.mean([a.replace(" ", "") == b.replace(" ", "") for a, b in zip(texts, labels)]))


def dense(args, log):
    from tvm import relax

    from tvm_compress.build import measure_on_target
    from tvm_compress.passes.lowrank import factor_dense
    from tvm_compress.targets import get_family, get_target

    profile = get_target(args.target)
    lanes = get_family(profile.family).facts(profile).vector_lanes
    rows = []
    for k, n in DENSE:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((k, n)).astype("float32")
        rank = max(lanes, int(0.5 * k * n / (k + n)) // lanes * lanes)
        a, b, _, _ = factor_dense(w, rank)

        def module(weights):
            x = relax.Var("x", relax.TensorType((1, k), "float32"))
            bb = relax.BlockBuilder()
            with bb.function("main", [x]):
                with bb.dataflow():
                    y = x
                    for wt in weights:
                        y = bb.emit(relax.op.matmul(y, relax.const(wt)))
                    out = bb.emit_output(y)
                bb.emit_func_output(out)
            return bb.get()

        t0 = time.monotonic()
        x = rng.standard_normal((1, k)).astype("float32")
        full_ms, split_ms = measure_on_target([module([w]), module([a, b])], [x], profile,
                                              rounds=args.rounds, repeat=50, trials=args.trials)
        row = {"shape": f"{k}x{n}", "rank": rank, "params_ratio": round((k + n) * rank / (k * n), 3),
               "dense_ms": full_ms, "split_ms": split_ms, "speedup": full_ms / split_ms}
        rows.append(row)
        log(f"dense {k}->{n} b1, rank {rank}: {full_ms:.4f} ms -> {split_ms:.4f} ms "
            f"({row['speedup']:.2f}x) [{time.monotonic() - t0:.0f} s]")
    print("\n| dense layer (batch 1) | rank | params | tuned dense ms | tuned split ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['rank']} | {r['params_ratio']:.2f}x | {r['dense_ms']:.4f} | "
              f"{r['split_ms']:.4f} | {r['speedup']:.2f}x |")
    return rows


def error(args, log):
    import tvm_compress
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.passes import LowRank, LowRankConfig
    from tvm_compress.specs import TargetFacts

    out = Path(args.out)
    results = {}
    for key in args.models:
        path, name, shape = _models()[key]
        calib, _, _ = _data(key, 8)
        calib_file = out / f"{key}_calib.npz"
        np.savez(calib_file, **{name: calib})
        base = tvm_compress.load_onnx(path, {name: shape})
        per = {}
        for rank in args.ranks:
            for method in ("svd", "whitened"):
                env = PassEnv(facts=TargetFacts(vector_lanes=1), log=lambda m: None)
                cfg = LowRankConfig(rank=rank, method=method, calib=str(calib_file), min_speedup=0,
                                    eval_samples=8)
                LowRank(cfg, env)(base)
                for row in env.report["lowrank"]["layers"]:
                    if "output_error" in row and row.get("rank") == rank:
                        per.setdefault(row["name"], {}).setdefault(method, {})[rank] = row["output_error"]
                log(f"{key} rank {rank} {method}: done")
        results[key] = per
    (out / "lowrank_error.json").write_text(json.dumps(results, indent=1))
    _plot_error(results, out / "lowrank_error.png")
    print("\n| model | layer | rank | plain SVD output error | whitened output error |")
    print("|---|---|---|---|---|")
    wins = total = 0
    for key, per in results.items():
        for layer, m in per.items():
            for rank in sorted(m.get("svd", {})):
                if rank in m.get("whitened", {}):
                    total += 1
                    wins += m["whitened"][rank] < m["svd"][rank]
                    print(f"| {key} | {layer} | {rank} | {m['svd'][rank]:.4f} | {m['whitened'][rank]:.4f} |")
    print(f"\nwhitened lower in {wins} of {total} (layer, rank) pairs")


def _plot_error(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (key, per) in zip(axes[0], results.items()):
        for layer, m in list(per.items())[:6]:
            for method, style in (("svd", "--"), ("whitened", "-")):
                pts = sorted(m.get(method, {}).items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                        label=f"{layer} {method}")
        ax.set_title(f"{key}: output error vs rank (held-out)")
        ax.set_xlabel("rank")
        ax.set_ylabel("relative output error")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def models(args, log):
    import tvm_compress
    from tvm_compress.layers import layer_stats
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.passes import LowRank, LowRankConfig
    from tvm_compress.targets import get_family, get_target

    profile = get_target(args.target)
    facts = get_family(profile.family).facts(profile)
    out = Path(args.out)
    results = {}
    for key in args.models:
        path, name, shape = _models()[key]
        calib, test, labels = _data(key, args.eval)
        charset = rec_charset(path) if key == "rec" else None
        calib_file = out / f"{key}_calib.npz"
        np.savez(calib_file, **{name: calib})
        base = tvm_compress.load_onnx(path, {name: shape})
        float_score = _score(key, host_outputs(base, test), labels, charset)
        rows = []
        for energy in args.energies:
            t0 = time.monotonic()
            env = PassEnv(facts=facts, log=lambda m: None)
            mod = LowRank(LowRankConfig(energy=energy, calib=str(calib_file), min_speedup=0), env)(base)
            split = [r for r in env.report["lowrank"]["layers"] if r.get("split")]
            before = sum(r["params"] for r in split)
            after = sum(r["params_split"] for r in split)
            macs = (sum(r["macs"] for r in layer_stats(base).values()),
                    sum(r["macs"] for r in layer_stats(mod).values()))
            score = _score(key, host_outputs(mod, test), labels, charset)
            rows.append({"energy": energy, "score": score, "split_layers": len(split),
                         "split_params_before": before, "split_params_after": after,
                         "model_macs": list(macs)})
            log(f"{key} energy {energy}: {score:.1f} (float {float_score:.1f}), {len(split)} layers split, "
                f"their params {before} -> {after}, model MACs {macs[0]} -> {macs[1]} "
                f"[{time.monotonic() - t0:.0f} s]")
        results[key] = {"float_score": float_score, "eval": len(test), "rows": rows}
    (out / "lowrank_models.json").write_text(json.dumps(results, indent=1))
    print("\n| model | energy | metric (float) | split layers | their params | model MACs |")
    print("|---|---|---|---|---|---|")
    for key, res in results.items():
        for r in res["rows"]:
            print(f"| {key} | {r['energy']} | {r['score']:.1f} ({res['float_score']:.1f}) | {r['split_layers']} | "
                  f"{r['split_params_before'] / max(r['split_params_after'], 1):.2f}x fewer | "
                  f"{r['model_macs'][1] / r['model_macs'][0]:.2f}x |")


def speed(args, log):
    import tvm_compress
    from bench_prune import _time_interleaved

    out = Path(args.out)
    results = {}
    for key in args.models:
        path, name, shape = _models()[key]
        calib, test, _ = _data(key, 8)
        calib_file = out / f"{key}_calib.npz"
        np.savez(calib_file, **{name: calib})
        variants = {"float": ([], {}),
                    "lowrank": (["lowrank"], {"lowrank": {"energy": args.energy, "calib": str(calib_file)}})}
        libs, reps = {}, {}
        for label, (passes, cfgs) in variants.items():
            libs[label] = out / f"{key}_{label}.so"
            t0 = time.monotonic()
            reps[label] = tvm_compress.compile(path, libs[label], target=args.target, passes=passes,
                                               pass_configs=cfgs, input_shapes={name: shape},
                                               tune_trials=args.trials, bench_runs=5, log=lambda m: None)
            log(f"{key} {label}: built in {time.monotonic() - t0:.0f} s")
        times = _time_interleaved(libs, test[:1], args.rounds, 20)
        split = [r for r in reps["lowrank"]["pass_reports"]["lowrank"]["layers"] if r.get("split")]
        results[key] = {
            "float_ms": float(np.median(times["float"])), "lowrank_ms": float(np.median(times["lowrank"])),
            "speedup": float(np.median([a / b for a, b in zip(times["float"], times["lowrank"])])),
            "split_layers": [r["name"] for r in split],
            "split_params": [sum(r["params"] for r in split), sum(r["params_split"] for r in split)],
            "macs": [reps["lowrank"]["macs_before"], reps["lowrank"]["macs_after"]],
            "max_rel_err": reps["lowrank"]["max_rel_err"]}
        log(json.dumps(results[key]))
    (out / "lowrank_speed.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.target}, {args.trials} trials per build, energy {args.energy}\n")
    print("| model | float ms | lowrank ms | speed-up | layers split | their params | model MACs |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['float_ms']:.3f} | {r['lowrank_ms']:.3f} | {r['speedup']:.2f}x | {len(r['split_layers'])} | "
              f"{r['split_params'][0] / max(r['split_params'][1], 1):.2f}x fewer | {r['macs'][1] / r['macs'][0]:.2f}x |")


def libs(args, log):
    """The task metric of compiled libraries of one model on its evaluation set (``--eval``
    samples; writes that model's calibration set to OUT/KEY_calib.npz for the compile)."""
    import tvm_compress

    key = args.models[0]
    path, name, _ = _models()[key]
    calib, test, labels = _data(key, args.eval)
    np.savez(Path(args.out) / f"{key}_calib.npz", **{name: calib})
    charset = rec_charset(path) if key == "rec" else None
    for spec in args.libs:
        tag, _, lib = spec.partition("=")
        out = np.concatenate([tvm_compress.run(lib, {name: x[None]}).outputs[0] for x in test])
        print(f"{tag}: {_score(key, out, labels, charset):.1f} on {len(test)} samples ({lib})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("dense", "error", "models", "speed", "libs"))
    ap.add_argument("libs", nargs="*", metavar="NAME=LIB.so", help="libs: the compiled libraries")
    ap.add_argument("--energy", type=float, default=0.99, help="speed: the energy kept")
    ap.add_argument("--models", default="demo,rec")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--energies", default="0.9,0.95,0.98,0.99")
    ap.add_argument("--trials", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--out", default=str(REPO / "out" / "bench_lowrank"))
    args = ap.parse_intermixed_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.energies = [float(v) for v in args.energies.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import tvm_compress  # noqa: F401  (thread count before TVM's pool starts)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    {"dense": dense, "error": error, "models": models, "speed": speed, "libs": libs}[args.part](args, log)


if __name__ == "__main__":
    main()
