"""Vectorized float32 ``exp``, ``sigmoid``, ``tanh`` and ``erf`` for CPU code (lowering rules for
LLVM targets).

TVM lowers these intrinsics on LLVM targets to LLVM's math intrinsics, which LLVM turns into one
call of the C library (``expf``, ``tanhf``, ``erff``) per element even inside vectorized loops
(no vector math library is linked): about 1.4, 5 and 2 ns per element on an AVX2 core. Every
sigmoid (legalized to ``1 / (1 + exp(-x))``: SiLU/swish activations, squeeze-excite gates,
detector heads), softmax, GELU (``erf``), Mish and tanh-GELU pays it. Here the float32 forms
(scalar or vector) become arithmetic that vectorizes:

- ``exp``: ``n = round(x * log2(e))`` (rounded by adding and subtracting 1.5 * 2^23),
  ``r = x - n * ln(2)`` (ln 2 in two parts, Cody-Waite),
  ``exp(x) = p(r) * 2^n`` with Cephes' degree-7 polynomial ``p`` on [-ln2/2, ln2/2] and ``2^n``
  built in the exponent bits as two factors, so that results that overflow are ``inf``, those
  that underflow reach the denormals and 0;
- ``tanh`` and ``erf``: ``x * P(x^2) / Q(x^2)`` on a clamped range (the rational
  approximations Eigen uses), +-1 beyond it.

``sigmoid`` is ``1 / (1 + exp(-x))`` with that ``exp`` on the range where ``2^n`` is one
normal float (the sigmoid is 1 or under the smallest normal beyond it) and a single NaN test
(TVM's rule spelled it with ``exp``, so its NaN test ran inside too: a SiLU epilogue 4 %
faster; the single factor and the rounding below another 1.2x).

NaN stays NaN. Against float64: relative error under 2e-7 (``exp``, sigmoid), 3e-7 (``tanh``)
and absolute 4e-7 (``erf``) (``tests/test_fast_math.py``); 4-8x faster than the C library calls.

Registered when ``tvm_compress.targets`` is imported, for every LLVM target (the x86 and ARM
families), above TVM's own rules: they apply to every kernel built in this process, the tuned
and default schedules and the kernel check's reference alike. Other float types keep TVM's
lowering.
"""

from __future__ import annotations

import tvm
from tvm import tirx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # exact in float32: r = x - n*ln2 loses no bits for |n| <= 2^8
_LN2_LO = -2.12194440e-4
# Cephes expf: p(r) = 1 + r + r^2 * (c5 + c4 r + c3 r^2 + c2 r^3 + c1 r^4 + c0 r^5)
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
         1.6666665459e-1, 5.0000001201e-1)
# Below -104 exp underflows to 0 in float32, above 89 it overflows; clamping keeps n in range.
_LOW, _HIGH = -104.0, 89.0
_SIGMOID_LOW, _SIGMOID_HIGH = -87.3, 88.7
_ROUND, _ROUND_BITS = 12582912.0, 0x4B400000  # 1.5 * 2^23 and its float32 bits


def _f32(value: float) -> tvm.tirx.PrimExpr:
    return tirx.const(value, "float32")


def _pow2(n, float_type: str):
    """2^n for int32 lanes n in [-126, 127], built in the exponent bits."""
    return tirx.reinterpret(float_type, tirx.shift_left(n + tirx.const(127, "int32"), tirx.const(23, "int32")))


def _reduced(x, low: float, high: float, dtype: str):
    """``(n, p(r))`` with ``x = n * ln2 + r`` (``x`` clamped to [low, high], ``n`` the nearest
    integer to ``x * log2(e)`` as int32 lanes, ``|r| <= ln2 / 2``) and ``exp(r) = p(r)``."""
    lanes = tvm.DataType(dtype).lanes
    int_type = "int32" if lanes == 1 else f"int32x{lanes}"
    xc = tirx.max(tirx.min(x, _f32(high)), _f32(low))
    # Nearest integer in float arithmetic: v + 1.5 * 2^23 keeps round(v) in its low mantissa
    # bits (|v| < 2^22), read back as an int; a vector round instruction is no portable
    # alternative (ARMv7 NEON has none: one C library call per element).
    t = xc * _f32(_LOG2E) + _f32(_ROUND)
    fn = t - _f32(_ROUND)
    n = tirx.reinterpret(int_type, t) - tirx.const(_ROUND_BITS, "int32")
    r = xc - fn * _f32(_LN2_HI) - fn * _f32(_LN2_LO)
    p = _f32(_POLY[0])
    for c in _POLY[1:]:
        p = p * r + _f32(c)
    return n, p * r * r + r + _f32(1.0)


