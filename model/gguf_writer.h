// Writes GGUF v3 files: the project's own tiny test models and fixtures.
// Thread-compatible. Not used on any serving path.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "kernels/dtype.h"
#include "model/gguf.h"

namespace mnemo::model {

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = 32) : alignment_(alignment) {}

  void SetString(std::string key, std::string value);
  void SetUint32(std::string key, uint32_t value);
  void SetInt32(std::string key, int32_t value);
  void SetUint64(std::string key, uint64_t value);
  void SetFloat32(std::string key, float value);
  void SetBool(std::string key, bool value);
  void SetStringArray(std::string key, const std::vector<std::string>& values);
  void SetInt32Array(std::string key, const std::vector<int32_t>& values);
  void SetFloat32Array(std::string key, const std::vector<float>& values);
  // Any scalar or array type, raw little-endian payload (tests of odd types).
  void SetRaw(std::string key, GgufType type, std::string payload);

  // `data` must hold exactly the encoded bytes of dims with `type`.
  Status AddTensor(std::string name, std::vector<int64_t> dims, kernels::DType type,
                   std::string data);

  // The whole file.
  std::string Serialize() const;
  Status WriteFile(const std::string& path) const;

 private:
  struct Kv {
    std::string key;
    GgufType type;
    std::string payload;  // encoded value (after the type field)
  };
  struct Tensor {
    std::string name;
    std::vector<int64_t> dims;
    kernels::DType type;
    std::string data;
  };
  uint32_t alignment_;
  std::vector<Kv> kvs_;
  std::vector<Tensor> tensors_;
};

}  // namespace mnemo::model
