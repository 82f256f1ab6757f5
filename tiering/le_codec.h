// Little-endian integers and length-prefixed strings for tiering's own
// binary records (manifests, export files): an appending writer and a
// bounds-checked reader over one record. Internal to tiering/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace mnemo::tiering::le {

template <typename T>
void Put(std::string* out, T v) {
  static_assert(std::is_integral_v<T>);
  char b[sizeof(T)];
  auto u = static_cast<std::make_unsigned_t<T>>(v);
  for (size_t i = 0; i < sizeof(T); ++i) b[i] = static_cast<char>((u >> (8 * i)) & 0xff);
  out->append(b, sizeof(T));
}

template <typename Len>
void PutString(std::string* out, std::string_view s) {
  Put<Len>(out, static_cast<Len>(s.size()));
  out->append(s);
}

// Reads fail (false, nothing consumed) rather than run past the record.
class Reader {
 public:
  explicit Reader(std::string_view b) : b_(b) {}
  size_t left() const { return b_.size() - pos_; }
  size_t pos() const { return pos_; }

  template <typename T>
  bool Get(T* v) {
    static_assert(std::is_integral_v<T>);
    if (left() < sizeof(T)) return false;
    std::make_unsigned_t<T> u = 0;
    for (size_t i = 0; i < sizeof(T); ++i)
      u |= static_cast<std::make_unsigned_t<T>>(static_cast<uint8_t>(b_[pos_ + i])) << (8 * i);
    pos_ += sizeof(T);
    *v = static_cast<T>(u);
    return true;
  }

  template <typename Len>
  bool GetString(std::string* s, size_t max_bytes) {
    Len n = 0;
    const size_t at = pos_;
    if (!Get(&n) || n > max_bytes || left() < n) {
      pos_ = at;
      return false;
    }
    s->assign(b_.data() + pos_, n);
    pos_ += n;
    return true;
  }

 private:
  std::string_view b_;
  size_t pos_ = 0;
};

}  // namespace mnemo::tiering::le
