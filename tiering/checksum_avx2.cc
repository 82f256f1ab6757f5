// XXH3-64 compiled for AVX2 (this file only; see tiering/CMakeLists.txt),
// from xxhash's own header in its inline mode. The distribution's
// libxxhash is built for baseline x86-64 (SSE2); XXH3 gives the same hash
// on every vector width, and the wider loop verifies a resumed session's
// pages at ~1.5x the rate (187 MB: ~10 ms of a vCPU against ~7 ms),
// time the loader takes from the step's threads.
#if defined(__x86_64__) && defined(__AVX2__)
#define XXH_INLINE_ALL
#define XXH_NAMESPACE mnemo_avx2_
#include <xxhash.h>

#include <cstddef>
#include <cstdint>

namespace mnemo::tiering::internal {

uint64_t PageChecksumAvx2(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

}  // namespace mnemo::tiering::internal
#endif
