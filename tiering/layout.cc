// BlockLayout: T2 block geometry from the KV page layout.
#include "tiering/layout.h"

namespace mnemo::tiering {

Result<BlockLayout> BlockLayout::For(const kernels::KvLayout& kv, int32_t n_layers) {
  if (n_layers <= 0 || kv.page_tokens <= 0 || kv.n_kv_heads <= 0 || kv.head_dim <= 0)
    return Status::InvalidArgument("invalid KV layout for T2 blocks");
  BlockLayout b;
  b.n_layers = n_layers;
  b.page_tokens = kv.page_tokens;
  b.n_kv_heads = kv.n_kv_heads;
  b.head_dim = kv.head_dim;
  b.page_bytes = kv.page_bytes();
  b.layer_stride = AlignUp(b.page_bytes, kDirectIoAlignment);
  b.block_bytes = b.layer_stride * static_cast<size_t>(n_layers);
  return b;
}

}  // namespace mnemo::tiering
