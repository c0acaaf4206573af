"""Run an exported library in this process with the Relax VM (x86 host, or a GPU here)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import tvm
from tvm import relax


def flatten_outputs(result) -> List[np.ndarray]:
    if isinstance(result, (tvm.runtime.Tensor,)) or hasattr(result, "numpy"):
        return [result.numpy()]
    outs: List[np.ndarray] = []
    for item in result:
        outs.extend(flatten_outputs(item))
    return outs


def run_in_process(
    lib_path: Path, device: tvm.runtime.Device, inputs: Sequence[np.ndarray], repeat: int, warmup: int,
    function: str = "main",
):
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), device)
    args = [tvm.runtime.tensor(np.asarray(x, order="C"), device) for x in inputs]
    outputs = flatten_outputs(vm[function](*args))
    for _ in range(warmup):
        vm[function](*args)
    times = []
    for _ in range(repeat):
        device.sync()
        t0 = time.perf_counter()
        res = vm[function](*args)
        device.sync()
        times.append((time.perf_counter() - t0) * 1e3)
        del res
    return outputs, times
