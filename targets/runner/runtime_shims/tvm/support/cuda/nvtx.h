// Stand-in for TVM's tvm/support/cuda/nvtx.h: NVTX ranges are a no-op on CPU-only runtimes.
#ifndef TVM_COMPRESS_SHIM_TVM_SUPPORT_CUDA_NVTX_H_
#define TVM_COMPRESS_SHIM_TVM_SUPPORT_CUDA_NVTX_H_

#include <string>

namespace tvm {
namespace support {
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};
}  // namespace support
}  // namespace tvm

#endif  // TVM_COMPRESS_SHIM_TVM_SUPPORT_CUDA_NVTX_H_
