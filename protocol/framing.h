// Framing of the daemon protocol: a u32 little-endian length followed by one
// verified `wire::Frame` FlatBuffer. Owns the only translation of FlatBuffers
// verification failures into Status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "protocol/mnemo_generated.h"
#include "protocol/types.h"  // kProtocolVersion, frame size limits

namespace mnemo::protocol {

// Prepends the length header to a finished builder's buffer.
// REQUIRES: builder.Finish...() was called.
std::string EncodeFrame(const flatbuffers::FlatBufferBuilder& builder);

struct DecoderLimits {
  uint32_t max_frame_bytes = kDefaultMaxFrameBytes;  // FlatBuffer bytes, header excluded
  uint32_t max_depth = 16;          // nesting of tables/vectors
  uint32_t max_tables = 1u << 16;   // tables verified per frame
};

// One frame ready for use: the verified root and the raw bytes it lives in.
// Borrowed from the decoder: valid until the next Feed() or Next() call.
struct FrameView {
  const wire::Frame* frame = nullptr;
  uint64_t id = 0;
  wire::Message type = wire::Message::NONE;
  std::span<const uint8_t> bytes;  // the FlatBuffer, header excluded
};

// Incremental decoder for one connection's byte stream.
//
// Feed() takes whatever a read returned (any split, several frames at once);
// Next() hands out complete frames one by one. Nothing is exposed before the
// whole frame is present and passed flatbuffers::Verifier. A length prefix is
// checked against the limit as soon as its 4 bytes arrive, and the frame body
// buffer only grows with bytes actually received, so a lying length prefix
// allocates nothing.
//
// Errors from Next():
//   ResourceExhausted  length prefix over max_frame_bytes            (fatal)
//   InvalidArgument    zero-length frame                             (fatal)
//   Corruption         frame fails verification (garbage, truncated
//                      tables, bad offsets, wrong file identifier)   (fatal)
//   InvalidArgument    verified frame with a message type this build
//                      does not know, or none                        (not fatal)
// After a fatal error failed() is true and every later Next() returns the
// same Status: the connection is out of sync and must be closed. After a
// non-fatal error error_id() is the offending frame's id so the caller can
// reply with an Error, and decoding continues with the next frame.
//
// Buffered input is what was fed and not yet consumed by Next(); callers
// drain Next() after each Feed() so it stays bounded by one read plus one
// frame.
//
// Thread-compatible: one per connection.
class FrameDecoder {
 public:
  explicit FrameDecoder(DecoderLimits limits = {});

  FrameDecoder(const FrameDecoder&) = delete;
  FrameDecoder& operator=(const FrameDecoder&) = delete;

  void Feed(std::span<const uint8_t> bytes);
  void Feed(std::string_view bytes);

  // The next complete frame, std::nullopt when more bytes are needed, or an
  // error as above.
  Result<std::optional<FrameView>> Next();

  bool failed() const { return !fatal_.ok(); }
  // Id of the frame behind the last non-fatal error; 0 when unknown.
  uint64_t error_id() const { return error_id_; }
  // Bytes held: unconsumed input plus the partial frame body.
  size_t buffered_bytes() const { return (input_.size() - input_pos_) + body_.size(); }
  // True between frames (no partial header or body pending).
  bool idle() const { return header_have_ == 0 && !in_body_ && input_pos_ == input_.size(); }
  const DecoderLimits& limits() const { return limits_; }

 private:
  Status Fail(Status status);

  // --- constant after construction -------------------------------------------
  DecoderLimits limits_;

  // --- stream state ----------------------------------------------------------
  std::string input_;     // fed, not yet consumed from input_pos_
  size_t input_pos_ = 0;
  uint8_t header_[kFrameHeaderBytes] = {};
  size_t header_have_ = 0;
  bool in_body_ = false;
  uint32_t body_len_ = 0;
  // Heap storage from operator new: aligned for the verifier's alignment checks.
  std::vector<uint8_t> body_;
  Status fatal_;
  uint64_t error_id_ = 0;
};

}  // namespace mnemo::protocol
