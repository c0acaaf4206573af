"""One exception family for everything a user can get wrong.

The CLI prints ``str(err)`` on one line and exits non-zero; messages name the file, node, op,
shape, target or option at fault.
"""


class TvmCompressError(Exception):
    """Base class: a problem with the user's input, options or environment."""

    exit_code = 2


class ModelError(TvmCompressError):
    """The model file is missing, not ONNX, truncated, or fails the ONNX checker."""


class UnsupportedOpError(ModelError):
    """The model uses ops the Relax importer (and our converters) cannot handle."""


class ShapeError(TvmCompressError):
    """An input shape is missing, malformed or does not fit the model."""


class TargetError(TvmCompressError):
    """Unknown target, bad target preset, or a missing cross toolchain."""


class PassOptionError(TvmCompressError):
    """Unknown pass or bad pass option."""


class DataError(TvmCompressError):
    """Input, verification or calibration data is missing or does not fit the model."""


class OutputError(TvmCompressError):
    """An output path cannot be written."""


class RemoteError(TvmCompressError):
    """An RPC tracker or server cannot be reached or refused the request."""


class VerificationError(TvmCompressError):
    """The compiled library does not compute what the original model computes."""

    exit_code = 3


def lookup(table, name: str, error: type, what: str, listed: str):
    """``table[name]``, or ``error`` naming the unknown ``what`` and the ``listed`` choices."""
    try:
        return table[name]
    except KeyError:
        raise error(f"unknown {what} {name!r}; {listed}: {', '.join(sorted(table)) or 'none'}") from None
