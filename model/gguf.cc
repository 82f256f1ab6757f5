// GGUF parsing with every read bounds-checked against the mapped file.
#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

namespace mnemo::model {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
// Limits against hostile headers: far above any real model, far below what
// would exhaust memory before the bounds checks against the file size hit.
constexpr uint64_t kMaxTensors = 1u << 20;
constexpr uint64_t kMaxKeys = 1u << 20;
constexpr uint64_t kMaxDims = 4;
constexpr uint64_t kMaxKeyBytes = 1u << 16;

size_t ScalarSize(GgufType t) {
  switch (t) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kBool: return 1;
    case GgufType::kUint16: case GgufType::kInt16: return 2;
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kFloat32: return 4;
    case GgufType::kUint64: case GgufType::kInt64: case GgufType::kFloat64: return 8;
    default: return 0;
  }
}

bool KnownType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

// A cursor over [p, end) whose reads fail instead of overrunning.
class Reader {
 public:
  Reader(const uint8_t* begin, const uint8_t* end) : begin_(begin), p_(begin), end_(end) {}
  size_t pos() const { return static_cast<size_t>(p_ - begin_); }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }
  const uint8_t* ptr() const { return p_; }

  template <typename T>
  Status Read(T* out, const char* what) {
    if (remaining() < sizeof(T)) return Truncated(what);
    std::memcpy(out, p_, sizeof(T));
    p_ += sizeof(T);
    return Status::Ok();
  }
  Status Skip(uint64_t n, const char* what) {
    if (n > remaining()) return Truncated(what);
    p_ += n;
    return Status::Ok();
  }
  Status ReadString(std::string_view* out, uint64_t max_len, const char* what) {
    uint64_t len = 0;
    MNEMO_RETURN_IF_ERROR(Read(&len, what));
    if (len > max_len)
      return Status::Corruption(std::string(what) + ": string length " + std::to_string(len) +
                                " exceeds limit");
    if (len > remaining()) return Truncated(what);
    *out = std::string_view(reinterpret_cast<const char*>(p_), len);
    p_ += len;
    return Status::Ok();
  }
  Status Truncated(const char* what) const {
    return Status::Corruption(std::string("truncated file: ") + what + " at byte " +
                              std::to_string(pos()) + " runs past the end");
  }

 private:
  const uint8_t* begin_;
  const uint8_t* p_;
  const uint8_t* end_;
};

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

std::string_view GgufTypeName(GgufType t) {
  switch (t) {
    case GgufType::kUint8: return "uint8";
    case GgufType::kInt8: return "int8";
    case GgufType::kUint16: return "uint16";
    case GgufType::kInt16: return "int16";
    case GgufType::kUint32: return "uint32";
    case GgufType::kInt32: return "int32";
    case GgufType::kFloat32: return "float32";
    case GgufType::kBool: return "bool";
    case GgufType::kString: return "string";
    case GgufType::kArray: return "array";
    case GgufType::kUint64: return "uint64";
    case GgufType::kInt64: return "int64";
    case GgufType::kFloat64: return "float64";
  }
  return "unknown";
}

int64_t GgufTensorInfo::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

GgufFile::~GgufFile() {
  if (mapped_ && base_ != nullptr) munmap(const_cast<uint8_t*>(base_), size_);
}

Result<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno("open model '" + path + "'", errno);
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno("stat '" + path + "'", err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument("'" + path + "' is not a regular file");
  }
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    // MAP_POPULATE maps (and reads, when not cached) the whole file now, so
    // the first forward pass after start-up does not fault its weights in
    // 4 KiB at a time (as llama.cpp does on Linux).
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      return Status::FromErrno("mmap '" + path + "'", err);
    }
    f->base_ = static_cast<const uint8_t*>(p);
    f->mapped_ = true;
  }
  ::close(fd);
  Status s = f->Parse();
  if (!s.ok()) return s.WithContext("model '" + path + "'");
  return f;
}

Result<std::unique_ptr<GgufFile>> GgufFile::FromBytes(std::string bytes) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  const size_t alloc = (bytes.size() + 63) / 64 * 64 + 64;
  f->owned_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, alloc)));
  if (f->owned_ == nullptr) return Status::ResourceExhausted("out of memory copying a GGUF image");
  std::memcpy(f->owned_.get(), bytes.data(), bytes.size());
  f->base_ = f->owned_.get();
  f->size_ = bytes.size();
  MNEMO_RETURN_IF_ERROR(f->Parse());
  return f;
}

