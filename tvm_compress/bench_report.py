"""``bench``'s report for people: a Markdown table and matplotlib PNGs from ``report.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .bench import ORT_FP32, ORT_INT8


def _ms(t: Optional[dict]) -> str:
    if not t:
        return "-"
    if "error" in t:
        return f"error: {t['error']}"
    if "p10" not in t:  # timed on a board by compile
        return f"{t['median']:.3f} (p90 {t['p90']:.3f})"
    return f"{t['median']:.3f} ({t['p10']:.3f}-{t['p90']:.3f})"


def _ratio(t: Optional[dict], base: str) -> str:
    v = (t or {}).get(f"speedup_vs_{base.replace(' ', '_')}")
    return "-" if v is None else f"{v:.2f}x"


def _acc(a: Optional[dict]) -> str:
    if not a:
        return "-"
    if "error" in a:
        return f"error: {a['error']}"
    parts = []
    if "top1" in a:
        parts.append(f"top-1 {100 * a['top1']:.2f} %")
    if "top1_agreement" in a:
        parts.append(f"agrees {100 * a['top1_agreement']:.1f} %")
    if a.get("max_rel_err") is not None:
        parts.append(f"rel err {a['max_rel_err']:.2g}")
    return ", ".join(parts) or "-"


def markdown(rep: Dict[str, Any]) -> str:
    lines = [f"# Bench: {Path(rep['model']).name}", "",
             f"Inputs {rep['inputs']}; {rep['machine']['cpu']}, {rep['machine']['cores']} cores; "
             f"{rep['tune_trials']} tuning trials per build."]
    if rep.get("eval"):
        e = rep["eval"]
        lines.append(f"Accuracy on {e['samples']} samples of {e['source']}"
                     + (" (top-1 against its labels)" if e["labels"] else " (no labels: agreement with onnxruntime fp32)")
                     + ".")
    lines += ["", f"Timing: {rep['timing_setup']}", ""]
    if rep.get("noisy"):
        lines += [f"**Noisy machine**: round medians of {', '.join(rep['noisy'])} varied by more than 25 %; "
                  "rerun on a quiet machine before trusting small differences.", ""]
    lines += ["| target | passes | status | ms median (p10-p90) | vs onnxruntime fp32 | vs onnxruntime int8 | "
              "weight bytes | .so bytes | accuracy | verify max rel err | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in rep["baselines"].items():
        status = "ok" if b.get("path") else "-"
        lines.append(f"| host | {name} | {status} | {_ms(b.get('timing'))} | {_ratio(b.get('timing'), ORT_FP32)} | "
                     f"{_ratio(b.get('timing'), ORT_INT8)} | - | - | {_acc(b.get('accuracy'))} | - | {b['note']} |")
    for r in rep["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['target']} | {r['pass_set']} | **failed** | - | - | - | - | - | - | - | "
                         f"{r['error'].replace('|', '/')} |")
            continue
        note = r.get("timing_note") or ""
        if r.get("schedule_fallbacks"):  # kernels a default rule failed on (names in report.json)
            k = len(r["schedule_fallbacks"])
            note = "; ".join(n for n in (note, f"{k} kernel{'s' if k > 1 else ''} on a fallback schedule") if n)
        lines.append(
            f"| {r['target']} | {r['pass_set']} | ok | {_ms(r.get('timing'))} | {_ratio(r.get('timing'), ORT_FP32)} | "
            f"{_ratio(r.get('timing'), ORT_INT8)} | {r['weight_bytes_after']:,} | {r['artifact_bytes']:,} | "
            f"{_acc(r.get('accuracy'))} | {_g(r.get('max_rel_err'))} | {note} |")
    lines += ["", "Ratios above 1: ours is faster. Libraries that run only under qemu here are verified, "
              "not timed (emulation says nothing of a board's speed)."]
    k = rep.get("kernels_of_slowest") or {}
    if k.get("kernels_ms"):
        top = sorted(k["kernels_ms"].items(), key=lambda kv: -kv[1])[:10]
        lines += ["", f"## Slowest build ({k['engine']}): where the time goes", "",
                  "| kernel | ms per run |", "|---|---|"]
        lines += [f"| {n} | {v:.4f} |" for n, v in top]
    if rep.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in rep["plots"]]
    return "\n".join(lines) + "\n"


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _timed(rep) -> List[Tuple[str, str, dict]]:
    """(label, group, timing) of every timed engine, baselines first."""
    out = [(n, "onnxruntime", b["timing"]) for n, b in rep["baselines"].items()
           if b.get("timing") and "median" in b["timing"]]
    out += [(f"{r['target']} {r['pass_set']}", r["target"], r["timing"]) for r in rep["rows"]
            if r.get("timing") and "p10" in r["timing"]]
    return out


def _quality(entry: dict, labels: bool) -> Optional[float]:
    a = entry.get("accuracy") or {}
    if labels and "top1" in a:
        return 100 * a["top1"]
    return None


def _pareto(points: List[Tuple[float, float]]) -> List[int]:
    """Indices of points no other point beats on both (lower x, higher y)."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2, y2) != (x, y) for x2, y2 in points):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def plots(rep: Dict[str, Any], out: Path) -> Tuple[List[str], Dict[str, Any]]:
    """Write the PNGs; (their names, the series each one shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, series = [], {}
    timed = _timed(rep)
    if timed:
        groups = sorted({g for _, g, _ in timed})
        colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(timed) + 1.5))
        ys = range(len(timed))
        med = [t["median"] for _, _, t in timed]
        err = [[t["median"] - t["p10"] for _, _, t in timed], [t["p90"] - t["median"] for _, _, t in timed]]
        ax.barh(list(ys), med, xerr=err, color=[colors[g] for _, g, _ in timed], capsize=3)
        ax.set_yticks(list(ys), [label for label, _, _ in timed])
        ax.invert_yaxis()
        ax.set_xlabel("ms per batch-1 run (median, p10-p90)")
        ax.set_title(f"{Path(rep['model']).name}: latency per target and pass set")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        written.append("latency.png")
        series["latency.png"] = [label for label, _, _ in timed]

    labels = bool(rep.get("eval") and rep["eval"]["labels"])
    entries = [(n, b, b.get("timing")) for n, b in rep["baselines"].items() if b.get("path")]
    entries += [(r["key"], r, r.get("timing")) for r in rep["rows"] if r["status"] == "ok"]
    if labels:
        ylab, quality = "top-1 accuracy (%)", lambda e: _quality(e, True)
    else:
        ylab = "-log10(max rel err vs onnxruntime fp32) (higher: closer)"

        def quality(e):
            import math

            v = (e.get("accuracy") or {}).get("max_rel_err", e.get("max_rel_err"))

            return None if v is None else -math.log10(max(v, 1e-9))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    any_point = False
    shown = {}
    for ax, xkey, xlab in ((axes[0], "latency", "ms per run (median)"), (axes[1], "size", "weight bytes")):
        pts, names = [], []
        for name, e, t in entries:
            q = quality(e)
            x = ((t or {}).get("median") if "p10" in (t or {}) else None) if xkey == "latency" \
                else e.get("weight_bytes_after")
            if q is None or x is None:
                continue
            pts.append((float(x), float(q)))
            names.append(name)
        if not pts:
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
            continue
        any_point = True
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", label="builds and baselines")
        for (x, y), n in zip(pts, names):
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto(pts)
        shown[xkey], shown[f"pareto_{xkey}"] = names, [names[i] for i in front]
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r--o", mfc="none", ms=10,
                label="Pareto front")
        ax.set_xlabel(xlab)
        ax.set_ylabel(ylab)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(rep['model']).name}: accuracy vs latency and vs size")
    fig.tight_layout()
    if any_point:
        fig.savefig(out / "tradeoff.png", dpi=100)
        written.append("tradeoff.png")
        series["tradeoff.png"] = shown
    plt.close(fig)

    k = rep.get("kernels_of_slowest") or {}
    if k.get("kernels_ms"):
        top = sorted(k["kernels_ms"].items(), key=lambda kv: -kv[1])[:15]
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(top) + 1.5))
        ax.barh(range(len(top)), [v for _, v in top], color="tab:orange")
        ax.set_yticks(range(len(top)), [n for n, _ in top], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per run")
        ax.set_title(f"per-kernel time of the slowest build: {k['engine']}")
        fig.tight_layout()
        fig.savefig(out / "kernels.png", dpi=100)
        plt.close(fig)
        written.append("kernels.png")
        series["kernels.png"] = [n for n, _ in top]
    return written, series


def summary(rep: Dict[str, Any]) -> str:
    """The terminal's table: one line per baseline and combination."""
    head = f"{'target':14s} {'passes':22s} {'ms (median)':>12s} {'vs ORT fp32':>11s} {'vs ORT int8':>11s} " \
           f"{'weights B':>11s} {'accuracy':>10s}"
    lines = ["", head, "-" * len(head)]

    def acc(a):
        a = a or {}
        return f"{100 * a['top1']:.2f}%" if "top1" in a else "-"

    def row(target, label, t, size, a):
        t = t or {}
        med = f"{t['median']:.3f}" if "median" in t else "-"
        r1 = t.get(f"speedup_vs_{ORT_FP32.replace(' ', '_')}")
        r2 = t.get(f"speedup_vs_{ORT_INT8.replace(' ', '_')}")
        return (f"{target:14s} {label:22s} {med:>12s} {(f'{r1:.2f}x' if r1 else '-'):>11s} "
                f"{(f'{r2:.2f}x' if r2 else '-'):>11s} {size:>11s} {acc(a):>10s}")

    for name, b in rep["baselines"].items():
        if b.get("path"):
            lines.append(row("host", name, b.get("timing"), "-", b.get("accuracy")))
    for r in rep["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['target']:14s} {r['pass_set']:22s} FAILED: {r['error']}")
            continue
        t = r.get("timing")
        line = row(r["target"], r["pass_set"], t, f"{r['weight_bytes_after']:,}", r.get("accuracy"))
        if not t and r.get("timing_note"):
            line += f"  ({r['timing_note']})"
        lines.append(line)
    if rep.get("noisy"):
        lines.append(f"note: noisy timings ({', '.join(rep['noisy'])}): round medians varied by > 25 %")
    failed = sum(r["status"] != "ok" for r in rep["rows"])
    if failed:
        lines.append(f"{failed} combination(s) failed; their errors are in report.md and report.json")
    return "\n".join(lines)
