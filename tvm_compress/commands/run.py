"""``tvm-compress run``: run a compiled library on an input file, optionally timed."""

from __future__ import annotations

import numpy as np

from . import Command, register_command
from ._common import add_rpc_args, rpc_spec


def add_arguments(r) -> None:
    r.add_argument("library", help="library written by 'compile' (its .json manifest beside it)")
    r.add_argument("--input", required=True, metavar="FILE", help=".npy (one input) or .npz by input name")
    r.add_argument("--output", metavar="OUT.npz", help="save the outputs here")
    r.add_argument("--repeat", type=int, default=0, metavar="N", help="also time N runs")
    add_rpc_args(r)


def run(args) -> int:
    from tvm_compress import artifact
    from tvm_compress.fileutil import atomic_path, check_writable
    from tvm_compress.manifest import load_manifest

    if args.output:
        check_writable(args.output)
    manifest = load_manifest(args.library)
    result = artifact.run(args.library, args.input, repeat=args.repeat, rpc=rpc_spec(args))
    names = [o["name"] for o in manifest["outputs"]]
    if len(names) != len(result.outputs):
        names = [f"output_{k}" for k in range(len(result.outputs))]
    for name, out in zip(names, result.outputs):
        preview = np.array2string(out.reshape(-1)[:8], precision=4, separator=", ")
        line = f"{name}: shape {list(out.shape)} {out.dtype} {preview}"
        if out.ndim == 2 and out.shape[0] == 1 and out.shape[1] > 1:
            line += f" argmax {int(out.argmax())}"
        print(line)
    if result.times_ms:
        from tvm_compress.verify import latency_stats

        s = latency_stats(result.times_ms)
        print(f"latency: median {s['median']:.3f} ms, p90 {s['p90']:.3f} ms over {s['runs']} runs ({result.where})")
    if args.output:
        with atomic_path(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{n: o for n, o in zip(names, result.outputs)})
    return 0


register_command(Command("run", "run a compiled library on an input file", add_arguments, run))
