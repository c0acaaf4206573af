"""One inference engine in its own process, driven by ``bench`` over a pipe.

Each engine (a compiled library on a TVM device, or an onnxruntime session) lives in a process
of its own so that no two thread pools share one: on a 2-core machine a TVM pool left spinning
after its run tripled onnxruntime's time in the same process. Requests are JSON lines on stdin;
answers are JSON lines on a copy of the original stdout, which itself goes to stderr (the bench's
log) so that native prints cannot break the protocol.

Requests: ``{"op": "load", "kind": "tvm"|"ort", "path": ..., "target": NAME, "inputs": NPZ}``,
``{"op": "time", "runs": N, "warmup": W}``, ``{"op": "outputs", "data": NPZ, "out": NPZ}`` (each sample of
the arrays, batch 1; outputs stacked), ``{"op": "profile", "runs": N}`` (per-kernel ms, TVM only),
``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


class _Tvm:
    def __init__(self, path, target):
        import tvm
        from tvm import relax

        from tvm_compress.targets import get_family, get_target

        profile = get_target(target)
        self.tvm = tvm
        self.dev = get_family(profile.family).local_device(profile)
        self.lib = tvm.runtime.load_module(path)
        self.vm = relax.VirtualMachine(self.lib, self.dev)

    def prepare(self, arrays):
        # (ascontiguousarray would make a 0-d input, a sample rate say, 1-d)
        return [self.tvm.runtime.tensor(np.asarray(a, order="C"), self.dev) for a in arrays]

    def call(self, args):
        return self.vm["main"](*args)

    def sync(self):
        self.dev.sync()

    def outputs(self, args):
        from tvm_compress.targets.local import flatten_outputs

        return flatten_outputs(self.call(args))

    def profile(self, args, runs):
        """ms per run of each kernel the VM calls (instrumented runs: the sum is a little above
        the plain run's time)."""
        from tvm import relax

        vm = relax.VirtualMachine(self.lib, self.dev)
        totals, started = {}, {}

        def record(_func, name, before, _ret, *_args):
            self.dev.sync()
            if before:
                started[name] = time.perf_counter()
            elif name in started:
                totals[name] = totals.get(name, 0.0) + (time.perf_counter() - started.pop(name)) * 1e3 / runs
            return 0

        vm["main"](*args)
        vm.set_instrument(record)
        for _ in range(runs):
            vm["main"](*args)
        return {k: round(v, 5) for k, v in totals.items() if not k.startswith("vm.builtin.")}


class _Ort:
    def __init__(self, path, names, bound=None):
        from tvm_compress.verify import ort_session

        self.sess = ort_session(path)
        self.names = names
        self.bound = dict(zip(*_arrays(bound))) if bound else {}  # inputs fixed to values

    def prepare(self, arrays):
        return {**self.bound, **{n: a for n, a in zip(self.names, arrays)}}

    def call(self, feed):
        return self.sess.run(None, feed)

    def sync(self):
        pass

    def outputs(self, feed):
        return [np.asarray(o) for o in self.call(feed)]


def _arrays(path):
    with np.load(path) as data:
        names = [k for k in data.files if k != "labels"]
        return names, [data[k] for k in names]


def serve() -> None:
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine, args = None, None
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                break
            if op == "load":
                names, arrays = _arrays(req["inputs"])
                engine = (_Tvm(req["path"], req["target"]) if req["kind"] == "tvm"
                          else _Ort(req["path"], names, req.get("bound")))
                args = engine.prepare(arrays)
                t0 = time.perf_counter()
                for _ in range(3):  # warm-up: first-call allocations, page faults, caches
                    engine.call(args)
                engine.sync()
                res = {"warm_ms": (time.perf_counter() - t0) * 1e3 / 3}
            elif op == "time":
                for _ in range(int(req.get("warmup", 0))):  # threads asleep since the last turn
                    engine.call(args)
                engine.sync()
                times = []
                for _ in range(int(req["runs"])):
                    engine.sync()
                    t0 = time.perf_counter()
                    engine.call(args)
                    engine.sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                res = {"times_ms": times}
            elif op == "outputs":
                names, arrays = _arrays(req["data"])
                outs = []
                for k in range(len(arrays[0])):
                    sample = engine.prepare([a[k : k + 1] for a in arrays])
                    outs.append(engine.outputs(sample))
                np.savez(req["out"], **{f"output_{i}": np.concatenate([o[i] for o in outs])
                                        for i in range(len(outs[0]))})
                res = {"samples": len(outs)}
            elif op == "profile":
                res = {"kernels_ms": engine.profile(args, int(req.get("runs", 5)))}
            else:
                res = {"error": f"unknown request {op!r}"}
        except Exception as err:  # noqa: BLE001  (reported to the bench, which records it)
            lines = str(err).strip().splitlines()
            res = {"error": f"{type(err).__name__}: {lines[-1] if lines else ''}"}
        answer.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    import tvm_compress  # noqa: F401,E402  (thread count before TVM's pool starts)

    serve()
