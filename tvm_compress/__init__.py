"""tvm-compress: compress ONNX models with TVM Relax passes, compile verified libraries.

Python API (the CLI wraps exactly these)::

    mod = tvm_compress.load_onnx("model.onnx", {"input": (1, 3, 224, 224)})
    report = tvm_compress.compile("model.onnx", "model.so", target="x86", tune_trials=256)
    result = tvm_compress.run("model.so", {"input": x})
"""

from ._threads import use_physical_cores

use_physical_cores()  # before any kernel runs: TVM's pool is sized once, at its first use

from . import errors  # noqa: E402
from .artifact import run  # noqa: E402
from .manifest import load_manifest  # noqa: E402
from .build import compile  # noqa: E402
from .layers import weight_stats  # noqa: E402
from .loader import PreparedModel, load_onnx, prepare_onnx  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "PreparedModel",
    "compile",
    "errors",
    "load_manifest",
    "load_onnx",
    "prepare_onnx",
    "run",
    "weight_stats",
]
