// Element and block types of weights and activations. Numeric values equal
// GGML's type ids, so a GGUF tensor's type field maps directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace mnemo::kernels {

enum class DType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ4_K = 12,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

struct DTypeInfo {
  std::string_view name;
  int32_t block_elems;  // elements per block (1 for plain types)
  int32_t block_bytes;  // bytes per block
};

// Returns nullptr for a type id mnemo does not know (caller reports it).
const DTypeInfo* GetDTypeInfo(uint32_t type_id);
inline const DTypeInfo& Info(DType t) { return *GetDTypeInfo(static_cast<uint32_t>(t)); }

// True for the types that may appear as model weights in a GGUF file.
bool IsWeightType(DType t);

// Bytes of one row of `cols` elements; cols must be a multiple of block_elems.
inline size_t RowBytes(DType t, int64_t cols) {
  const DTypeInfo& i = Info(t);
  return static_cast<size_t>(cols / i.block_elems) * static_cast<size_t>(i.block_bytes);
}

}  // namespace mnemo::kernels
