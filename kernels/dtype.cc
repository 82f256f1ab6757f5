// The table of element and block types mnemo understands, keyed by GGML type id.
#include "kernels/dtype.h"

#include <array>

namespace mnemo::kernels {
namespace {

struct Entry {
  uint32_t id;
  DTypeInfo info;
};

// Block sizes and byte counts exactly as GGML's (ggml-common.h).
constexpr std::array<Entry, 10> kTable = {{
    {0, {"f32", 1, 4}},
    {1, {"f16", 1, 2}},
    {2, {"q4_0", 32, 18}},
    {3, {"q4_1", 32, 20}},
    {8, {"q8_0", 32, 34}},
    {9, {"q8_1", 32, 36}},
    {12, {"q4_K", 256, 144}},
    {14, {"q6_K", 256, 210}},
    {15, {"q8_K", 256, 292}},
    {30, {"bf16", 1, 2}},
}};

}  // namespace

const DTypeInfo* GetDTypeInfo(uint32_t type_id) {
  for (const Entry& e : kTable) {
    if (e.id == type_id) return &e.info;
  }
  return nullptr;
}

bool IsWeightType(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
    case DType::kQ4_0:
    case DType::kQ4_1:
    case DType::kQ8_0:
    case DType::kQ4_K:
    case DType::kQ6_K:
      return true;
    case DType::kQ8_1:  // activation-only formats
    case DType::kQ8_K:
      return false;
  }
  return false;
}

}  // namespace mnemo::kernels
