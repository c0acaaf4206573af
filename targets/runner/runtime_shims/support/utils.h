// Stand-in for TVM's src/support/utils.h: only what the CPU runtime sources use.
#ifndef TVM_COMPRESS_SHIM_SUPPORT_UTILS_H_
#define TVM_COMPRESS_SHIM_SUPPORT_UTILS_H_

#include <cctype>
#include <cstddef>
#include <string>

namespace tvm {
namespace support {
/*! \brief Whether s is a non-empty string of decimal digits. */
inline bool IsNumber(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}
inline size_t HashCombine(size_t seed, size_t value) {
  return seed ^ (value + 0x9e3779b9 + (seed << 6) + (seed >> 2));
}
}  // namespace support
}  // namespace tvm

#endif  // TVM_COMPRESS_SHIM_SUPPORT_UTILS_H_
