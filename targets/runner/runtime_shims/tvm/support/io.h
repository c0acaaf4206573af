// Minimal stand-in for TVM's tvm/support/io.h, written for tvm-compress: the apache-tvm wheel
// ships the runtime sources but not this header. Only what the CPU Relax VM runtime uses.
// Binary format (must match what TVM writes on the host, little-endian): trivially copyable
// values raw; std::string / ffi::String as uint64 length + bytes; vectors / ffi::Array as
// uint64 count + elements (trivially copyable elements as one raw block); pairs member-wise;
// maps as uint64 count + (key, value) pairs; classes with Save(Stream*)/Load(Stream*) via those.
#ifndef TVM_COMPRESS_SHIM_TVM_SUPPORT_IO_H_
#define TVM_COMPRESS_SHIM_TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

class Stream;

/*! \brief How a value of type T is written to / read from a Stream (see serializer.h). */
template <typename T, typename Enable = void>
struct Serializer;

class Stream {
 public:
  virtual ~Stream() = default;
  /*! \brief Read up to size bytes; returns the number of bytes read. */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \brief Write size bytes. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* data, size_t n) {
    for (size_t i = 0; i < n; ++i) this->Write<T>(data[i]);
  }
  template <typename T>
  bool ReadArray(T* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (!this->Read<T>(data + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVM_COMPRESS_SHIM_TVM_SUPPORT_IO_H_
