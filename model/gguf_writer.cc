// GGUF v3 serialization.
#include "model/gguf_writer.h"

#include <cstdio>
#include <cstring>

namespace mnemo::model {
namespace {

template <typename T>
void Put(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void PutString(std::string* s, std::string_view v) {
  Put<uint64_t>(s, v.size());
  s->append(v);
}

}  // namespace

void GgufWriter::SetString(std::string key, std::string value) {
  std::string p;
  PutString(&p, value);
  kvs_.push_back({std::move(key), GgufType::kString, std::move(p)});
}
void GgufWriter::SetUint32(std::string key, uint32_t value) {
  std::string p;
  Put(&p, value);
  kvs_.push_back({std::move(key), GgufType::kUint32, std::move(p)});
}
void GgufWriter::SetInt32(std::string key, int32_t value) {
  std::string p;
  Put(&p, value);
  kvs_.push_back({std::move(key), GgufType::kInt32, std::move(p)});
}
void GgufWriter::SetUint64(std::string key, uint64_t value) {
  std::string p;
  Put(&p, value);
  kvs_.push_back({std::move(key), GgufType::kUint64, std::move(p)});
}
void GgufWriter::SetFloat32(std::string key, float value) {
  std::string p;
  Put(&p, value);
  kvs_.push_back({std::move(key), GgufType::kFloat32, std::move(p)});
}
void GgufWriter::SetBool(std::string key, bool value) {
  std::string p;
  Put<uint8_t>(&p, value ? 1 : 0);
  kvs_.push_back({std::move(key), GgufType::kBool, std::move(p)});
}
void GgufWriter::SetStringArray(std::string key, const std::vector<std::string>& values) {
  std::string p;
  Put<uint32_t>(&p, static_cast<uint32_t>(GgufType::kString));
  Put<uint64_t>(&p, values.size());
  for (const auto& v : values) PutString(&p, v);
  kvs_.push_back({std::move(key), GgufType::kArray, std::move(p)});
}
void GgufWriter::SetInt32Array(std::string key, const std::vector<int32_t>& values) {
  std::string p;
  Put<uint32_t>(&p, static_cast<uint32_t>(GgufType::kInt32));
  Put<uint64_t>(&p, values.size());
  for (int32_t v : values) Put(&p, v);
  kvs_.push_back({std::move(key), GgufType::kArray, std::move(p)});
}
void GgufWriter::SetFloat32Array(std::string key, const std::vector<float>& values) {
  std::string p;
  Put<uint32_t>(&p, static_cast<uint32_t>(GgufType::kFloat32));
  Put<uint64_t>(&p, values.size());
  for (float v : values) Put(&p, v);
  kvs_.push_back({std::move(key), GgufType::kArray, std::move(p)});
}
void GgufWriter::SetRaw(std::string key, GgufType type, std::string payload) {
  kvs_.push_back({std::move(key), type, std::move(payload)});
}

Status GgufWriter::AddTensor(std::string name, std::vector<int64_t> dims, kernels::DType type,
                             std::string data) {
  const kernels::DTypeInfo* info = kernels::GetDTypeInfo(static_cast<uint32_t>(type));
  if (info == nullptr) return Status::InvalidArgument("unknown tensor type");
  if (dims.empty() || dims.size() > 4) return Status::InvalidArgument("tensor needs 1-4 dims");
  if (dims[0] % info->block_elems != 0)
    return Status::InvalidArgument("row length not a multiple of the block size");
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  size_t want = static_cast<size_t>(n / info->block_elems) * info->block_bytes;
  if (data.size() != want)
    return Status::InvalidArgument("tensor '" + name + "' data is " + std::to_string(data.size()) +
                                   " bytes, expected " + std::to_string(want));
  tensors_.push_back({std::move(name), std::move(dims), type, std::move(data)});
  return Status::Ok();
}

std::string GgufWriter::Serialize() const {
  std::string s;
  Put<uint32_t>(&s, 0x46554747);
  Put<uint32_t>(&s, 3);
  Put<uint64_t>(&s, tensors_.size());
  bool has_alignment = false;
  for (const Kv& kv : kvs_) has_alignment |= kv.key == "general.alignment";
  Put<uint64_t>(&s, kvs_.size() + (alignment_ != 32 && !has_alignment ? 1 : 0));
  for (const Kv& kv : kvs_) {
    PutString(&s, kv.key);
    Put<uint32_t>(&s, static_cast<uint32_t>(kv.type));
    s += kv.payload;
  }
  if (alignment_ != 32 && !has_alignment) {
    PutString(&s, "general.alignment");
    Put<uint32_t>(&s, static_cast<uint32_t>(GgufType::kUint32));
    Put<uint32_t>(&s, alignment_);
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const Tensor& t : tensors_) {
    PutString(&s, t.name);
    Put<uint32_t>(&s, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) Put<uint64_t>(&s, static_cast<uint64_t>(d));
    Put<uint32_t>(&s, static_cast<uint32_t>(t.type));
    Put<uint64_t>(&s, offset);
    offsets.push_back(offset);
    offset += (t.data.size() + alignment_ - 1) / alignment_ * alignment_;
  }
  s.resize((s.size() + alignment_ - 1) / alignment_ * alignment_, '\0');
  for (const Tensor& t : tensors_) {
    s += t.data;
    s.resize((s.size() + alignment_ - 1) / alignment_ * alignment_, '\0');
  }
  return s;
}

Status GgufWriter::WriteFile(const std::string& path) const {
  std::string bytes = Serialize();
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return Status::FromErrno("open '" + path + "' for writing", errno);
  size_t n = std::fwrite(bytes.data(), 1, bytes.size(), f);
  int rc = std::fclose(f);
  if (n != bytes.size() || rc != 0) return Status::IOError("short write to '" + path + "'");
  return Status::Ok();
}

}  // namespace mnemo::model