Status GgufFile::Parse() {
  Reader r(base_, base_ + size_);
  uint32_t magic = 0;
  MNEMO_RETURN_IF_ERROR(r.Read(&magic, "magic"));
  if (magic != kMagic) return Status::Corruption("not a GGUF file (bad magic)");
  MNEMO_RETURN_IF_ERROR(r.Read(&version_, "version"));
  if (version_ < 2 || version_ > 3)
    return Status::Unsupported("GGUF version " + std::to_string(version_) +
                               " (supported: 2 and 3)");
  uint64_t n_tensors = 0, n_kv = 0;
  MNEMO_RETURN_IF_ERROR(r.Read(&n_tensors, "tensor count"));
  MNEMO_RETURN_IF_ERROR(r.Read(&n_kv, "metadata count"));
  if (n_tensors > kMaxTensors)
    return Status::Corruption("tensor count " + std::to_string(n_tensors) + " exceeds limit");
  if (n_kv > kMaxKeys)
    return Status::Corruption("metadata count " + std::to_string(n_kv) + " exceeds limit");

  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string_view key;
    MNEMO_RETURN_IF_ERROR(r.ReadString(&key, kMaxKeyBytes, "metadata key"));
    std::string k(key);
    uint32_t type = 0;
    MNEMO_RETURN_IF_ERROR(r.Read(&type, "metadata type"));
    if (!KnownType(type))
      return Status::Corruption("metadata '" + k + "' has unknown type " + std::to_string(type));
    GgufValue v;
    v.type = static_cast<GgufType>(type);
    if (v.type == GgufType::kString) {
      v.data = r.ptr();
      std::string_view s;
      MNEMO_RETURN_IF_ERROR(r.ReadString(&s, r.remaining(), ("metadata '" + k + "'").c_str()));
    } else if (v.type == GgufType::kArray) {
      uint32_t et = 0;
      MNEMO_RETURN_IF_ERROR(r.Read(&et, "array type"));
      if (!KnownType(et))
        return Status::Corruption("array '" + k + "' has unknown element type " + std::to_string(et));
      v.elem_type = static_cast<GgufType>(et);
      MNEMO_RETURN_IF_ERROR(r.Read(&v.count, "array length"));
      v.data = r.ptr();
      if (v.elem_type == GgufType::kArray)
        return Status::Unsupported("array '" + k + "' nests arrays");
      if (v.elem_type == GgufType::kString) {
        // Each element is at least its 8-byte length.
        if (v.count > r.remaining() / 8) return r.Truncated(("array '" + k + "'").c_str());
        v.string_offsets.reserve(v.count);
        for (uint64_t j = 0; j < v.count; ++j) {
          v.string_offsets.push_back(static_cast<uint64_t>(r.ptr() - base_));
          std::string_view s;
          MNEMO_RETURN_IF_ERROR(r.ReadString(&s, r.remaining(), ("array '" + k + "'").c_str()));
        }
      } else {
        uint64_t bytes = 0;
        if (MulOverflows(v.count, ScalarSize(v.elem_type), &bytes) || bytes > r.remaining())
          return r.Truncated(("array '" + k + "'").c_str());
        MNEMO_RETURN_IF_ERROR(r.Skip(bytes, "array"));
      }
    } else {
      v.data = r.ptr();
      MNEMO_RETURN_IF_ERROR(r.Skip(ScalarSize(v.type), ("metadata '" + k + "'").c_str()));
    }
    if (kv_.count(k)) return Status::Corruption("duplicate metadata key '" + k + "'");
    key_order_.push_back(k);
    kv_.emplace(std::move(k), std::move(v));
  }

  if (const GgufValue* a = Find("general.alignment")) {
    auto al = GetUint("general.alignment");
    if (!al.ok()) return al.status();
    uint64_t v = *al;
    if (v == 0 || (v & (v - 1)) != 0 || v > (1u << 20))
      return Status::Corruption("general.alignment " + std::to_string(v) +
                                " is not a power of two up to 1 MiB");
    (void)a;
    alignment_ = v;
  }

  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    std::string_view name;
    MNEMO_RETURN_IF_ERROR(r.ReadString(&name, kMaxKeyBytes, "tensor name"));
    t.name = std::string(name);
    uint32_t n_dims = 0;
    MNEMO_RETURN_IF_ERROR(r.Read(&n_dims, "tensor dims"));
    if (n_dims == 0 || n_dims > kMaxDims)
      return Status::Corruption("tensor '" + t.name + "' has " + std::to_string(n_dims) +
                                " dimensions (1 to 4 allowed)");
    uint64_t elems = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne = 0;
      MNEMO_RETURN_IF_ERROR(r.Read(&ne, "tensor dim"));
      if (ne == 0 || ne > (uint64_t{1} << 40) || MulOverflows(elems, ne, &elems) ||
          elems > (uint64_t{1} << 48))
        return Status::Corruption("tensor '" + t.name + "' has an invalid shape");
      t.dims.push_back(static_cast<int64_t>(ne));
    }
    uint32_t type = 0;
    MNEMO_RETURN_IF_ERROR(r.Read(&type, "tensor type"));
    const kernels::DTypeInfo* info = kernels::GetDTypeInfo(type);
    if (info == nullptr || !kernels::IsWeightType(static_cast<kernels::DType>(type)))
      return Status::Unsupported("tensor '" + t.name + "' has unsupported type " +
                                 (info ? std::string(info->name) : "id " + std::to_string(type)));
    t.type = static_cast<kernels::DType>(type);
    if (t.dims[0] % info->block_elems != 0)
      return Status::Corruption("tensor '" + t.name + "' row length " + std::to_string(t.dims[0]) +
                                " is not a multiple of its block size");
    MNEMO_RETURN_IF_ERROR(r.Read(&t.offset, "tensor offset"));
    t.bytes = static_cast<size_t>(elems / info->block_elems) * info->block_bytes;
    if (tensor_index_.count(t.name))
      return Status::Corruption("duplicate tensor name '" + t.name + "'");
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  size_t header_end = r.pos();
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  if (n_tensors > 0 && data_offset_ > size_)
    return Status::Corruption("truncated file: data section starts past the end");
  const uint64_t data_size = size_ > data_offset_ ? size_ - data_offset_ : 0;
  for (GgufTensorInfo& t : tensors_) {
    if (t.offset % alignment_ != 0)
      return Status::Corruption("tensor '" + t.name + "' offset " + std::to_string(t.offset) +
                                " is not aligned to " + std::to_string(alignment_));
    if (t.offset > data_size || t.bytes > data_size - t.offset)
      return Status::Corruption("truncated file: tensor '" + t.name + "' (" +
                                std::to_string(t.bytes) + " bytes at data offset " +
                                std::to_string(t.offset) + ") extends past the end");
    t.data = base_ + data_offset_ + t.offset;
  }
  return Status::Ok();
}

