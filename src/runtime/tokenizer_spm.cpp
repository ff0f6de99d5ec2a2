// tokenizer.model: encoding through the SentencePiece library, plus the tokens HF added after
// the model's pieces (Prismatic's <PAD> = 32000), read from tokenizer_config.json or
// added_tokens.json beside it. Decoding follows SentencePiece's own rules (control pieces
// invisible, <unk> as " ⁇ ", byte pieces decoded character by character with U+FFFD per bad
// byte, the first visible piece's leading "▁" dropped), written once as an incremental decoder
// so decode() and streaming cannot disagree; tests check it against the library's DecodeIds.
#include <sentencepiece_processor.h>
#include <nlohmann/json.hpp>

#include "moxin/errors.h"
#include "runtime/tokenizer_internal.h"

namespace moxin::detail {
namespace {

using json = nlohmann::json;

struct PieceInfo {
  enum class Kind { kNormal, kControl, kUnknown, kByte, kAddedSpecial, kAddedText, kAbsent } kind;
  std::string text;  // the piece as SentencePiece spells it, or the added token's content
  uint8_t byte = 0;
};

class SpmTokenizer;

class SpmIncrementalDecoder final : public IncrementalDecoder {
 public:
  SpmIncrementalDecoder(const SpmTokenizer& tokenizer, bool skip_special)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  void push(int32_t id, std::string& out) override;
  void finish(std::string& out) override {
    flush_bytes(out);
    at_start_ = true;
  }

 private:
  void flush_bytes(std::string& out);

  const SpmTokenizer& tokenizer_;
  bool skip_special_;
  bool at_start_ = true;  // no visible piece yet: the next one loses its leading "▁"
  std::string pending_bytes_;
};

class SpmTokenizer final : public Tokenizer {
 public:
  explicit SpmTokenizer(const std::filesystem::path& file);

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    SpmIncrementalDecoder decoder(*this, skip_special_tokens);
    std::string text;
    for (int32_t id : ids) decoder.push(id, text);
    decoder.finish(text);
    return text;
  }
  std::string id_to_piece(int32_t id) const override { return piece(id).text; }
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  std::optional<int32_t> pad_id() const override { return pad_id_; }
  bool is_special(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return false;
    const PieceInfo::Kind kind = pieces_[id].kind;
    return kind == PieceInfo::Kind::kControl || kind == PieceInfo::Kind::kAddedSpecial;
  }

  const PieceInfo& piece(int32_t id) const {
    if (id < 0 || id >= vocab_size() || pieces_[id].kind == PieceInfo::Kind::kAbsent) {
      throw_error(ErrorKind::Request, "token id " + std::to_string(id) +
                                          " is outside the tokenizer's vocabulary (size " +
                                          std::to_string(vocab_size()) + ")");
    }
    return pieces_[id];
  }
  const std::string& unk_surface() const { return unk_surface_; }

 protected:
  std::unique_ptr<IncrementalDecoder> make_incremental_decoder(bool skip) const override {
    return std::make_unique<SpmIncrementalDecoder>(*this, skip);
  }

 private:
  [[noreturn]] void fail(const std::filesystem::path& file, const std::string& what) const {
    throw_error(ErrorKind::Tokenizer, file.string() + ": " + what);
  }
  void read_added_tokens(const std::filesystem::path& dir);

