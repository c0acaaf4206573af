// Stand-in for TVM's src/support/base64.h: base64 streams over another Stream
// (standard alphabet, '=' padding), used by the JSON form of tensors.
#ifndef TVM_COMPRESS_SHIM_SUPPORT_BASE64_H_
#define TVM_COMPRESS_SHIM_SUPPORT_BASE64_H_

#include <tvm/support/io.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace tvm {
namespace support {

class Base64OutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit Base64OutStream(Stream* out) : out_(out) {}
  size_t Read(void*, size_t) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    const unsigned char* p = static_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      buf_[nbuf_++] = p[i];
      if (nbuf_ == 3) Flush3();
    }
    return size;
  }
  /*! \brief Write the last, padded group. */
  void Finish() {
    if (nbuf_ == 0) return;
    static const char* kAlphabet =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint32_t v = static_cast<uint32_t>(buf_[0]) << 16;
    if (nbuf_ > 1) v |= static_cast<uint32_t>(buf_[1]) << 8;
    char out[4] = {kAlphabet[(v >> 18) & 63], kAlphabet[(v >> 12) & 63],
                   nbuf_ > 1 ? kAlphabet[(v >> 6) & 63] : '=', '='};
    out_->Write(out, 4);
    nbuf_ = 0;
  }

 private:
  void Flush3() {
    static const char* kAlphabet =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint32_t v = (static_cast<uint32_t>(buf_[0]) << 16) | (static_cast<uint32_t>(buf_[1]) << 8) |
                 static_cast<uint32_t>(buf_[2]);
    char out[4] = {kAlphabet[(v >> 18) & 63], kAlphabet[(v >> 12) & 63], kAlphabet[(v >> 6) & 63],
                   kAlphabet[v & 63]};
    out_->Write(out, 4);
    nbuf_ = 0;
  }
  Stream* out_;
  unsigned char buf_[3];
  int nbuf_ = 0;
};

class Base64InStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit Base64InStream(Stream* in) : in_(in) {}
  void InitPosition() { nbuf_ = pos_ = 0; }
  size_t Read(void* ptr, size_t size) final {
    unsigned char* p = static_cast<unsigned char*>(ptr);
    size_t done = 0;
    while (done < size) {
      if (pos_ == nbuf_ && !Refill()) break;
      p[done++] = buf_[pos_++];
    }
    return done;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  static int Decode(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  }
  bool Refill() {
    char q[4];
    int got = 0;
    while (got < 4) {
      char c;
      if (in_->Read(&c, 1) != 1) return false;
      if (c == '=' || Decode(c) >= 0) q[got++] = c;  // skip whitespace and other noise
    }
    uint32_t v = 0;
    int n = 3;
    for (int i = 0; i < 4; ++i) {
      int d = q[i] == '=' ? 0 : Decode(q[i]);
      if (q[i] == '=') n = std::min(n, i - 1);
      v = (v << 6) | static_cast<uint32_t>(d);
    }
    buf_[0] = static_cast<unsigned char>(v >> 16);
    buf_[1] = static_cast<unsigned char>(v >> 8);
    buf_[2] = static_cast<unsigned char>(v);
    nbuf_ = n < 0 ? 0 : n;
    pos_ = 0;
    return nbuf_ > 0;
  }
  Stream* in_;
  unsigned char buf_[3];
  int nbuf_ = 0;
  int pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_COMPRESS_SHIM_SUPPORT_BASE64_H_
