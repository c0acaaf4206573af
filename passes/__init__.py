"""tvm-compress graph passes (installed as ``tvm_compress.passes``).

Every pass is a plain ``tvm.transform.module_pass`` over a Relax IRModule and composes in a
``tvm.transform.Sequential``. Importing this package registers the presets (the CLI's
``--passes``) with ``tvm_compress.pass_registry``.
"""

from .calibrate import Calibrate, CalibrateConfig
from .conv_transpose_to_conv import ConvTransposeToConv
from .quantize import Quantize, QuantizeConfig
from .quantize_annotate import QuantizeAnnotate, QuantizeAnnotateConfig
from .quantize_realize import QuantizeRealize, QuantizeRealizeConfig

__all__ = [
    "Calibrate",
    "CalibrateConfig",
    "ConvTransposeToConv",
    "Quantize",
    "QuantizeAnnotate",
    "QuantizeAnnotateConfig",
    "QuantizeConfig",
    "QuantizeRealize",
    "QuantizeRealizeConfig",
]
