// Names the calling thread (as top -H, ps -L, perf and gdb show it).
#pragma once

namespace mnemo {

// Linux keeps the first 15 bytes of `name`. Best effort: a failure is
// ignored.
void SetThreadName(const char* name);

}  // namespace mnemo
