// Pieces shared by the two tokenizer back ends (tokenizer_hf.cpp, tokenizer_spm.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moxin/tokenizer.h"

namespace moxin::detail {

// Length of the well-formed UTF-8 sequence at the start of `bytes` (Unicode Table 3-7: no
// overlongs, surrogates or code points past U+10FFFF), or 0 when it is not one.
size_t utf8_sequence_length(std::string_view bytes);
bool is_valid_utf8(std::string_view bytes);
// Error(Tokenizer) naming the offset of the first bad byte.
void require_valid_utf8(std::string_view text);
// Code point of a sequence already known to be valid.
char32_t decode_utf8(std::string_view sequence);
bool is_unicode_whitespace(char32_t c);
// Rust's char::is_alphanumeric, as HF uses it for single_word added tokens: an approximation
// that counts every non-ASCII letter-like code point as alphanumeric.
bool is_word_char(char32_t c);

// "<0xAB>" -> 0xAB, as HF's ByteFallback decoder reads a token (6 bytes, two hex digits).
std::optional<uint8_t> parse_byte_piece(std::string_view piece);

inline constexpr std::string_view kMetaspace = "\xE2\x96\x81";        // U+2581 "▁"
inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

void replace_all(std::string& text, std::string_view pattern, std::string_view content);

// A token that is matched in raw text before the model sees it (<s>, <PAD>, ...).
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool normalized = false;   // matched in the normalized text rather than the raw text
  bool lstrip = false;       // also swallows the whitespace before it
  bool rstrip = false;       // ... and after it
  bool single_word = false;  // only matches between word boundaries
};

// A piece of text after added-token splitting: either an added token or a run of plain text.
struct TextSegment {
  std::string_view text;  // the plain text (empty for a token)
  int32_t token_id = -1;  // >= 0 for an added token
  size_t offset = 0;      // byte offset of `text` in the string that was split
};

// Splits on added tokens, leftmost-longest as HF's Aho-Corasick matcher does, applying each
// token's lstrip/rstrip/single_word rules. `patterns` are matched literally (already
// normalized where needed); patterns[i] belongs to tokens[i]. Empty plain runs are dropped.
std::vector<TextSegment> split_on_added_tokens(std::string_view text,
                                               const std::vector<const AddedToken*>& tokens,
                                               const std::vector<std::string>& patterns);

// The decoder state StreamingDetokenizer drives: one per stream.
class IncrementalDecoder {
 public:
  virtual ~IncrementalDecoder() = default;
  // Appends the text `id` completes to `out`. Validates `id` before touching any state.
  virtual void push(int32_t id, std::string& out) = 0;
  // Appends what was held back and returns to the initial state.
  virtual void finish(std::string& out) = 0;
};

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& json_file);
std::unique_ptr<Tokenizer> load_spm_tokenizer(const std::filesystem::path& model_file);

// Reads a whole file; Error(Tokenizer) naming it when it cannot be read.
std::string read_file_or_throw(const std::filesystem::path& file);

// The pad token named by tokenizer_config.json / special_tokens_map.json beside the tokenizer
// file, if any (Prismatic adds "<PAD>"); "" when neither names one.
std::string configured_pad_token(const std::filesystem::path& dir);

}  // namespace moxin::detail
