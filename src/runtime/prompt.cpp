// The reference's PurePromptBuilder and Python-compatible whitespace stripping.
#include "moxin/prompt.h"

#include "moxin/errors.h"
#include "runtime/tokenizer_internal.h"

namespace moxin {

namespace {

bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// Length of the whitespace character starting at `pos`, or 0 when it is not whitespace.
size_t space_at(std::string_view text, size_t pos) {
  const size_t length = detail::utf8_sequence_length(text.substr(pos));
  if (length == 0) return 0;  // invalid bytes are never whitespace
  return is_python_space(detail::decode_utf8(text.substr(pos, length))) ? length : 0;
}

void require_utf8(std::string_view text, const char* what) {
  if (!detail::is_valid_utf8(text))
    throw_error(ErrorKind::Request, std::string(what) + " is not valid UTF-8");
}

std::string remove_image_tags(std::string_view message) {
  std::string out;
  constexpr std::string_view tag = "<image>";
  size_t pos = 0;
  while (true) {
    const size_t hit = message.find(tag, pos);
    out.append(message.substr(pos, hit == std::string_view::npos ? hit : hit - pos));
    if (hit == std::string_view::npos) return out;
    pos = hit + tag.size();
  }
}

}  // namespace

std::string_view lstrip_whitespace(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t length = space_at(text, pos);
    if (length == 0) break;
    pos += length;
  }
  return text.substr(pos);
}

std::string_view rstrip_whitespace(std::string_view text) {
  // Walk forward (UTF-8 can only be split safely from the front) remembering where the last
  // non-space character ended.
  size_t pos = 0, end = 0;
  while (pos < text.size()) {
    size_t length = detail::utf8_sequence_length(text.substr(pos));
    if (length == 0) length = 1;  // an invalid byte counts as a non-space character
    const bool space = is_python_space(length == 1 && static_cast<unsigned char>(text[pos]) >= 0x80
                                           ? char32_t(0xFFFD)
                                           : detail::decode_utf8(text.substr(pos, length)));
    pos += length;
    if (!space) end = pos;
  }
  return text.substr(0, end);
}

std::string_view strip_whitespace(std::string_view text) {
  return rstrip_whitespace(lstrip_whitespace(text));
}

void PurePromptBuilder::add_human(std::string_view message) {
  if (awaiting_reply())
    throw_error(ErrorKind::Request, "a human turn is waiting for the model's reply");
  require_utf8(message, "the prompt");
  const std::string cleaned(strip_whitespace(remove_image_tags(message)));
  if (cleaned.empty()) throw_error(ErrorKind::Request, "the prompt is empty");
  last_turn_ = "In: " + cleaned + "\nOut: ";
  prompt_ += last_turn_;
  ++turn_count_;
}

void PurePromptBuilder::add_model(std::string_view reply) {
  if (!awaiting_reply()) throw_error(ErrorKind::Request, "a model reply needs a human turn first");
  require_utf8(reply, "the model's reply");
  std::string cleaned(strip_whitespace(remove_image_tags(reply)));
  last_turn_ = (cleaned.empty() ? std::string(" ") : cleaned) + "</s>";
  prompt_ += last_turn_;
  ++turn_count_;
}

std::string PurePromptBuilder::prompt() const {
  // The reference also drops a leading "<s>"; our builder never writes one.
  return std::string(rstrip_whitespace(prompt_));
}

std::string build_prompt(std::string_view question, PromptFormat format) {
  if (format == PromptFormat::Raw) {
    require_utf8(question, "the prompt");
    if (question.empty()) throw_error(ErrorKind::Request, "the prompt is empty");
    return std::string(question);
  }
  PurePromptBuilder builder;
  builder.add_human(question);
  return builder.prompt();
}

}  // namespace moxin
