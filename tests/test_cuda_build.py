"""CUDA libraries carry compiled device code (nvcc at build time, no CUDA source to compile at
load), also on a build host without the NVIDIA driver; ``features.cuda_graph`` replays the
kernels as CUDA graphs. Builds only: running them needs a GPU (``tests/test_gpu_bench.py``)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_compress
from tvm_compress.targets import get_target

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: CUDA code cannot be built here")
quiet = lambda m: None  # noqa: E731
FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2")]
    # three kernels: with two, TVM 0.27 captured nothing
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], inits)
    path = tmp_path_factory.mktemp("models") / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _build(model, path, features=None):
    profile = get_target("cuda-sm80")
    if features:
        profile = dataclasses.replace(profile, features={**profile.features, **features})
    tvm_compress.compile(model, path, target=profile, log=quiet)
    return path.read_bytes()


@needs_nvcc
def test_library_holds_machine_code_not_cuda_source(conv_model, tmp_path):
    lib = _build(conv_model, tmp_path / "c.so")
    assert FATBIN_MAGIC in lib  # nvcc's fat binary (sm_80 code + PTX)
    assert b"__global__" not in lib and b"extern \"C\"" not in lib


@needs_nvcc
def test_cuda_graph_feature_captures_the_kernels(conv_model, tmp_path):
    plain = _build(conv_model, tmp_path / "plain.so")
    graph = _build(conv_model, tmp_path / "graph.so", {"cuda_graph": True})
    assert b"vm.builtin.cuda_graph.run_or_capture" in graph and b"main_cuda_graph_capture" in graph
    assert b"vm.builtin.cuda_graph" not in plain


def test_bad_cuda_graph_in_target_file_is_one_line_error(tmp_path):
    from tvm_compress.errors import TargetError
    from tvm_compress.targets import load_target_files

    f = tmp_path / "t.toml"
    f.write_text('[my-gpu]\nfamily = "cuda"\ntarget = { kind = "cuda", arch = "sm_90" }\n'
                 'features = { cuda_graph = "yes" }\n')
    with pytest.raises(TargetError, match="features.cuda_graph 'yes' is not true or false") as err:
        load_target_files([f])
    assert "\n" not in str(err.value)