def fast_exp(x, dtype: str):
    """``exp(x)`` for a float32 (or float32xN) expression, in vectorizable arithmetic."""
    n, y = _reduced(x, _LOW, _HIGH, dtype)
    # 2^n as 2^(n>>1) * 2^(n - (n>>1)): each factor a normal float for n in [-151, 129]
    half = tirx.shift_right(n, tirx.const(1, "int32"))
    return y * _pow2(half, dtype) * _pow2(n - half, dtype)


# Rational approximations x * P(x^2) / Q(x^2), coefficients from lowest degree (Eigen's).
_TANH = (7.90531110763549805,
         (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
          -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16),
         (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06))
_ERF = (4.0,
        (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
         -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10),
        (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
         -1.45660718464996e-05))


def _odd_rational(x, spec):
    """x * P(x^2) / Q(x^2) on [-limit, limit]; +-1 beyond (tanh and erf are 1 there in float32)."""
    limit, alpha, beta = spec
    xc = tirx.max(tirx.min(x, _f32(limit)), _f32(-limit))
    x2 = xc * xc
    p = _f32(alpha[-1])
    for a in reversed(alpha[:-1]):
        p = p * x2 + _f32(a)
    q = _f32(beta[-1])
    for b in reversed(beta[:-1]):
        q = q * x2 + _f32(b)
    # beyond the range xc is +-limit exactly, so xc / limit is the sign
    return tirx.Select(tirx.abs(x) > _f32(limit), xc / _f32(limit), xc * p / q)


def fast_sigmoid(x, dtype: str):
    """``1 / (1 + exp(-x))`` with ``exp`` on [-87.3, 88.7], where ``2^n`` is one normal float
    (n in [-126, 128]; 2^128 is inf): below, the sigmoid's result is 1 either way, above, a
    denormal or 0 (the division flushes them). Three operations fewer than ``fast_exp``: SiLU
    kernels 1.2x (AVX2) and 1.26x (AVX-512) faster."""
    n, y = _reduced(-x, _SIGMOID_LOW, _SIGMOID_HIGH, dtype)
    return _f32(1.0) / (_f32(1.0) + y * _pow2(n, dtype))


_ATTR = "llvm.FLowerIntrinsic"
_FORMS = {"tirx.exp": fast_exp,
          "tirx.sigmoid": fast_sigmoid,
          "tirx.tanh": lambda x, dtype: _odd_rational(x, _TANH),
          "tirx.erf": lambda x, dtype: _odd_rational(x, _ERF)}
_TVM_RULES: dict = {}  # op name -> TVM's own rule, for the other float types
_ENABLED = [True]


def set_enabled(on: bool) -> None:
    """Turn the rules off (TVM's C library calls) or back on, for comparisons
    (``scripts/bench_fast_math.py``)."""
    _ENABLED[0] = bool(on)


def _rule(name: str):
    form = _FORMS[name]

    def lower(call):
        dtype = str(call.ty)
        if not _ENABLED[0] or tvm.DataType(dtype).type_code != tvm.DataTypeCode.FLOAT \
                or tvm.DataType(dtype).bits != 32:
            rule = _TVM_RULES.get(name)
            return rule(call) if rule is not None else call
        x = call.args[0]
        return tirx.Select(tirx.isnan(x), x, form(x, dtype))  # NaN in, NaN out

    return lower


def register() -> None:
    """Install the rules for LLVM targets, above TVM's own (level 10), once per process."""
    if _TVM_RULES:
        return
    for name in _FORMS:
        _TVM_RULES[name] = tvm.ir.Op.get(name).get_attr(_ATTR)
        tirx.op.register_intrin_lowering(name, "llvm", f=_rule(name), level=99)