bool GgufFile::Has(std::string_view key) const { return Find(key) != nullptr; }

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_.find(std::string(key));
  return it == kv_.end() ? nullptr : &it->second;
}

namespace {

Status Missing(std::string_view key) {
  return Status::NotFound("metadata key '" + std::string(key) + "' is missing");
}
Status WrongType(std::string_view key, GgufType got, const char* want) {
  return Status::InvalidArgument("metadata '" + std::string(key) + "' is " +
                                 std::string(GgufTypeName(got)) + ", expected " + want);
}

// Reads one integer element of type t at p; false if t is not an integer.
bool ReadInteger(GgufType t, const uint8_t* p, __int128* out) {
  switch (t) {
#define MNEMO_INT_CASE(E, T) \
  case GgufType::E: {        \
    T v;                     \
    std::memcpy(&v, p, sizeof v); \
    *out = v;                \
    return true;             \
  }
    MNEMO_INT_CASE(kUint8, uint8_t)
    MNEMO_INT_CASE(kInt8, int8_t)
    MNEMO_INT_CASE(kUint16, uint16_t)
    MNEMO_INT_CASE(kInt16, int16_t)
    MNEMO_INT_CASE(kUint32, uint32_t)
    MNEMO_INT_CASE(kInt32, int32_t)
    MNEMO_INT_CASE(kUint64, uint64_t)
    MNEMO_INT_CASE(kInt64, int64_t)
#undef MNEMO_INT_CASE
    default: return false;
  }
}

bool ReadFloating(GgufType t, const uint8_t* p, double* out) {
  if (t == GgufType::kFloat32) {
    float f;
    std::memcpy(&f, p, 4);
    *out = f;
    return true;
  }
  if (t == GgufType::kFloat64) {
    std::memcpy(out, p, 8);
    return true;
  }
  return false;
}

std::string ReadGgufString(const uint8_t* p) {
  uint64_t len;
  std::memcpy(&len, p, 8);
  return std::string(reinterpret_cast<const char*>(p + 8), len);
}

}  // namespace

