// CUDA discovery and self-test; they need a GPU, and say so when skipped.
#include "kernels/cuda/device.h"

#include <gtest/gtest.h>

namespace mnemo::kernels::cuda {
namespace {

TEST(CudaDevice, ListsDevicesAndRunsAKernelOnEach) {
  auto devices = ListDevices();
  if (!devices.ok() || devices->empty())
    GTEST_SKIP() << "needs a CUDA GPU (none visible here: "
                 << (devices.ok() ? "no devices" : devices.status().ToString())
                 << "); run on a GPU host";
  for (const DeviceInfo& d : *devices) {
    EXPECT_FALSE(d.name.empty());
    EXPECT_GT(d.total_memory_bytes, 0u);
    EXPECT_LE(d.free_memory_bytes, d.total_memory_bytes);
    Status s = SelfTest(d.index);
    EXPECT_TRUE(s.ok()) << d.name << ": " << s.ToString();
  }
  EXPECT_EQ(SelfTest(0, 0).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mnemo::kernels::cuda
