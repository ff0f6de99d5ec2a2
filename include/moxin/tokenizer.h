// The Mistral/Llama SentencePiece BPE tokenizer, loaded from a checkpoint directory.
//
// Two sources, as Hugging Face would pick them: `tokenizer.json` (our own implementation of the
// HF `tokenizers` pipeline for the Llama/Mistral family) takes precedence; otherwise
// `tokenizer.model` goes through the SentencePiece library, with any `<PAD>`-style added tokens
// from `tokenizer_config.json` / `added_tokens.json` beside it. Ids match the respective Python
// reference exactly (HF `tokenizers`, `sentencepiece`); the two differ on purpose in the places
// the references differ (added tokens in text, the first leading space, invalid byte runs).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moxin {

namespace detail {
class IncrementalDecoder;  // src/runtime/tokenizer_internal.h
}

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text must be valid UTF-8 (else Error(Tokenizer)). add_bos applies the tokenizer's own
  // special-token template (for tokenizer.json: its TemplateProcessing, normally "<s> $A";
  // for tokenizer.model: BOS prepended), as HF's add_special_tokens=True does.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos = true) const = 0;

  // Ids outside [0, vocab_size()) -> Error(Request). Never returns invalid UTF-8: byte-fallback
  // pieces that do not form valid UTF-8 become U+FFFD, as the references do.
  virtual std::string decode(std::span<const int32_t> ids,
                             bool skip_special_tokens = true) const = 0;

  // The raw piece ("▁Hello", "<0x0A>", "<s>", "<PAD>"); Error(Request) when out of range.
  virtual std::string id_to_piece(int32_t id) const = 0;
  // One past the largest valid id, added tokens included (32001 with `<PAD>`). The model's
  // embedding table may be larger (32064): ids in between decode to Error(Request).
  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual std::optional<int32_t> pad_id() const = 0;
  // Special tokens are the ones decode(skip_special_tokens=true) drops.
  virtual bool is_special(int32_t id) const = 0;

 protected:
  friend class StreamingDetokenizer;
  virtual std::unique_ptr<detail::IncrementalDecoder> make_incremental_decoder(
      bool skip_special_tokens) const = 0;
};

// Reads <dir>/tokenizer.json if present, else <dir>/tokenizer.model. Missing or corrupt files,
// and tokenizer.json forms outside the Llama/Mistral BPE family -> Error(Tokenizer) naming the
// file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& dir);

// Turns generated ids into text as they arrive. The concatenation of everything feed() and
// finish() return equals tokenizer.decode(all ids, skip_special_tokens): the first piece's
// leading "▁" is dropped as decode drops it, later ones become spaces, and byte-fallback runs
// are held back until a non-byte piece (or finish()) completes them, so no chunk is ever broken
// UTF-8. The tokenizer must outlive the detokenizer.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = true);
  ~StreamingDetokenizer();
  StreamingDetokenizer(StreamingDetokenizer&&) noexcept;
  StreamingDetokenizer& operator=(StreamingDetokenizer&&) noexcept;

  // Returns the text this id completes (possibly empty). Out-of-range id -> Error(Request),
  // and the detokenizer's state is unchanged.
  std::string feed(int32_t id);
  // End of stream: returns whatever was held back (an unfinished byte run, as U+FFFD), and
  // starts afresh: the next id is the first of a new text.
  std::string finish();

 private:
  std::unique_ptr<detail::IncrementalDecoder> decoder_;
};

}  // namespace moxin
