// Status and Result<T>: the error currency across mnemo's module boundaries.
// Immutable value types; cheap to copy when OK (no allocation).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/check.h"

namespace mnemo {

// Stable codes: they travel over the wire (protocol) and into metrics, so
// values are never renumbered.
enum class StatusCode : uint16_t {
  kOk = 0,
  kInvalidArgument = 1,   // the caller sent something malformed
  kNotFound = 2,          // unknown session, tensor, key...
  kCorruption = 3,        // stored or received bytes fail validation
  kIOError = 4,           // the OS said no (errno attached in the message)
  kResourceExhausted = 5, // a bound was hit: pages, queue, budget
  kUnsupported = 6,       // valid input this build cannot handle
  kFailedPrecondition = 7,
  kCancelled = 8,
  kInternal = 9,
  kOutOfRange = 10,       // e.g. prompt over the context limit
  kAlreadyExists = 11,
  kPermissionDenied = 12,
  kUnavailable = 13,      // shutting down, try later
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message);

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status Corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status IOError(std::string m) { return {StatusCode::kIOError, std::move(m)}; }
  // Appends strerror(err) to the message.
  static Status FromErrno(std::string context, int err);
  static Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
  static Status Unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }
  static Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
  static Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status PermissionDenied(std::string m) { return {StatusCode::kPermissionDenied, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  std::string_view message() const { return rep_ ? std::string_view(rep_->message) : std::string_view(); }
  // "Corruption: tensor 'x' extends past end of file"
  std::string ToString() const;
  // Returns a copy whose message is prefixed with `context: `.
  Status WithContext(std::string_view context) const;

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::shared_ptr<const Rep> rep_;  // null when OK
};

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    MNEMO_CHECK(!std::get<Status>(v_).ok());
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { MNEMO_CHECK(ok()); return std::get<T>(v_); }
  const T& value() const& { MNEMO_CHECK(ok()); return std::get<T>(v_); }
  T&& value() && { MNEMO_CHECK(ok()); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace mnemo

#define MNEMO_CONCAT_INNER(a, b) a##b
#define MNEMO_CONCAT(a, b) MNEMO_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function when `expr` is not OK.
#define MNEMO_RETURN_IF_ERROR(expr)          \
  do {                                       \
    ::mnemo::Status _st = (expr);            \
    if (!_st.ok()) return _st;               \
  } while (0)

// `MNEMO_ASSIGN_OR_RETURN(auto x, MakeX());`
#define MNEMO_ASSIGN_OR_RETURN(lhs, expr) \
  MNEMO_ASSIGN_OR_RETURN_IMPL(MNEMO_CONCAT(_res_, __LINE__), lhs, expr)
#define MNEMO_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
