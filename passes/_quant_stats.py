"""Activation range estimation: minmax, percentile and entropy (KL divergence) over a histogram.

An ``Observer`` sees every calibration batch of one activation twice: once for its range, once
for its histogram (only the histogram methods need the second pass). ``qparams`` turns the range
into (scale, zero_point, dtype) for the activation quantization mode.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from tvm_compress.specs import pair_weight_sums

METHODS = ("minmax", "percentile", "entropy")
ACT_DTYPES = ("auto", "int8", "uint8")
ENTROPY_BINS = 2048


class Observer:
    def __init__(self, num_bins: int = 16384):
        self.num_bins = num_bins
        self.min = np.inf
        self.max = -np.inf
        self.hist: Optional[np.ndarray] = None  # of |x| over [0, amax] (num_bins bins)
        self.signed_hist: Optional[np.ndarray] = None  # of x over [-amax, amax] (2*num_bins)
        self.count = 0

    # pass 1
    def update_range(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        self.min = min(self.min, float(np.min(x)))
        self.max = max(self.max, float(np.max(x)))
        self.count += x.size

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max), 1e-12)

    # pass 2
    def update_hist(self, x: np.ndarray) -> None:
        amax = self.amax
        h, _ = np.histogram(x, bins=2 * self.num_bins, range=(-amax, amax))
        self.signed_hist = h if self.signed_hist is None else self.signed_hist + h
        # |x| histogram folds the symmetric signed one exactly.
        folded = h[self.num_bins :] + h[: self.num_bins][::-1]
        self.hist = folded if self.hist is None else self.hist + folded

    def clip_range(self, method: str, percentile: float, levels: int) -> Tuple[float, float]:
        """(lo, hi) to quantize into; ``levels`` = quantization bins on the |x| axis."""
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if method == "minmax" or self.hist is None or self.hist.sum() == 0:
            return lo, hi
        bin_w = self.amax / self.num_bins
        if method == "percentile":
            if lo >= 0:
                return 0.0, min(hi, _percentile_edge(self.hist, percentile, bin_w))
            # signed: cut the same share from each tail of the signed histogram
            tail = (100.0 - percentile) / 2.0
            sbin = 2 * self.amax / (2 * self.num_bins)
            cdf = np.cumsum(self.signed_hist) / self.signed_hist.sum()
            lo_p = -self.amax + sbin * float(np.searchsorted(cdf, tail / 100.0))
            hi_p = -self.amax + sbin * float(np.searchsorted(cdf, 1.0 - tail / 100.0) + 1)
            return max(lo, min(lo_p, 0.0)), min(hi, max(hi_p, 0.0))
        if method == "entropy":
            # KL over a 2048-bin histogram (as TensorRT): finer bins leave the few calibration
            # samples too sparse and the search then clips too much.
            group = max(1, self.num_bins // ENTROPY_BINS)
            fine = self.hist.copy()
            # The exact zeros of a ReLU output are a spike that quantizes exactly; left in, it
            # dominates P and the search clips far too much of the tail.
            fine[0] = 0
            coarse = fine[: (self.num_bins // group) * group].reshape(-1, group).sum(axis=1)
            t = kl_threshold(coarse, levels) * bin_w * group
            return max(lo, -t), min(hi, t)
        raise ValueError(method)


def _percentile_edge(hist: np.ndarray, percentile: float, bin_w: float) -> float:
    cdf = np.cumsum(hist) / hist.sum()
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return (idx + 1) * bin_w


def kl_threshold(hist: np.ndarray, levels: int) -> float:
    """Number of |x| histogram bins to keep that minimizes KL(P || Q) (TensorRT's calibration).

    P is the histogram clipped at i bins (outliers added to the last bin), Q the same bins
    quantized into ``levels`` levels and expanded back over the non-empty bins. Candidates are
    searched coarse to fine, so fine histograms (many bins) stay cheap.
    """
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels:
        return float(n)
    cache = {}

    def kl_at(i: int) -> float:
        if i in cache:
            return cache[i]
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        src = hist[:i]
        nz = src > 0
        idx = (np.arange(i) * levels) // i
        sums = np.bincount(idx, weights=src, minlength=levels)
        counts = np.bincount(idx, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, sums[idx] / np.maximum(counts[idx], 1.0), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0 or p_sum == 0:
            cache[i] = np.inf
            return np.inf
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        # Q is 0 where only outliers landed (the last bin): smooth instead of infinite KL.
        cache[i] = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        return cache[i]

    lo, hi = levels, n
    step = max(1, (hi - lo) // 128)
    while True:
        cands = list(range(lo, hi + 1, step)) + [hi]
        best = min(cands, key=kl_at)
        if step == 1:
            return float(best)
        lo, hi = max(levels, best - step), min(n, best + step)
        step = max(1, step // 8)


def qparams(lo: float, hi: float, mode: str) -> Tuple[float, int, str]:
    """(scale, zero_point, dtype) for an activation with range [lo, hi] (lo <= 0 <= hi).

    int8: symmetric signed, zero point 0.  uint8: asymmetric, zero point from the range.
    auto: uint8 with zero point 0 where the tensor is non-negative (post-ReLU: all 8 bits for
    the values that occur), symmetric int8 elsewhere; zero points stay 0 either way, so the
    integer kernels need no zero-point terms and zero padding stays exact.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if mode == "uint8":
        scale = max((hi - lo) / 255.0, 1e-8)
        zp = int(np.clip(round(-lo / scale), 0, 255))
        return scale, zp, "uint8"
    if mode == "auto" and lo >= 0.0:
        return max(hi / 255.0, 1e-8), 0, "uint8"
    amax = max(-lo, hi)
    return max(amax / 127.0, 1e-8), 0, "int8"


def weight_qparams(w: np.ndarray, axis: int, pair_sums: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: (int8 weights, float32 scales).

    ``pair_sums`` (a conv weight, not depthwise, output channels on ``axis`` 0, or a dense one
    ``[K, N]``, outputs on ``axis`` 1, for kernels that add
    the products of input channels 2k and 2k+1 in saturating int16, or of kernel columns 2k and
    2k+1 of a single-channel conv, ``TargetFacts.int8_pair_sums``):
    each channel's scale is also large enough that every pair's same-signed weights add up to
    at most 127 before rounding, 128 after (255 * 128 still fits int16). Channels with no two
    large same-signed neighbours keep their scale; the worst lose one bit."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red)
    if pair_sums and axis == 0 and w.ndim >= 3 and w.shape[1] > 1:
        amax = np.maximum(amax, pair_weight_sums(w))
    elif pair_sums and axis == 1 and w.ndim == 2 and w.shape[0] > 1:
        # a dense weight [K, N]: the kernels pair its rows 2k, 2k+1 (``int8_conv.packed_matmul``)
        amax = np.maximum(amax, pair_weight_sums(w.T))
    elif pair_sums and axis == 0 and w.ndim == 4 and w.shape[3] > 1:
        # one input channel: the kernels pair its columns 2k, 2k+1 (``int8_conv.column_taps``)
        amax = np.maximum(amax, pair_weight_sums(w.transpose(0, 3, 2, 1)))
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype("float32")
    bshape = [1] * w.ndim
    bshape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(bshape)), -127, 127).astype("int8")
    return q, scale
