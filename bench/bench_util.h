// Small helpers shared by the mnemo-bench subcommands.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace mnemo::bench {

// Steady-clock seconds (for differences only).
inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// "<tool>: <msg>" on stderr, then exit(code).
[[noreturn]] inline void DieAs(const char* tool, const std::string& msg, int code = 2) {
  std::fprintf(stderr, "%s: %s\n", tool, msg.c_str());
  std::exit(code);
}

}  // namespace mnemo::bench
