// MNEMO_CHECK: invariants that only a bug can break. They stay on in release
// builds and abort with the location; operating errors use Status instead.
#pragma once

namespace mnemo::internal {
[[noreturn]] void CheckFailed(const char* expr, const char* file, int line, const char* msg);
}  // namespace mnemo::internal

#define MNEMO_CHECK(cond)                                                   \
  do {                                                                      \
    if (__builtin_expect(!(cond), 0))                                       \
      ::mnemo::internal::CheckFailed(#cond, __FILE__, __LINE__, nullptr);   \
  } while (0)

#define MNEMO_CHECK_MSG(cond, msg)                                          \
  do {                                                                      \
    if (__builtin_expect(!(cond), 0))                                       \
      ::mnemo::internal::CheckFailed(#cond, __FILE__, __LINE__, (msg));     \
  } while (0)

#ifdef NDEBUG
#define MNEMO_DCHECK(cond) \
  do {                     \
  } while (0)
#else
#define MNEMO_DCHECK(cond) MNEMO_CHECK(cond)
#endif
