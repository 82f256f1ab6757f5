// Geometry of KV pages on T2. A *block* holds one token span (page_tokens
// consecutive tokens) of one sequence for every layer: layer l's page sits
// at offset l * layer_stride, each layer page padded to the 4 KiB direct-I/O
// alignment. Resume and full-attention streaming read whole blocks (large
// sequential extents); one layer's page stays individually addressable.
//
// Immutable value type.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "kernels/backend.h"

namespace mnemo::tiering {

inline constexpr size_t kDirectIoAlignment = 4096;

// Slot number of a block in the page store (dense, from 0).
using BlockSlot = uint64_t;

struct BlockLayout {
  int32_t n_layers = 0;
  int32_t page_tokens = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  size_t page_bytes = 0;    // one layer's page as the pool stores it (K and V, fp16)
  size_t layer_stride = 0;  // page_bytes rounded up to kDirectIoAlignment
  size_t block_bytes = 0;   // n_layers * layer_stride

  static Result<BlockLayout> For(const kernels::KvLayout& kv, int32_t n_layers);
  size_t LayerOffset(int32_t layer) const { return static_cast<size_t>(layer) * layer_stride; }
  bool operator==(const BlockLayout&) const = default;
};

inline size_t AlignUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

}  // namespace mnemo::tiering
