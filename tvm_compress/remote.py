"""Boards over TVM RPC: a tracker with servers registered under a device key.

Tuning measures candidates on the boards (MetaSchedule's RPCRunner); verification and latency
run the exported library on a board (upload, load, Relax VM on the remote device). Several
boards under one key share the work: the tracker hands each request to a free one.
"""

from __future__ import annotations

import gc
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from .errors import RemoteError


@dataclass(frozen=True)
class RemoteSpec:
    host: str
    port: int
    key: str
    session_timeout: int = 600

    @property
    def where(self) -> str:
        return f"rpc {self.key}@{self.host}:{self.port}"


def parse_tracker(text: str, key: str | None) -> RemoteSpec:
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RemoteError(f"bad --rpc-tracker {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    if not key:
        raise RemoteError("--rpc-tracker needs --rpc-key KEY (the device key the boards registered)")
    return RemoteSpec(host, int(port), key)


def check_tracker(spec: RemoteSpec, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the tracker is down or no server has the key."""
    try:
        with socket.create_connection((spec.host, spec.port), timeout=timeout):
            pass
    except OSError as err:
        raise RemoteError(
            f"RPC tracker {spec.host}:{spec.port} unreachable ({err.strerror or err})"
        ) from None
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(spec.host, spec.port).summary()
    except Exception as err:  # noqa: BLE001  (not a tracker, protocol error ...)
        raise RemoteError(f"{spec.host}:{spec.port} is not a TVM RPC tracker ({err})") from None
    keys = {str(s.get("key", "")).split(":")[-1] for s in summary.get("server_info", [])}
    if spec.key not in keys:
        raise RemoteError(
            f"no RPC server with key {spec.key!r} at tracker {spec.host}:{spec.port} "
            f"(keys: {', '.join(sorted(k for k in keys if k)) or 'none'})"
        )


def session(spec: RemoteSpec):
    from tvm import rpc

    try:
        tracker = rpc.connect_tracker(spec.host, spec.port)
        return tracker.request(spec.key, priority=1, session_timeout=spec.session_timeout)
    except Exception as err:  # noqa: BLE001
        raise RemoteError(f"{spec.where}: could not get a session ({err})") from None


def run_remote(spec: RemoteSpec, family, lib_path: Path, inputs: Sequence[np.ndarray], repeat: int,
               function: str = "main"):
    """Upload, load and run ``lib_path``'s Relax ``function`` on a board; time ``repeat`` runs."""
    from tvm_compress.targets import RunResult

    sess = session(spec)
    try:
        outputs, times = _run_in_session(sess, family, lib_path, inputs, repeat, function)
    except RemoteError:
        raise
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()
        raise RemoteError(f"{spec.where}: running {Path(lib_path).name} failed: {first[-1] if first else err}") from None
    finally:
        # The board's server takes the next session (a verification right after the kernel
        # check) only once this one is closed, and the VM holds reference cycles: close now.
        del sess
        gc.collect()
    return RunResult(outputs, times, spec.where)


def _run_in_session(sess, family, lib_path: Path, inputs, repeat: int, function: str):
    import tvm
    from tvm import relax

    from tvm_compress.targets.local import flatten_outputs

    sess.upload(str(lib_path))
    lib = sess.load_module(Path(lib_path).name)
    dev = family.remote_device(sess)
    vm = relax.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(np.asarray(x, order="C"), dev) for x in inputs]
    # set_input / invoke_stateful / get_outputs: a tuple result stays on the board as one
    # object with a plain call; this way each of its tensors comes back
    vm.set_input(function, *args)
    vm.invoke_stateful(function)
    outputs = flatten_outputs(vm.get_outputs(function))
    times: List[float] = []
    if repeat:
        res = vm.time_evaluator(function, dev, number=1, repeat=repeat)(*args)
        times = [float(t) * 1e3 for t in res.results]
    return outputs, times


def tuning_runner(spec: RemoteSpec):
    from tvm.s_tir import meta_schedule as ms

    from . import _fast_inspect

    config = ms.runner.RPCConfig(
        tracker_host=spec.host, tracker_port=spec.port, tracker_key=spec.key,
        session_timeout_sec=60,
    )
    return ms.runner.RPCRunner(rpc_config=config, initializer=_fast_inspect.install)
