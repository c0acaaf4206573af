// Minimal stand-in for TVM's tvm/support/serializer.h (see io.h in this directory).
#ifndef TVM_COMPRESS_SHIM_TVM_SUPPORT_SERIALIZER_H_
#define TVM_COMPRESS_SHIM_TVM_SUPPORT_SERIALIZER_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

namespace shim_detail {
template <typename T, typename = void>
struct HasSaveLoad : std::false_type {};
template <typename T>
struct HasSaveLoad<T, std::void_t<decltype(std::declval<const T&>().Save(std::declval<Stream*>())),
                                  decltype(std::declval<T&>().Load(std::declval<Stream*>()))>>
    : std::true_type {};

inline bool ReadCount(Stream* strm, uint64_t* n) {
  return strm->Read(n, sizeof(uint64_t)) == sizeof(uint64_t);
}
}  // namespace shim_detail

// Trivially copyable values (integers, floats, enums, DLDataType, DLDevice): raw bytes.
template <typename T>
struct Serializer<T, std::enable_if_t<std::is_trivially_copyable_v<T> &&
                                      !shim_detail::HasSaveLoad<T>::value>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) { strm->Write(&value, sizeof(T)); }
  static bool Read(Stream* strm, T* out) { return strm->Read(out, sizeof(T)) == sizeof(T); }
};

// Classes with Save/Load members.
template <typename T>
struct Serializer<T, std::enable_if_t<shim_detail::HasSaveLoad<T>::value>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) { value.Save(strm); }
  static bool Read(Stream* strm, T* out) { return out->Load(strm); }
};

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& s) {
    uint64_t n = s.size();
    strm->Write(&n, sizeof(n));
    if (n != 0) strm->Write(s.data(), s.size());
  }
  static bool Read(Stream* strm, std::string* out) {
    uint64_t n;
    if (!shim_detail::ReadCount(strm, &n)) return false;
    out->resize(static_cast<size_t>(n));
    return n == 0 || strm->Read(&(*out)[0], static_cast<size_t>(n)) == n;
  }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& s) {
    Serializer<std::string>::Write(strm, std::string(s));
  }
  static bool Read(Stream* strm, ffi::String* out) {
    std::string s;
    if (!Serializer<std::string>::Read(strm, &s)) return false;
    *out = ffi::String(std::move(s));
    return true;
  }
};

template <typename T, typename A>
struct Serializer<std::vector<T, A>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::vector<T, A>& vec) {
    uint64_t n = vec.size();
    strm->Write(&n, sizeof(n));
    if constexpr (std::is_trivially_copyable_v<T> && !shim_detail::HasSaveLoad<T>::value) {
      if (n != 0) strm->Write(vec.data(), sizeof(T) * vec.size());
    } else {
      for (const T& v : vec) Serializer<T>::Write(strm, v);
    }
  }
  static bool Read(Stream* strm, std::vector<T, A>* out) {
    uint64_t n;
    if (!shim_detail::ReadCount(strm, &n)) return false;
    out->resize(static_cast<size_t>(n));
    if constexpr (std::is_trivially_copyable_v<T> && !shim_detail::HasSaveLoad<T>::value) {
      size_t bytes = sizeof(T) * static_cast<size_t>(n);
      return n == 0 || strm->Read(out->data(), bytes) == bytes;
    } else {
      for (T& v : *out) {
        if (!Serializer<T>::Read(strm, &v)) return false;
      }
      return true;
    }
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Array<T>& arr) {
    uint64_t n = arr.size();
    strm->Write(&n, sizeof(n));
    for (const T& v : arr) Serializer<T>::Write(strm, v);
  }
  static bool Read(Stream* strm, ffi::Array<T>* out) {
    uint64_t n;
    if (!shim_detail::ReadCount(strm, &n)) return false;
    ffi::Array<T> arr;
    for (uint64_t i = 0; i < n; ++i) {
      T v;
      if (!Serializer<T>::Read(strm, &v)) return false;
      arr.push_back(v);
    }
    *out = std::move(arr);
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::pair<A, B>& p) {
    Serializer<A>::Write(strm, p.first);
    Serializer<B>::Write(strm, p.second);
  }
  static bool Read(Stream* strm, std::pair<A, B>* out) {
    return Serializer<A>::Read(strm, &out->first) && Serializer<B>::Read(strm, &out->second);
  }
};

template <typename M>
struct MapSerializer {
  using K = typename M::key_type;
  using V = typename M::mapped_type;
  static void Write(Stream* strm, const M& m) {
    uint64_t n = m.size();
    strm->Write(&n, sizeof(n));
    for (const auto& kv : m) {
      Serializer<K>::Write(strm, kv.first);
      Serializer<V>::Write(strm, kv.second);
    }
  }
  static bool Read(Stream* strm, M* out) {
    uint64_t n;
    if (!shim_detail::ReadCount(strm, &n)) return false;
    out->clear();
    for (uint64_t i = 0; i < n; ++i) {
      K k;
      V v;
      if (!Serializer<K>::Read(strm, &k) || !Serializer<V>::Read(strm, &v)) return false;
      out->emplace(std::move(k), std::move(v));
    }
    return true;
  }
};

template <typename K, typename V, typename C, typename A>
struct Serializer<std::map<K, V, C, A>> : MapSerializer<std::map<K, V, C, A>> {
  static constexpr bool enabled = true;
};
template <typename K, typename V, typename H, typename E, typename A>
struct Serializer<std::unordered_map<K, V, H, E, A>>
    : MapSerializer<std::unordered_map<K, V, H, E, A>> {
  static constexpr bool enabled = true;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_COMPRESS_SHIM_TVM_SUPPORT_SERIALIZER_H_
