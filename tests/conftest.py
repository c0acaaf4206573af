"""Shared fixtures: small ONNX models made here (torch exporter or onnx.helper), seeded."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tuning databases of the tests go to a fresh directory, not the user's cache.

    Deploy runners (and the armv7 runtime, minutes to build) stay in the user's cache."""
    from tvm_compress.cache import runner_cache_dir

    old = os.environ.get("TVM_COMPRESS_CACHE")
    os.environ.setdefault("TVM_COMPRESS_RUNNER_CACHE", str(runner_cache_dir()))
    os.environ["TVM_COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("tvmc-cache"))
    yield
    if old is None:
        os.environ.pop("TVM_COMPRESS_CACHE", None)
    else:
        os.environ["TVM_COMPRESS_CACHE"] = old


def _export(module, example, path: Path, dynamic_batch: bool = False, names=("x",)) -> Path:
    import torch

    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {names[0]: {0: "batch"}, "y": {0: "batch"}}
    torch.onnx.export(
        module.eval(), example, str(path), dynamo=False, opset_version=17,
        input_names=list(names), output_names=["y"], **kwargs,
    )
    return path


def conv_net_class():
    """conv+BN+relu, depthwise conv, residual add, pool, flatten via x.view(x.size(0), -1),
    linear (8x8 inputs; subclasses change ``forward``)."""
    import torch

    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = torch.nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            y = torch.relu(self.bn(self.c1(x)))
            y = y + torch.relu(self.dw(y))
            y = torch.nn.functional.max_pool2d(y, 2)
            return self.fc(y.view(y.size(0), -1))  # Shape->Gather->Concat->Reshape when exported

    return ConvNet


def make_conv_model(path: Path, dynamic_batch: bool = False) -> Path:
    import torch

    torch.manual_seed(0)
    net = conv_net_class()()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return _export(net, torch.randn(1, 3, 8, 8), path, dynamic_batch)


def make_dense_model(path: Path) -> Path:
    import torch

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    return _export(net, torch.randn(2, 32), path)


@pytest.fixture(scope="session")
def conv_model(tmp_path_factory) -> Path:
    return make_conv_model(tmp_path_factory.mktemp("models") / "conv.onnx")


@pytest.fixture(scope="session")
def conv_model_dynamic(tmp_path_factory) -> Path:
    return make_conv_model(tmp_path_factory.mktemp("models") / "conv_dyn.onnx", dynamic_batch=True)


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory) -> Path:
    return make_dense_model(tmp_path_factory.mktemp("models") / "dense.onnx")


@pytest.fixture(scope="session")
def unsupported_model(tmp_path_factory) -> Path:
    """A valid ONNX graph with two op types the Relax importer lacks (QLinearConv, and an LSTM
    with ``clip``, which ``onnx_rnn`` does not unroll)."""
    path = tmp_path_factory.mktemp("models") / "unsupported.onnx"
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 3])
    z = helper.make_tensor_value_info("z", TensorProto.UINT8, [5, 2, 1, 4])
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, 12, 4)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 12, 3)).astype(np.float32), "R"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        numpy_helper.from_array(rng.integers(0, 255, (2, 1, 1, 1)).astype(np.uint8), "wq"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="encoder_lstm", hidden_size=3, clip=2.0),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("Unsqueeze", ["xq", "axes"], ["xq4"], name="unsq"),
        helper.make_node(
            "QLinearConv", ["xq4", "s", "zp", "wq", "s", "zp", "s", "zp"], ["z"], name="qconv_1"
        ),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "g", [x], [y, z], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from tvm_compress.demo import demo_files

    return demo_files()["model"]


def bound(mod, params: dict, func: str = "main"):
    """``mod`` with ``params`` (name -> numpy array) bound as constants of ``func``."""
    import tvm
    from tvm import relax

    return relax.transform.BindParams(func, {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def assert_same_legalized(before, after, x_shape, seed: int) -> None:
    """Both Relax modules legalized (TVM's own kernels) give the same outputs on one random
    input of ``x_shape``."""
    import tvm
    from tvm import relax

    x = np.random.default_rng(seed).standard_normal(x_shape).astype("float32")
    outs = []
    for mod in (before, after):
        ex = tvm.compile(relax.transform.LegalizeOps()(mod), target="llvm")
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tvm_rpc_process(module: str, args, ready, what: str, timeout: float = 60):
    """Run ``python -m tvm.exec.<module> args`` until the block ends; wait until ``ready()``
    returns True (it may raise OSError or RemoteError while not yet ready)."""
    from tvm_compress.errors import RemoteError

    # Its own process group: the tracker / server runs in a child worker that would outlive
    # the parent (one pair left behind per test session).
    proc = subprocess.Popen([sys.executable, "-m", f"tvm.exec.{module}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    break
            except (OSError, RemoteError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not start")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def rpc_tracker_port():
    """A TVM RPC tracker on 127.0.0.1 (loopback only) for the RPC tests; yields its port."""
    port = free_port()

    def listening():
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True

    with tvm_rpc_process("rpc_tracker", ["--host", "127.0.0.1", "--port", str(port),
                                         "--port-end", str(port + 1)], listening, "RPC tracker"):
        yield port
