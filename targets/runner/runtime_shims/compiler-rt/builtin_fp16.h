// Stand-in for TVM's 3rdparty/compiler-rt/builtin_fp16.h (not shipped in the wheel), written for
// tvm-compress: IEEE-754 binary conversions between formats given by their bit layouts, as used
// by the runtime's sort and fp16 helpers. Round to nearest even; NaN stays NaN (quiet), infinities
// and signed zeros are kept, overflow gives infinity, subnormals are handled both ways.
#ifndef TVM_COMPRESS_SHIM_BUILTIN_FP16_H_
#define TVM_COMPRESS_SHIM_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

namespace tvm_compress_fp {
template <typename RepT, int SigBits>
struct Layout {
  static constexpr int kBits = static_cast<int>(sizeof(RepT) * 8);
  static constexpr int kExpBits = kBits - SigBits - 1;
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr int kMaxExp = (1 << kExpBits) - 1;
};

template <typename T, typename RepT>
inline RepT ToBits(T v) {
  static_assert(sizeof(T) == sizeof(RepT), "size mismatch");
  RepT r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
template <typename T, typename RepT>
inline T FromBits(RepT r) {
  T v;
  std::memcpy(&v, &r, sizeof(v));
  return v;
}

// Convert (sign, exponent field, significand field) of format S to format D.
template <typename SRC_REP_T, int SRC_SIG_BITS, typename DST_REP_T, int DST_SIG_BITS>
inline DST_REP_T Convert(SRC_REP_T a) {
  using S = Layout<SRC_REP_T, SRC_SIG_BITS>;
  using D = Layout<DST_REP_T, DST_SIG_BITS>;
  const uint64_t sa = static_cast<uint64_t>(a);
  const uint64_t sign = (sa >> (S::kBits - 1)) & 1u;
  const int exp = static_cast<int>((sa >> SRC_SIG_BITS) & static_cast<uint64_t>(S::kMaxExp));
  uint64_t sig = sa & ((uint64_t{1} << SRC_SIG_BITS) - 1);
  const DST_REP_T dsign = static_cast<DST_REP_T>(static_cast<DST_REP_T>(sign) << (D::kBits - 1));

  if (exp == S::kMaxExp) {  // inf or nan
    DST_REP_T out = dsign | static_cast<DST_REP_T>(static_cast<DST_REP_T>(D::kMaxExp) << DST_SIG_BITS);
    if (sig != 0) out |= static_cast<DST_REP_T>(DST_REP_T{1} << (DST_SIG_BITS - 1));  // quiet nan
    return out;
  }
  if (exp == 0 && sig == 0) return dsign;

  // Normalise to value = 1.f * 2^e, with f held in SRC_SIG_BITS bits.
  int e;
  if (exp == 0) {  // subnormal source
    e = 1 - S::kBias;
    while ((sig & (uint64_t{1} << SRC_SIG_BITS)) == 0) {
      sig <<= 1;
      --e;
    }
    sig &= (uint64_t{1} << SRC_SIG_BITS) - 1;
  } else {
    e = exp - S::kBias;
  }
  // Full significand with hidden bit, SRC_SIG_BITS fraction bits.
  uint64_t full = sig | (uint64_t{1} << SRC_SIG_BITS);
  int dexp = e + D::kBias;
  int shift;  // right shift of `full` to get the destination significand (with hidden bit)
  if (dexp >= 1) {
    shift = SRC_SIG_BITS - DST_SIG_BITS;
  } else {  // destination subnormal
    shift = SRC_SIG_BITS - DST_SIG_BITS + (1 - dexp);
    dexp = 0;
  }
  uint64_t dsig;
  if (shift <= 0) {
    dsig = full << (-shift);
  } else if (shift >= 64) {
    dsig = 0;
  } else {
    dsig = full >> shift;
    const uint64_t rem = full & ((uint64_t{1} << shift) - 1);
    const uint64_t half = uint64_t{1} << (shift - 1);
    if (rem > half || (rem == half && (dsig & 1u))) ++dsig;
  }
  // dsig may have carried into the next binade.
  if (dexp == 0) {
    if (dsig & (uint64_t{1} << DST_SIG_BITS)) dexp = 1;  // rounded up to the smallest normal
  } else if (dsig & (uint64_t{1} << (DST_SIG_BITS + 1))) {
    dsig >>= 1;
    ++dexp;
  }
  if (dexp >= D::kMaxExp) {
    return dsign | static_cast<DST_REP_T>(static_cast<DST_REP_T>(D::kMaxExp) << DST_SIG_BITS);
  }
  dsig &= (uint64_t{1} << DST_SIG_BITS) - 1;
  return dsign | static_cast<DST_REP_T>(static_cast<DST_REP_T>(dexp) << DST_SIG_BITS) |
         static_cast<DST_REP_T>(dsig);
}
}  // namespace tvm_compress_fp

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __truncXfYf2__(SRC_T a) {
  SRC_REP_T bits = tvm_compress_fp::ToBits<SRC_T, SRC_REP_T>(a);
  DST_REP_T out =
      tvm_compress_fp::Convert<SRC_REP_T, SRC_SIG_BITS, DST_REP_T, DST_SIG_BITS>(bits);
  return tvm_compress_fp::FromBits<DST_T, DST_REP_T>(out);
}

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __extendXfYf2__(SRC_T a) {
  SRC_REP_T bits = tvm_compress_fp::ToBits<SRC_T, SRC_REP_T>(a);
  DST_REP_T out =
      tvm_compress_fp::Convert<SRC_REP_T, SRC_SIG_BITS, DST_REP_T, DST_SIG_BITS>(bits);
  return tvm_compress_fp::FromBits<DST_T, DST_REP_T>(out);
}

#endif  // TVM_COMPRESS_SHIM_BUILTIN_FP16_H_
