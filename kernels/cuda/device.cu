// CUDA device discovery and a build/driver self-test. CUDA errors are
// translated to Status here and nowhere else.
#include <cuda_runtime.h>

#include <vector>

#include "kernels/cuda/device.h"

namespace mnemo::kernels::cuda {
namespace {

Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::Unavailable(std::string(what) + ": " + cudaGetErrorString(err));
}

__global__ void FillIota(int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i * 3 + 1;
}

}  // namespace

Result<std::vector<DeviceInfo>> ListDevices() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice) return std::vector<DeviceInfo>{};
  MNEMO_RETURN_IF_ERROR(FromCuda(err, "cudaGetDeviceCount"));
  std::vector<DeviceInfo> out;
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp p{};
    MNEMO_RETURN_IF_ERROR(FromCuda(cudaGetDeviceProperties(&p, d), "cudaGetDeviceProperties"));
    DeviceInfo info;
    info.index = d;
    info.name = p.name;
    info.compute_major = p.major;
    info.compute_minor = p.minor;
    info.total_memory_bytes = p.totalGlobalMem;
    info.multiprocessors = p.multiProcessorCount;
    MNEMO_RETURN_IF_ERROR(FromCuda(cudaSetDevice(d), "cudaSetDevice"));
    size_t free_b = 0, total_b = 0;
    MNEMO_RETURN_IF_ERROR(FromCuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo"));
    info.free_memory_bytes = free_b;
    out.push_back(std::move(info));
  }
  return out;
}

Status SelfTest(int device, int n) {
  if (n <= 0) return Status::InvalidArgument("self-test size must be positive");
  MNEMO_RETURN_IF_ERROR(FromCuda(cudaSetDevice(device), "cudaSetDevice"));
  int* dev = nullptr;
  MNEMO_RETURN_IF_ERROR(FromCuda(cudaMalloc(&dev, sizeof(int) * n), "cudaMalloc"));
  FillIota<<<(n + 255) / 256, 256>>>(dev, n);
  const Status launched = FromCuda(cudaGetLastError(), "kernel launch");
  std::vector<int> host(n);
  const Status copied =
      launched.ok() ? FromCuda(cudaMemcpy(host.data(), dev, sizeof(int) * n, cudaMemcpyDeviceToHost),
                               "cudaMemcpy")
                    : launched;
  (void)cudaFree(dev);
  MNEMO_RETURN_IF_ERROR(copied);
  for (int i = 0; i < n; ++i)
    if (host[i] != i * 3 + 1)
      return Status::Internal("CUDA self-test: wrong value at " + std::to_string(i));
  return Status::Ok();
}

}  // namespace mnemo::kernels::cuda
