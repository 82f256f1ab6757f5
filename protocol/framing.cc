// Frame encoding and the incremental, verifying frame decoder.
#include "protocol/framing.h"

#include <algorithm>
#include <cstring>

namespace mnemo::protocol {

std::string EncodeFrame(const flatbuffers::FlatBufferBuilder& builder) {
  const uint32_t size = builder.GetSize();
  std::string out(kFrameHeaderBytes + size, '\0');
  for (size_t i = 0; i < kFrameHeaderBytes; ++i) out[i] = static_cast<char>((size >> (8 * i)) & 0xff);
  std::memcpy(out.data() + kFrameHeaderBytes, builder.GetBufferPointer(), size);
  return out;
}

FrameDecoder::FrameDecoder(DecoderLimits limits) : limits_(limits) {
  MNEMO_CHECK(limits_.max_frame_bytes > 0 && limits_.max_frame_bytes <= kMaxFrameBytesCeiling);
  MNEMO_CHECK(limits_.max_depth > 0 && limits_.max_tables > 0);
}

void FrameDecoder::Feed(std::span<const uint8_t> bytes) {
  Feed(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

void FrameDecoder::Feed(std::string_view bytes) {
  if (failed() || bytes.empty()) return;  // a failed stream is never read again
  if (input_pos_ == input_.size()) {
    input_.clear();
    input_pos_ = 0;
  } else if (input_pos_ > input_.size() / 2) {
    input_.erase(0, input_pos_);
    input_pos_ = 0;
  }
  input_.append(bytes);
}

Status FrameDecoder::Fail(Status status) {
  fatal_ = status;
  input_.clear();
  input_.shrink_to_fit();
  input_pos_ = 0;
  body_.clear();
  body_.shrink_to_fit();
  in_body_ = false;
  return status;
}

Result<std::optional<FrameView>> FrameDecoder::Next() {
  if (failed()) return fatal_;
  error_id_ = 0;
  if (!in_body_) {
    // The previous frame (if any) is handed out; its storage is reused.
    body_.clear();
    const size_t take = std::min(kFrameHeaderBytes - header_have_, input_.size() - input_pos_);
    std::memcpy(header_ + header_have_, input_.data() + input_pos_, take);
    header_have_ += take;
    input_pos_ += take;
    if (header_have_ < kFrameHeaderBytes) return std::optional<FrameView>();
    const uint32_t len = uint32_t{header_[0]} | uint32_t{header_[1]} << 8 |
                         uint32_t{header_[2]} << 16 | uint32_t{header_[3]} << 24;
    header_have_ = 0;
    if (len > limits_.max_frame_bytes) {
      return Fail(Status::ResourceExhausted("frame of " + std::to_string(len) +
                                            " bytes exceeds the limit of " +
                                            std::to_string(limits_.max_frame_bytes)));
    }
    if (len == 0) return Fail(Status::InvalidArgument("zero-length frame"));
    in_body_ = true;
    body_len_ = len;
  }

  const size_t available = input_.size() - input_pos_;
  const size_t take = std::min<size_t>(body_len_ - body_.size(), available);
  if (take > 0) {
    const size_t needed = body_.size() + take;
    // Grow only with bytes received, never past the declared length.
    if (needed > body_.capacity()) body_.reserve(std::min<size_t>(body_len_, std::max(needed, 2 * body_.capacity())));
    const auto* src = reinterpret_cast<const uint8_t*>(input_.data() + input_pos_);
    body_.insert(body_.end(), src, src + take);
    input_pos_ += take;
  }
  if (body_.size() < body_len_) return std::optional<FrameView>();
  in_body_ = false;

  flatbuffers::Verifier::Options options;
  options.max_depth = limits_.max_depth;
  options.max_tables = limits_.max_tables;
  options.check_alignment = true;
  flatbuffers::Verifier verifier(body_.data(), body_.size(), options);
  if (!wire::VerifyFrameBuffer(verifier)) {
    return Fail(Status::Corruption("frame of " + std::to_string(body_.size()) +
                                   " bytes fails FlatBuffers verification"));
  }
  const wire::Frame* frame = wire::GetFrame(body_.data());
  const wire::Message type = frame->message_type();
  if (type == wire::Message::NONE || type > wire::Message::MAX || frame->message() == nullptr) {
    error_id_ = frame->id();
    return Status::InvalidArgument("frame " + std::to_string(frame->id()) +
                                   ": unknown or missing message type " +
                                   std::to_string(static_cast<unsigned>(type)));
  }
  return std::optional<FrameView>(FrameView{frame, frame->id(), type, std::span<const uint8_t>(body_)});
}

}  // namespace mnemo::protocol
