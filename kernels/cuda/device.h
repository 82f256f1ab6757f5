// CUDA device discovery: the first piece of the CUDA backend. Built only when
// nvcc is found (MNEMO_HAVE_CUDA); this header includes no CUDA header, so
// the rest of mnemo stays free of them.
//
// Thread-safe (the CUDA runtime serializes its own state).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace mnemo::kernels::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  size_t total_memory_bytes = 0;
  size_t free_memory_bytes = 0;
  int multiprocessors = 0;
};

// Every visible device; an empty list (not an error) when the driver reports
// none. Unavailable when the driver or runtime cannot be initialised.
Result<std::vector<DeviceInfo>> ListDevices();

// Runs a trivial kernel on `device` that writes `n` values and checks them on
// the host: proves that code built by this toolchain runs on that device.
Status SelfTest(int device, int n = 1 << 20);

}  // namespace mnemo::kernels::cuda
