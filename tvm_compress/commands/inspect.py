"""``tvm-compress inspect``: inputs, outputs, op histogram, params and MACs per layer."""

from __future__ import annotations

import json

from . import Command, register_command
from ._common import add_model_args, shapes, values


def add_arguments(i) -> None:
    add_model_args(i)
    i.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from tvm_compress.errors import ShapeError
    from tvm_compress.loader import layer_table, op_histogram, prepare_onnx, read_onnx

    given, fixed = shapes(args), values(args)
    note = ""
    try:
        prepared = prepare_onnx(args.model, given, input_values=fixed)
    except ShapeError:
        if given:
            raise
        # Inspection without shapes: assume 1 for every dynamic dim, and say so.
        model = read_onnx(args.model)
        inits = {t.name for t in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name in inits or inp.name in fixed:
                continue
            dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
            given[inp.name] = tuple(dims)
        note = "dynamic dims assumed 1 (pass --input-shape for real sizes)"
        prepared = prepare_onnx(args.model, given, input_values=fixed)
    layers = layer_table(prepared)
    info = {
        "model": str(prepared.path),
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in prepared.inputs],
        "outputs": [{"name": o.name, "shape": list(o.shape) if o.shape else None, "dtype": o.dtype}
                    for o in prepared.outputs],
        "ops": op_histogram(prepared.original),
        "params": sum(r["params"] for r in layers),
        "macs": sum(r["macs"] for r in layers),
        "layers": layers,
    }
    if note:
        info["note"] = note
    # what preparing the model did to it (an opset upgrade, recurrent nodes unrolled)
    info["notes"] = [n for n in [note, *prepared.notes] if n]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {info['model']}")
    for line in info["notes"]:
        print(f"note: {line}")
    for s in info["inputs"]:
        print(f"input  {s['name']}: {s['shape']} {s['dtype']}")
    for o in info["outputs"]:
        print(f"output {o['name']}: {o['shape']} {o['dtype']}")
    print("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    print(f"{'layer':40s} {'op':14s} {'params':>10s} {'MACs':>14s}")
    for r in layers:
        print(f"{r['name'][:40]:40s} {r['op']:14s} {r['params']:>10d} {r['macs']:>14d}")
    print(f"{'total':40s} {'':14s} {info['params']:>10d} {info['macs']:>14d}")
    return 0


register_command(Command("inspect", "inputs, outputs, op histogram, params and MACs per layer",
                         add_arguments, run))
