// Stand-in for TVM's src/support/bytes_io.h: streams over memory.
#ifndef TVM_COMPRESS_SHIM_SUPPORT_BYTES_IO_H_
#define TVM_COMPRESS_SHIM_SUPPORT_BYTES_IO_H_

#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief Reads from bytes the caller keeps alive (an ffi::Bytes is held by reference count). */
class BytesInStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit BytesInStream(const std::string& s) : data_(s.data()), size_(s.size()) {}
  explicit BytesInStream(const ffi::Bytes& b) : holder_(b), data_(holder_.data()), size_(holder_.size()) {}
  BytesInStream(const char* data, size_t size) : data_(data), size_(size) {}

  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, size_ - pos_);
    if (n != 0) std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  ffi::Bytes holder_;
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

/*! \brief Appends to a std::string. */
class BytesOutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit BytesOutStream(std::string* out) : out_(out) {}
  size_t Read(void*, size_t) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_COMPRESS_SHIM_SUPPORT_BYTES_IO_H_