Result<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  if (v->type != GgufType::kString) return WrongType(key, v->type, "string");
  return ReadGgufString(v->data);
}

Result<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  __int128 x;
  if (!ReadInteger(v->type, v->data, &x)) return WrongType(key, v->type, "an integer");
  if (x > std::numeric_limits<int64_t>::max())
    return Status::InvalidArgument("metadata '" + std::string(key) + "' is out of range");
  return static_cast<int64_t>(x);
}

Result<uint64_t> GgufFile::GetUint(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  __int128 x;
  if (!ReadInteger(v->type, v->data, &x)) return WrongType(key, v->type, "an integer");
  if (x < 0) return Status::InvalidArgument("metadata '" + std::string(key) + "' is negative");
  return static_cast<uint64_t>(x);
}

Result<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  double d;
  if (ReadFloating(v->type, v->data, &d)) return d;
  __int128 x;
  if (ReadInteger(v->type, v->data, &x)) return static_cast<double>(x);
  return WrongType(key, v->type, "a number");
}

Result<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  if (v->type != GgufType::kBool) return WrongType(key, v->type, "bool");
  return v->data[0] != 0;
}

Result<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString)
    return WrongType(key, v->type, "an array of strings");
  std::vector<std::string> out;
  out.reserve(v->count);
  for (uint64_t off : v->string_offsets) out.push_back(ReadGgufString(base_ + off));
  return out;
}

Result<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  if (v->type != GgufType::kArray) return WrongType(key, v->type, "an array of integers");
  size_t es = ScalarSize(v->elem_type);
  std::vector<int64_t> out;
  out.reserve(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    __int128 x;
    if (!ReadInteger(v->elem_type, v->data + i * es, &x) ||
        x > std::numeric_limits<int64_t>::max())
      return WrongType(key, v->elem_type, "an array of integers");
    out.push_back(static_cast<int64_t>(x));
  }
  return out;
}

Result<std::vector<float>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(key);
  if (v->type != GgufType::kArray) return WrongType(key, v->type, "an array of numbers");
  size_t es = ScalarSize(v->elem_type);
  std::vector<float> out;
  out.reserve(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    double d;
    __int128 x;
    if (ReadFloating(v->elem_type, v->data + i * es, &d)) {
      out.push_back(static_cast<float>(d));
    } else if (ReadInteger(v->elem_type, v->data + i * es, &x)) {
      out.push_back(static_cast<float>(x));
    } else {
      return WrongType(key, v->elem_type, "an array of numbers");
    }
  }
  return out;
}

Result<int64_t> GgufFile::GetIntOr(std::string_view key, int64_t fallback) const {
  return Has(key) ? GetInt(key) : Result<int64_t>(fallback);
}
Result<double> GgufFile::GetFloatOr(std::string_view key, double fallback) const {
  return Has(key) ? GetFloat(key) : Result<double>(fallback);
}
Result<bool> GgufFile::GetBoolOr(std::string_view key, bool fallback) const {
  return Has(key) ? GetBool(key) : Result<bool>(fallback);
}
Result<std::string> GgufFile::GetStringOr(std::string_view key, std::string fallback) const {
  return Has(key) ? GetString(key) : Result<std::string>(std::move(fallback));
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

void GgufFile::Release(const void* p, size_t bytes) const {
  if (!mapped_) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (b + 4095) & ~uintptr_t{4095}, hi = (b + bytes) & ~uintptr_t{4095};
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

}  // namespace mnemo::model