  sentencepiece::SentencePieceProcessor processor_;
  std::vector<PieceInfo> pieces_;
  std::vector<AddedToken> added_tokens_;
  std::vector<const AddedToken*> added_pointers_;
  std::vector<std::string> added_patterns_;
  std::string unk_surface_;
  int32_t bos_id_ = -1, eos_id_ = -1;
  std::optional<int32_t> pad_id_;
};

SpmTokenizer::SpmTokenizer(const std::filesystem::path& file) {
  const std::string bytes = read_file_or_throw(file);
  const sentencepiece::util::Status status = processor_.LoadFromSerializedProto(bytes);
  if (!status.ok()) fail(file, "not a SentencePiece model: " + status.ToString());
  const int size = processor_.GetPieceSize();
  if (size <= 0) fail(file, "SentencePiece model has no pieces");
  bos_id_ = processor_.bos_id();
  eos_id_ = processor_.eos_id();
  if (bos_id_ < 0 || bos_id_ >= size || eos_id_ < 0 || eos_id_ >= size) {
    fail(file, "SentencePiece model lacks a BOS or EOS piece");
  }
  pieces_.resize(size);
  for (int id = 0; id < size; ++id) {
    PieceInfo& info = pieces_[id];
    info.text = processor_.IdToPiece(id);
    if (processor_.IsControl(id)) {
      info.kind = PieceInfo::Kind::kControl;
    } else if (processor_.IsUnknown(id)) {
      info.kind = PieceInfo::Kind::kUnknown;
    } else if (processor_.IsByte(id)) {
      const std::optional<uint8_t> byte = parse_byte_piece(info.text);
      if (!byte) fail(file, "byte piece " + std::to_string(id) + " is spelt \"" + info.text + "\"");
      info.kind = PieceInfo::Kind::kByte;
      info.byte = *byte;
    } else {
      info.kind = PieceInfo::Kind::kNormal;
    }
  }
  // The library's own rendering of <unk> (trainer_spec.unk_surface, " ⁇ " by default).
  if (const int unk = processor_.unk_id(); unk >= 0 && unk < size) {
    unk_surface_ = processor_.DecodeIds({unk});
  }
  read_added_tokens(file.parent_path());
  std::string pad = configured_pad_token(file.parent_path());
  for (const std::string& name : {pad, std::string("<PAD>"), std::string("<pad>")}) {
    if (name.empty() || pad_id_) continue;
    for (const AddedToken& token : added_tokens_) {
      if (token.content == name) pad_id_ = token.id;
    }
  }
  if (!pad_id_ && processor_.pad_id() >= 0) pad_id_ = processor_.pad_id();
}

// Transformers records added tokens in tokenizer_config.json (added_tokens_decoder) and, older,
// in added_tokens.json. Only ids past the model's pieces matter: the others are the model's
// own control pieces, which SentencePiece already knows.
void SpmTokenizer::read_added_tokens(const std::filesystem::path& dir) {
  const auto load = [&](const std::filesystem::path& file) -> std::optional<json> {
    std::error_code error;
    if (!std::filesystem::is_regular_file(file, error)) return std::nullopt;
    try {
      return json::parse(read_file_or_throw(file));
    } catch (const json::exception& e) {
      fail(file, std::string("not valid JSON: ") + e.what());
    }
  };
  const int32_t model_size = static_cast<int32_t>(pieces_.size());
  const auto add = [&](const std::filesystem::path& file, int64_t id, const std::string& content,
                       bool special) {
    if (id < model_size) return;
    if (id > 10'000'000) fail(file, "added token id " + std::to_string(id) + " is out of range");
    if (content.empty() || !is_valid_utf8(content)) {
      fail(file, "added token " + std::to_string(id) + " has empty or non-UTF-8 content");
    }
    AddedToken token;
    token.id = static_cast<int32_t>(id);
    token.content = content;
    token.special = special;
    added_tokens_.push_back(std::move(token));
  };
  const std::filesystem::path config_file = dir / "tokenizer_config.json";
  const std::filesystem::path added_file = dir / "added_tokens.json";
  try {
    if (auto config = load(config_file); config && config->contains("added_tokens_decoder")) {
      for (const auto& [key, entry] : (*config)["added_tokens_decoder"].items()) {
        add(config_file, std::stoll(key), entry.at("content").get<std::string>(),
            entry.value("special", true));
      }
    } else if (auto added = load(added_file)) {
      for (const auto& [content, id] : added->items()) {
        add(added_file, id.get<int64_t>(), content, true);
      }
    }
  } catch (const json::exception& e) {
    fail(dir, std::string("malformed added-token list: ") + e.what());
  } catch (const std::logic_error& e) {  // std::stoll on a key that is not a number
    fail(config_file, std::string("added_tokens_decoder key is not an id: ") + e.what());
  }
  for (const AddedToken& token : added_tokens_) {
    if (token.id >= static_cast<int32_t>(pieces_.size())) {
      pieces_.resize(token.id + 1, PieceInfo{PieceInfo::Kind::kAbsent, "", 0});
    }
    pieces_[token.id] =
        PieceInfo{token.special ? PieceInfo::Kind::kAddedSpecial : PieceInfo::Kind::kAddedText,
                  token.content, 0};
  }
  for (const AddedToken& token : added_tokens_) {
    added_pointers_.push_back(&token);
    added_patterns_.push_back(token.content);
  }
}

std::vector<int32_t> SpmTokenizer::encode(std::string_view text, bool add_bos) const {
  require_valid_utf8(text);
  std::vector<int32_t> ids;
  if (add_bos) ids.push_back(bos_id_);
  std::vector<int> piece_ids;
  for (const TextSegment& segment : split_on_added_tokens(text, added_pointers_, added_patterns_)) {
    if (segment.token_id >= 0) {
      ids.push_back(segment.token_id);
      continue;
    }
    const sentencepiece::util::Status status =
        processor_.Encode(std::string(segment.text), &piece_ids);
    if (!status.ok()) throw_error(ErrorKind::Tokenizer, "SentencePiece: " + status.ToString());
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  }
  return ids;
}

void SpmIncrementalDecoder::push(int32_t id, std::string& out) {
  const PieceInfo& info = tokenizer_.piece(id);
  if (info.kind == PieceInfo::Kind::kByte) {
    pending_bytes_.push_back(static_cast<char>(info.byte));
    at_start_ = false;
    return;
  }
  flush_bytes(out);
  switch (info.kind) {
    case PieceInfo::Kind::kControl:
    case PieceInfo::Kind::kAddedSpecial:
      // Invisible to SentencePiece, so they leave the leading-space rule alone.
      if (!skip_special_) out += info.text;
      break;
    case PieceInfo::Kind::kUnknown:
      out += tokenizer_.unk_surface();
      at_start_ = false;
      break;
    case PieceInfo::Kind::kAddedText:
      out += info.text;
      at_start_ = false;
      break;
    default: {
      std::string text = info.text;
      if (at_start_ && text.compare(0, kMetaspace.size(), kMetaspace) == 0) {
        text.erase(0, kMetaspace.size());
      }
      replace_all(text, kMetaspace, " ");
      out += text;
      at_start_ = false;
      break;
    }
  }
}

// SentencePiece decodes a byte run one character at a time: valid sequences pass, each byte
// that does not start one becomes U+FFFD.
void SpmIncrementalDecoder::flush_bytes(std::string& out) {
  std::string_view bytes = pending_bytes_;
  while (!bytes.empty()) {
    const size_t length = utf8_sequence_length(bytes);
    if (length == 0) {
      out += kReplacementChar;
      bytes.remove_prefix(1);
    } else {
      out.append(bytes.substr(0, length));
      bytes.remove_prefix(length);
    }
  }
  pending_bytes_.clear();
}

}  // namespace

std::unique_ptr<Tokenizer> load_spm_tokenizer(const std::filesystem::path& model_file) {
  return std::make_unique<SpmTokenizer>(model_file);
}

}  // namespace moxin::detail
