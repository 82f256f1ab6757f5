// Read-only GGUF (v2/v3) file access over mmap. Every header field, metadata
// value, tensor offset and size is validated against the file before use, so
// a truncated, corrupt or hostile file yields a Corruption/Unsupported status
// naming what is wrong, never an out-of-bounds read.
//
// Immutable after Open: safe for concurrent readers. Pointers handed out
// (tensor data, string views) stay valid while the GgufFile lives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "kernels/dtype.h"

namespace mnemo::model {

enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

std::string_view GgufTypeName(GgufType t);

// One metadata value, pointing into the mapping.
struct GgufValue {
  GgufType type = GgufType::kUint8;
  GgufType elem_type = GgufType::kUint8;  // for arrays
  uint64_t count = 1;                     // array length; 1 for scalars
  const uint8_t* data = nullptr;          // scalar bytes or first element
  // For string arrays: offsets of each element (u64 length + bytes) are
  // validated at open; element i is read by GgufFile::ArrayString.
  std::vector<uint64_t> string_offsets;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ne[0] (contiguous) first
  kernels::DType type = kernels::DType::kF32;
  uint64_t offset = 0;  // relative to the data section
  size_t bytes = 0;
  const void* data = nullptr;  // inside the mapping
  int64_t elements() const;
};

class GgufFile {
 public:
  // Maps `path` read-only and validates it.
  static Result<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory copy (tests, fuzzing).
  static Result<std::unique_ptr<GgufFile>> FromBytes(std::string bytes);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  size_t file_size() const { return size_; }
  size_t alignment() const { return alignment_; }
  size_t data_offset() const { return data_offset_; }
  const uint8_t* base() const { return base_; }
  // Tells the kernel that [p, p + bytes) of a mapped file will not be read
  // for a while (a weight the backend copied): its whole pages leave this
  // process's resident set and fault back in from the page cache if read.
  // Nothing for an in-memory copy.
  void Release(const void* p, size_t bytes) const;

  // --- Metadata --------------------------------------------------------------
  bool Has(std::string_view key) const;
  const GgufValue* Find(std::string_view key) const;
  const std::vector<std::string>& keys() const { return key_order_; }
  // Typed getters: NotFound when missing, InvalidArgument on a type mismatch
  // (integers convert between widths when the value fits).
  Result<std::string> GetString(std::string_view key) const;
  Result<int64_t> GetInt(std::string_view key) const;
  Result<uint64_t> GetUint(std::string_view key) const;
  Result<double> GetFloat(std::string_view key) const;
  Result<bool> GetBool(std::string_view key) const;
  Result<std::vector<std::string>> GetStringArray(std::string_view key) const;
  Result<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  Result<std::vector<float>> GetFloatArray(std::string_view key) const;
  // Convenience: value or `fallback` when the key is absent (errors still
  // returned for a present key of the wrong type).
  Result<int64_t> GetIntOr(std::string_view key, int64_t fallback) const;
  Result<double> GetFloatOr(std::string_view key, double fallback) const;
  Result<bool> GetBoolOr(std::string_view key, bool fallback) const;
  Result<std::string> GetStringOr(std::string_view key, std::string fallback) const;

  // --- Tensors ---------------------------------------------------------------
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;

 private:
  GgufFile() = default;
  Status Parse();

  // constant after construction
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  // FromBytes storage, 64-byte aligned like a mapping, so tensor data keeps
  // the file's alignment in memory.
  std::unique_ptr<uint8_t, void (*)(void*)> owned_{nullptr, &std::free};
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  size_t data_offset_ = 0;
  std::unordered_map<std::string, GgufValue> kv_;
  std::vector<std::string> key_order_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace mnemo::model
