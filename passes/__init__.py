"""tvm-compress graph passes (installed as ``tvm_compress.passes``).

Every pass is a plain ``tvm.transform.module_pass`` over a Relax IRModule and composes in a
``tvm.transform.Sequential``; ``registry`` maps preset names (the CLI's ``--passes``) to them.
"""

from .registry import (
    InputSpec,
    PassEnv,
    PassPreset,
    get_pass,
    make_config,
    parse_pass_list,
    pass_names,
    register_pass,
)
from .quantize_annotate import QuantizeAnnotate, QuantizeAnnotateConfig
from .calibrate import Calibrate, CalibrateConfig
from .quantize_realize import QuantizeRealize, QuantizeRealizeConfig
from ._quant_preset import QuantizeConfig  # registers the "quantize" preset
from .conv_transpose_to_conv import ConvTransposeToConv

__all__ = [
    "Calibrate",
    "CalibrateConfig",
    "ConvTransposeToConv",
    "QuantizeAnnotate",
    "QuantizeAnnotateConfig",
    "QuantizeConfig",
    "QuantizeRealize",
    "QuantizeRealizeConfig",
    "InputSpec",
    "PassEnv",
    "PassPreset",
    "get_pass",
    "make_config",
    "parse_pass_list",
    "pass_names",
    "register_pass",
]
