"""tvm-compress graph passes (installed as ``tvm_compress.passes``).

Every pass is a plain ``tvm.transform.module_pass`` over a Relax IRModule and composes in a
``tvm.transform.Sequential``. Importing this package registers the presets (the CLI's
``--passes``) with ``tvm_compress.pass_registry``.
"""

from .binary import Binary, BinaryConfig
from .calibrate import Calibrate, CalibrateConfig
from .conv1d_to_conv2d import Conv1dToConv2d
from .conv_transpose_to_conv import ConvTransposeToConv
from .drop_padding_taps import DropPaddingTaps
from .fold import Fold, FoldConfig
from .hard_swish import HardSwishAsHardSigmoid
from .lowrank import LowRank, LowRankConfig
from .prune import Prune, PruneConfig
from .quantize import Quantize, QuantizeConfig
from .quantize_annotate import QuantizeAnnotate, QuantizeAnnotateConfig
from .quantize_realize import QuantizeRealize, QuantizeRealizeConfig
from .share_constants import ShareConstants
from .stack_reduce_to_binary import StackReduceToBinary
from .te_calls_to_ops import TeCallsToOps

__all__ = [
    "Binary",
    "BinaryConfig",
    "Calibrate",
    "CalibrateConfig",
    "Conv1dToConv2d",
    "ConvTransposeToConv",
    "DropPaddingTaps",
    "Fold",
    "FoldConfig",
    "HardSwishAsHardSigmoid",
    "LowRank",
    "LowRankConfig",
    "Prune",
    "PruneConfig",
    "Quantize",
    "QuantizeAnnotate",
    "QuantizeAnnotateConfig",
    "QuantizeConfig",
    "QuantizeRealize",
    "QuantizeRealizeConfig",
    "ShareConstants",
    "StackReduceToBinary",
    "TeCallsToOps",
]
