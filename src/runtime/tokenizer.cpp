// load_tokenizer, StreamingDetokenizer, and the UTF-8 / added-token helpers both back ends use.
#include "moxin/tokenizer.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moxin/errors.h"
#include "runtime/tokenizer_internal.h"

namespace moxin {
namespace detail {

size_t utf8_sequence_length(std::string_view bytes) {
  if (bytes.empty()) return 0;
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) return 1;
  size_t length = 0;
  unsigned char low = 0x80, high = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;   // overlong
    if (lead == 0xED) high = 0x9F;  // surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;   // overlong
    if (lead == 0xF4) high = 0x8F;  // past U+10FFFF
  } else {
    return 0;
  }
  if (bytes.size() < length) return 0;
  if (byte(1) < low || byte(1) > high) return 0;
  for (size_t i = 2; i < length; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  }
  return length;
}

bool is_valid_utf8(std::string_view bytes) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t length = utf8_sequence_length(bytes.substr(pos));
    if (length == 0) return false;
    pos += length;
  }
  return true;
}

void require_valid_utf8(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t length = utf8_sequence_length(text.substr(pos));
    if (length == 0) {
      char hex[8];
      std::snprintf(hex, sizeof(hex), "0x%02X", static_cast<unsigned char>(text[pos]));
      throw_error(ErrorKind::Tokenizer, "text is not valid UTF-8: byte " + std::string(hex) +
                                            " at offset " + std::to_string(pos));
    }
    pos += length;
  }
}

char32_t decode_utf8(std::string_view sequence) {
  const auto byte = [&](size_t i) {
    return static_cast<char32_t>(static_cast<unsigned char>(sequence[i]));
  };
  switch (sequence.size()) {
    case 1:
      return byte(0);
    case 2:
      return ((byte(0) & 0x1F) << 6) | (byte(1) & 0x3F);
    case 3:
      return ((byte(0) & 0x0F) << 12) | ((byte(1) & 0x3F) << 6) | (byte(2) & 0x3F);
    default:
      return ((byte(0) & 0x07) << 18) | ((byte(1) & 0x3F) << 12) | ((byte(2) & 0x3F) << 6) |
             (byte(3) & 0x3F);
  }
}

bool is_unicode_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool is_word_char(char32_t c) {
  if (c < 0x80) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  return !is_unicode_whitespace(c);
}

std::optional<uint8_t> parse_byte_piece(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return std::nullopt;
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  // Rust's u8::from_str_radix also takes a sign: "+A" is 10.
  if (piece[3] == '+') {
    const int low = digit(piece[4]);
    if (low < 0) return std::nullopt;
    return static_cast<uint8_t>(low);
  }
  const int high = digit(piece[3]), low = digit(piece[4]);
  if (high < 0 || low < 0) return std::nullopt;
  return static_cast<uint8_t>(high * 16 + low);
}

void replace_all(std::string& text, std::string_view pattern, std::string_view content) {
  if (pattern.empty()) return;
  std::string result;
  size_t start = 0;
  for (size_t found = text.find(pattern); found != std::string::npos;
       found = text.find(pattern, start)) {
    result.append(text, start, found - start);
    result.append(content);
    start = found + pattern.size();
  }
  if (start == 0) return;
  result.append(text, start, std::string::npos);
  text = std::move(result);
}

namespace {

// The code point that ends `text` (text is valid UTF-8 and non-empty).
char32_t last_char(std::string_view text, size_t* length) {
  size_t start = text.size() - 1;
  while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
  *length = text.size() - start;
  return decode_utf8(text.substr(start));
}

char32_t first_char(std::string_view text, size_t* length) {
  *length = utf8_sequence_length(text);
  if (*length == 0) *length = 1;  // defensive: inputs are validated upstream
  return decode_utf8(text.substr(0, *length));
}

}  // namespace

