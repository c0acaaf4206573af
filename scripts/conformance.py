#!/usr/bin/env python3
"""Conformance corpus: the onnx package's own backend test models, compiled and checked.

    python scripts/conformance.py [--dirs simple,light,pytorch-converted,pytorch-operator] [--json out.json]

Every model under ``onnx/backend/test/data/<dir>/`` comes with inputs and expected outputs
(``test_data_set_0``). Each goes through ``tvm_compress.compile`` (default schedules, host
target, verified against onnxruntime) and the library's outputs are compared with the expected
outputs shipped with the model (``rtol 1e-3``, ``atol 1e-5``, NaN where expected NaN). Outcomes:

- ``match``: compiled, and equal to the expected outputs;
- ``refused``: a one-line error (``TvmCompressError``) naming what is unsupported;
- ``WRONG``: compiled but not equal to the expected outputs (a bug);
- ``CRASH``: any other exception (a bug).

All in one process (a CLI call's start-up would dominate). Prints a table of counts and the
refusals; ``tests/test_conformance.py`` runs the same corpus and fails on WRONG or CRASH.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIRS = ("simple", "light", "pytorch-converted", "pytorch-operator")


def corpus_root() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def cases(dirs=DIRS) -> List[Path]:
    return sorted(p for d in dirs for p in (corpus_root() / d).iterdir() if (p / "model.onnx").exists())


def _tensors(folder: Path, prefix: str) -> List[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    out = []
    for f in sorted(folder.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1])):
        t = onnx.TensorProto()
        try:
            t.ParseFromString(f.read_bytes())
            out.append(numpy_helper.to_array(t))
        except Exception:  # noqa: BLE001  (a sequence or optional, not a tensor)
            return None
    return out


def check_case(case: Path, work: Path) -> Dict[str, object]:
    """Compile one corpus model and compare with its expected outputs."""
    import onnx

    import tvm_compress
    from tvm_compress.errors import TvmCompressError

    rec: Dict[str, object] = {"name": f"{case.parent.name}/{case.name}"}
    data = case / "test_data_set_0"
    inputs, expected = _tensors(data, "input"), _tensors(data, "output")
    if inputs is None or expected is None:
        rec.update(outcome="refused", reason="inputs or outputs are sequences/optionals, not tensors")
        return rec
    t0 = time.monotonic()
    try:
        model = onnx.load(str(case / "model.onnx"), load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in init]
        if len(names) != len(inputs):
            rec.update(outcome="refused", reason=f"{len(inputs)} shipped inputs for {len(names)} graph inputs")
            return rec
        npz = work / "in.npz"
        np.savez(npz, **dict(zip(names, inputs)))
        lib = work / f"{case.parent.name}-{case.name}.so"  # a new name: dlopen reuses a loaded path
        tvm_compress.compile(case / "model.onnx", lib, target="x86", input_shapes={n: x.shape for n, x in zip(names, inputs)},
                             verify_input=npz, tune_trials=0, bench_runs=0, log=lambda m: None)
        got = tvm_compress.run(lib, dict(zip(names, inputs))).outputs
        rec["seconds"] = round(time.monotonic() - t0, 2)
        bad = _compare(got, expected)
        rec.update(outcome="WRONG", reason=bad) if bad else rec.update(outcome="match")
    except TvmCompressError as err:
        rec.update(outcome="refused", reason=str(err).replace(str(case), "<model>"))
    except Exception as err:  # noqa: BLE001  (that is the finding)
        lines = str(err).strip().splitlines()
        rec.update(outcome="CRASH", reason=f"{type(err).__name__}: {lines[-1] if lines else ''}")
    rec.setdefault("seconds", round(time.monotonic() - t0, 2))
    return rec


def _compare(got, expected) -> str:
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for k, (g, e) in enumerate(zip(got, expected)):
        g, e = np.asarray(g), np.asarray(e)
        if g.shape != e.shape:
            return f"output {k}: shape {list(g.shape)}, expected {list(e.shape)}"
        if e.dtype.kind in "fc":
            ok = np.isclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-3, atol=1e-5, equal_nan=True)
        else:
            ok = g == e
        if not np.all(ok):
            return f"output {k}: {int((~ok).sum())} of {ok.size} elements differ"
    return ""


def run_corpus(dirs=DIRS, log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    results = []
    todo = cases(dirs)
    with tempfile.TemporaryDirectory(prefix="tvmc-corpus-") as tmp:
        for k, case in enumerate(todo):
            rec = check_case(case, Path(tmp))
            results.append(rec)
            log(f"[{k + 1}/{len(todo)}] {rec['name']}: {rec['outcome']}"
                + (f" ({rec['reason']})" if rec.get("reason") else ""))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dirs", default=",".join(DIRS))
    ap.add_argument("--json", help="write the per-model outcomes here")
    args = ap.parse_args(argv)
    from tvm_compress.console import native_output

    with tempfile.TemporaryDirectory() as logs, native_output(Path(logs) / "native.log"):
        results = run_corpus([d for d in args.dirs.split(",") if d],
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    counts: Dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"\n{len(results)} models: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("\n| model | outcome | reason |\n|---|---|---|")
    for r in results:
        if r["outcome"] != "match":
            print(f"| {r['name']} | {r['outcome']} | {str(r.get('reason', '')).replace('|', '/')} |")
    return 1 if counts.get("WRONG") or counts.get("CRASH") else 0


if __name__ == "__main__":
    sys.exit(main())