std::vector<TextSegment> split_on_added_tokens(std::string_view text,
                                               const std::vector<const AddedToken*>& tokens,
                                               const std::vector<std::string>& patterns) {
  std::vector<TextSegment> segments;
  std::vector<std::vector<size_t>> by_first_byte(256);
  for (size_t i = 0; i < patterns.size(); ++i) {
    if (!patterns[i].empty())
      by_first_byte[static_cast<unsigned char>(patterns[i][0])].push_back(i);
  }
  size_t start_offset = 0;  // end of the last accepted token
  size_t search = 0;        // where the matcher resumes (after the last match, accepted or not)
  while (search < text.size()) {
    size_t match_start = std::string_view::npos, match_pattern = 0, match_length = 0;
    for (size_t pos = search; pos < text.size() && match_start == std::string_view::npos; ++pos) {
      for (size_t index : by_first_byte[static_cast<unsigned char>(text[pos])]) {
        const std::string& pattern = patterns[index];
        if (pattern.size() > match_length && text.compare(pos, pattern.size(), pattern) == 0) {
          match_start = pos;
          match_pattern = index;
          match_length = pattern.size();
        }
      }
    }
    if (match_start == std::string_view::npos) break;
    search = match_start + match_length;
    const AddedToken& token = *tokens[match_pattern];
    size_t start = match_start, stop = match_start + match_length;
    if (start < start_offset) continue;  // inside whitespace an rstrip already took
    if (token.single_word) {
      size_t length = 0;
      const bool word_before = start > 0 && is_word_char(last_char(text.substr(0, start), &length));
      const bool word_after =
          stop < text.size() && is_word_char(first_char(text.substr(stop), &length));
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      size_t length = 0;
      while (start > start_offset &&
             is_unicode_whitespace(last_char(text.substr(0, start), &length))) {
        start -= length;
      }
    }
    if (token.rstrip) {
      size_t length = 0;
      while (stop < text.size() && is_unicode_whitespace(first_char(text.substr(stop), &length))) {
        stop += length;
      }
      search = std::max(search, stop);
    }
    if (start_offset < start) {
      segments.push_back({text.substr(start_offset, start - start_offset), -1, start_offset});
    }
    segments.push_back({std::string_view(), token.id, start});
    start_offset = stop;
  }
  if (start_offset < text.size()) {
    segments.push_back({text.substr(start_offset), -1, start_offset});
  }
  return segments;
}

std::string read_file_or_throw(const std::filesystem::path& file) {
  std::ifstream stream(file, std::ios::binary);
  if (!stream) throw_error(ErrorKind::Tokenizer, "cannot open tokenizer file " + file.string());
  std::ostringstream contents;
  contents << stream.rdbuf();
  if (stream.bad())
    throw_error(ErrorKind::Tokenizer, "cannot read tokenizer file " + file.string());
  return std::move(contents).str();
}

std::string configured_pad_token(const std::filesystem::path& dir) {
  for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
    const std::filesystem::path file = dir / name;
    std::error_code error;
    if (!std::filesystem::is_regular_file(file, error)) continue;
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(read_file_or_throw(file));
    } catch (const nlohmann::json::exception& e) {
      throw_error(ErrorKind::Tokenizer, file.string() + ": not valid JSON: " + e.what());
    }
    if (!doc.is_object() || !doc.contains("pad_token")) continue;
    const nlohmann::json& pad = doc["pad_token"];
    if (pad.is_string()) return pad.get<std::string>();
    if (pad.is_object() && pad.contains("content") && pad["content"].is_string()) {
      return pad["content"].get<std::string>();
    }
  }
  return "";
}

}  // namespace detail

std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& dir) {
  std::error_code error;
  if (!std::filesystem::is_directory(dir, error)) {
    throw_error(ErrorKind::Tokenizer, "tokenizer directory not found: " + dir.string());
  }
  const std::filesystem::path json_file = dir / "tokenizer.json";
  const std::filesystem::path model_file = dir / "tokenizer.model";
  // HF's fast tokenizer takes precedence over the SentencePiece model when both ship.
  if (std::filesystem::exists(json_file, error)) return detail::load_hf_tokenizer(json_file);
  if (std::filesystem::exists(model_file, error)) return detail::load_spm_tokenizer(model_file);
  throw_error(ErrorKind::Tokenizer, "no tokenizer in " + dir.string() + ": neither " +
                                        json_file.string() + " nor " + model_file.string() +
                                        " exists");
}

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : decoder_(tokenizer.make_incremental_decoder(skip_special_tokens)) {}

StreamingDetokenizer::~StreamingDetokenizer() = default;
StreamingDetokenizer::StreamingDetokenizer(StreamingDetokenizer&&) noexcept = default;
StreamingDetokenizer& StreamingDetokenizer::operator=(StreamingDetokenizer&&) noexcept = default;

std::string StreamingDetokenizer::feed(int32_t id) {
  std::string text;
  decoder_->push(id, text);
  return text;
}

std::string StreamingDetokenizer::finish() {
  std::string text;
  decoder_->finish(text);
  return text;
}

}  // namespace moxin
