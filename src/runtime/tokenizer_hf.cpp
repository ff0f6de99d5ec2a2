// tokenizer.json: the HF `tokenizers` pipeline for the Llama/Mistral SentencePiece-BPE family.
//
// encode: split on added tokens (raw text first, then the normalized text for `normalized`
// ones) -> normalizer (Prepend "▁", Replace " " -> "▁") -> pre-tokenizer (none, or Metaspace)
// -> BPE by merge rank with byte fallback -> post-processor template (<s> $A).
// decode: the decoder chain (Replace "▁" -> " ", ByteFallback, Fuse, Strip, or Metaspace) run
// over the pieces exactly as HF runs it, and again stage by stage for streaming.
// Anything outside this family is refused at load time rather than tokenized differently.
#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "moxin/errors.h"
#include "runtime/tokenizer_internal.h"

namespace moxin::detail {
namespace {

using json = nlohmann::json;

struct NormalizerStep {
  enum class Kind { kPrepend, kReplace } kind;
  std::string text;     // what Prepend adds, or the pattern Replace looks for
  std::string content;  // what Replace puts instead
};

enum class PrependScheme { kAlways, kFirst, kNever };

struct MetaspacePreTokenizer {
  std::string replacement;
  PrependScheme prepend = PrependScheme::kAlways;
  bool split = true;
};

struct DecoderStep {
  enum class Kind { kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string pattern;  // Replace: pattern; Strip: the character; Metaspace: replacement
  std::string content;  // Replace: replacement text
  size_t strip_start = 0;
  bool metaspace_drops_first = false;  // Metaspace with a prepend scheme other than "never"
  bool after_fuse = false;             // the stage sees the single fused string
};

struct Merge {
  int32_t rank;
  int32_t new_id;
};

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

class HfTokenizer;

class HfIncrementalDecoder final : public IncrementalDecoder {
 public:
  HfIncrementalDecoder(const HfTokenizer& tokenizer, bool skip_special);
  void push(int32_t id, std::string& out) override;
  void finish(std::string& out) override;

 private:
  void run_stages(size_t first_stage, std::vector<std::string> tokens, std::string& out);
  void reset();

  const HfTokenizer& tokenizer_;
  bool skip_special_;
  // Per decoder stage: ByteFallback's unfinished run, Metaspace's count of tokens seen,
  // Strip's count of characters still to strip from the fused string.
  std::vector<std::string> pending_bytes_;
  std::vector<size_t> tokens_seen_;
  std::vector<size_t> strip_left_;
};

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(const std::filesystem::path& file, const json& doc);

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override;
  std::string id_to_piece(int32_t id) const override {
    check_id(id);
    return pieces_[id];
  }
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  std::optional<int32_t> pad_id() const override { return pad_id_; }
  bool is_special(int32_t id) const override {
    return id >= 0 && id < vocab_size() && special_[id];
  }

  void check_id(int32_t id) const {
    if (id < 0 || id >= vocab_size() || !present_[id]) {
      throw_error(ErrorKind::Request, "token id " + std::to_string(id) +
                                          " is outside the tokenizer's vocabulary (size " +
                                          std::to_string(vocab_size()) + ")");
    }
  }
  const std::vector<DecoderStep>& decoder() const { return decoder_; }

 protected:
  std::unique_ptr<IncrementalDecoder> make_incremental_decoder(bool skip) const override {
    return std::make_unique<HfIncrementalDecoder>(*this, skip);
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw_error(ErrorKind::Tokenizer, file_.string() + ": " + what);
  }
  void parse_model(const json& model);
  void parse_added_tokens(const json& added);
  void parse_normalizer(const json& normalizer);
  void parse_pre_tokenizer(const json& pre_tokenizer);
  void parse_post_processor(const json& post_processor);
  void parse_decoder(const json& decoder);
  int32_t require_token(const std::string& piece, const char* role) const;

  std::string normalize(std::string_view text) const;
  void encode_plain(std::string_view normalized, bool at_text_start,
                    std::vector<int32_t>& ids) const;
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;

  std::filesystem::path file_;
  // The BPE model.
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  int32_t byte_ids_[256];  // "<0xAB>" pieces, -1 where missing
  // Every id: its piece, whether it exists, whether decode may skip it.
  std::vector<std::string> pieces_;
  std::vector<bool> present_;
  std::vector<bool> special_;
  std::vector<AddedToken> added_tokens_;
  std::vector<const AddedToken*> raw_tokens_, normalized_tokens_;
  std::vector<std::string> raw_patterns_, normalized_patterns_;
  std::vector<NormalizerStep> normalizer_;
  std::optional<MetaspacePreTokenizer> metaspace_;
  std::vector<int32_t> template_prefix_, template_suffix_;
  std::vector<DecoderStep> decoder_;
  int32_t bos_id_ = -1, eos_id_ = -1;
  std::optional<int32_t> pad_id_;
};

HfTokenizer::HfTokenizer(const std::filesystem::path& file, const json& doc) : file_(file) {
  if (!doc.is_object()) fail("not a tokenizer.json document (top level is not an object)");
  if (!doc.contains("model")) fail("no \"model\" section");
  parse_model(doc["model"]);
  parse_added_tokens(doc.value("added_tokens", json::array()));
  parse_normalizer(doc.value("normalizer", json()));
  parse_pre_tokenizer(doc.value("pre_tokenizer", json()));
  parse_post_processor(doc.value("post_processor", json()));
  parse_decoder(doc.value("decoder", json()));
  if (doc.contains("truncation") && !doc["truncation"].is_null()) {
    fail("truncation settings are not supported");
  }
  // Tokens marked `normalized` are looked for in normalized text, so HF normalizes their
  // content the same way (Prepend included) before matching; the others match raw text.
  for (const AddedToken& token : added_tokens_) {
    if (token.normalized) {
      normalized_tokens_.push_back(&token);
      normalized_patterns_.push_back(normalize(token.content));
    } else {
      raw_tokens_.push_back(&token);
      raw_patterns_.push_back(token.content);
    }
  }

  // BOS is what the template puts first; without a template, Llama's conventional names.
  bos_id_ = !template_prefix_.empty() ? template_prefix_.front() : require_token("<s>", "BOS");
  eos_id_ = require_token("</s>", "EOS");
  std::string pad = configured_pad_token(file_.parent_path());
  for (const std::string& name : {pad, std::string("<PAD>"), std::string("<pad>")}) {
    if (name.empty()) continue;
    for (const AddedToken& token : added_tokens_) {
      if (token.content == name) pad_id_ = token.id;
    }
    if (pad_id_) break;
    if (auto it = vocab_.find(name); it != vocab_.end()) {
      pad_id_ = it->second;
      break;
    }
  }
}

int32_t HfTokenizer::require_token(const std::string& piece, const char* role) const {
  for (const AddedToken& token : added_tokens_) {
    if (token.content == piece) return token.id;
  }
  if (auto it = vocab_.find(piece); it != vocab_.end()) return it->second;
  fail(std::string("no ") + role + " token \"" + piece + "\" in the vocabulary");
}

void HfTokenizer::parse_model(const json& model) {
  const std::string type = model.value("type", "");
  if (type != "BPE") {
    fail("model type \"" + type + "\" is not supported (only the Llama/Mistral BPE family)");
  }
  for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(field) && !model[field].is_null() && model[field] != "") {
      fail(std::string("BPE ") + field + " is not supported (not a SentencePiece-style BPE)");
    }
  }
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      model["dropout"].get<double>() > 0) {
    fail("BPE dropout is not supported");
  }
  fuse_unk_ = model.value("fuse_unk", false);
  byte_fallback_ = model.value("byte_fallback", false);
  ignore_merges_ = model.value("ignore_merges", false);

  const json& vocab = model.at("vocab");
  if (!vocab.is_object() || vocab.empty()) fail("BPE vocab is missing or empty");
  int32_t max_id = -1;
  for (const auto& [piece, id_json] : vocab.items()) {
    const int64_t id = id_json.get<int64_t>();
    if (id < 0 || id > 10'000'000)
      fail("vocab id " + std::to_string(id) + " for \"" + piece + "\" is out of range");
    vocab_[piece] = static_cast<int32_t>(id);
    max_id = std::max(max_id, static_cast<int32_t>(id));
  }
  pieces_.assign(max_id + 1, std::string());
  present_.assign(max_id + 1, false);
  for (const auto& [piece, id] : vocab_) {
    if (present_[id]) fail("vocab id " + std::to_string(id) + " is used twice");
    pieces_[id] = piece;
    present_[id] = true;
  }
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  for (int byte = 0; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", byte);
    if (auto it = vocab_.find(name); it != vocab_.end()) byte_ids_[byte] = it->second;
  }

  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const std::string unk = model["unk_token"].get<std::string>();
    auto it = vocab_.find(unk);
    if (it == vocab_.end()) fail("unk_token \"" + unk + "\" is not in the vocab");
    unk_id_ = it->second;
  }

  const json& merges = model.at("merges");
  if (!merges.is_array()) fail("BPE merges is not an array");
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& merge = merges[rank];
    std::string left, right;
    if (merge.is_string()) {  // tokenizers < 0.20: "left right"
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        fail("merge #" + std::to_string(rank) + " \"" + text + "\" is not two pieces");
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      fail("merge #" + std::to_string(rank) + " is neither \"a b\" nor [a, b]");
    }
    auto l = vocab_.find(left), r = vocab_.find(right), m = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end() || m == vocab_.end()) {
      fail("merge #" + std::to_string(rank) + " (\"" + left + "\", \"" + right +
           "\") uses a piece that is not in the vocab");
    }
    // A repeated pair keeps its last rank, as HF's map construction does.
    merges_[pair_key(l->second, r->second)] = Merge{static_cast<int32_t>(rank), m->second};
  }
}

void HfTokenizer::parse_added_tokens(const json& added) {
  if (!added.is_array()) fail("added_tokens is not an array");
  for (const json& entry : added) {
    AddedToken token;
    const int64_t id = entry.at("id").get<int64_t>();
    if (id < 0 || id > 10'000'000)
      fail("added token id " + std::to_string(id) + " is out of range");
    token.id = static_cast<int32_t>(id);
    token.content = entry.at("content").get<std::string>();
    if (token.content.empty()) fail("added token " + std::to_string(id) + " has empty content");
    if (!is_valid_utf8(token.content)) fail("added token " + std::to_string(id) + " is not UTF-8");
    token.special = entry.value("special", false);
    token.normalized = entry.value("normalized", !token.special);
    token.lstrip = entry.value("lstrip", false);
    token.rstrip = entry.value("rstrip", false);
    token.single_word = entry.value("single_word", false);
    added_tokens_.push_back(std::move(token));
  }
  int32_t size = static_cast<int32_t>(pieces_.size());
  for (const AddedToken& token : added_tokens_) size = std::max(size, token.id + 1);
  pieces_.resize(size);
  present_.resize(size, false);
  special_.assign(size, false);
  for (const AddedToken& token : added_tokens_) {
    if (present_[token.id] && pieces_[token.id] != token.content) {
      fail("added token " + std::to_string(token.id) + " \"" + token.content +
           "\" clashes with vocab piece \"" + pieces_[token.id] + "\"");
    }
    pieces_[token.id] = token.content;
    present_[token.id] = true;
    special_[token.id] = token.special;
  }
}

void HfTokenizer::parse_normalizer(const json& normalizer) {
  if (normalizer.is_null()) return;
  const std::string type = normalizer.value("type", "");
  if (type == "Sequence") {
    for (const json& step : normalizer.at("normalizers")) parse_normalizer(step);
  } else if (type == "Prepend") {
    normalizer_.push_back(
        {NormalizerStep::Kind::kPrepend, normalizer.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    const json& pattern = normalizer.at("pattern");
    if (!pattern.contains("String"))
      fail("Replace normalizer with a regex pattern is not supported");
    normalizer_.push_back({NormalizerStep::Kind::kReplace, pattern["String"].get<std::string>(),
                           normalizer.at("content").get<std::string>()});
  } else {
    fail("normalizer \"" + type + "\" is not supported (expected Prepend/Replace, as Llama uses)");
  }
}

void HfTokenizer::parse_pre_tokenizer(const json& pre_tokenizer) {
  if (pre_tokenizer.is_null()) return;
  const std::string type = pre_tokenizer.value("type", "");
  if (type == "Sequence" && pre_tokenizer.at("pretokenizers").size() == 1) {
    parse_pre_tokenizer(pre_tokenizer["pretokenizers"][0]);
    return;
  }
  if (type != "Metaspace") {
    fail("pre_tokenizer \"" + type + "\" is not supported (expected none or Metaspace)");
  }
  MetaspacePreTokenizer metaspace;
  metaspace.replacement = pre_tokenizer.value("replacement", std::string(kMetaspace));
  if (utf8_sequence_length(metaspace.replacement) != metaspace.replacement.size()) {
    fail("Metaspace replacement must be one character");
  }
  if (pre_tokenizer.contains("prepend_scheme")) {
    const std::string scheme = pre_tokenizer["prepend_scheme"].get<std::string>();
    if (scheme == "always")
      metaspace.prepend = PrependScheme::kAlways;
    else if (scheme == "first")
      metaspace.prepend = PrependScheme::kFirst;
    else if (scheme == "never")
      metaspace.prepend = PrependScheme::kNever;
    else
      fail("Metaspace prepend_scheme \"" + scheme + "\" is unknown");
  } else {  // tokenizers < 0.19 wrote add_prefix_space
    metaspace.prepend = pre_tokenizer.value("add_prefix_space", true) ? PrependScheme::kAlways
                                                                      : PrependScheme::kNever;
  }
  metaspace.split = pre_tokenizer.value("split", true);
  metaspace_ = std::move(metaspace);
}

void HfTokenizer::parse_post_processor(const json& post_processor) {
  if (post_processor.is_null()) return;
  const std::string type = post_processor.value("type", "");
  if (type != "TemplateProcessing") {
    fail("post_processor \"" + type + "\" is not supported (expected TemplateProcessing)");
  }
  const json& special_tokens = post_processor.value("special_tokens", json::object());
  bool seen_sequence = false;
  for (const json& item : post_processor.at("single")) {
    if (item.contains("Sequence")) {
      if (seen_sequence) fail("post_processor template names the sequence twice");
      seen_sequence = true;
    } else if (item.contains("SpecialToken")) {
      const std::string name = item["SpecialToken"].at("id").get<std::string>();
      if (!special_tokens.contains(name)) fail("template token \"" + name + "\" is not defined");
      for (const json& id : special_tokens[name].at("ids")) {
        const int32_t value = id.get<int32_t>();
        if (value < 0 || value >= static_cast<int32_t>(pieces_.size()) || !present_[value]) {
          fail("template token id " + std::to_string(value) + " is not in the vocabulary");
        }
        (seen_sequence ? template_suffix_ : template_prefix_).push_back(value);
      }
    } else {
      fail("post_processor template item is neither Sequence nor SpecialToken");
    }
  }
  if (!seen_sequence) fail("post_processor template has no sequence");
}

void HfTokenizer::parse_decoder(const json& decoder) {
  if (decoder.is_null()) fail("no decoder (a Llama tokenizer.json has one)");
  const std::string type = decoder.value("type", "");
  const bool after_fuse =
      std::any_of(decoder_.begin(), decoder_.end(),
                  [](const DecoderStep& step) { return step.kind == DecoderStep::Kind::kFuse; });
  DecoderStep step{DecoderStep::Kind::kFuse, "", "", 0, false, after_fuse};
  if (type == "Sequence") {
    for (const json& inner : decoder.at("decoders")) {
      if (inner.value("type", "") == "Sequence") fail("nested decoder sequences are not supported");
      parse_decoder(inner);
    }
    return;
  } else if (type == "Replace") {
    const json& pattern = decoder.at("pattern");
    if (!pattern.contains("String")) fail("Replace decoder with a regex pattern is not supported");
    step.kind = DecoderStep::Kind::kReplace;
    step.pattern = pattern["String"].get<std::string>();
    step.content = decoder.at("content").get<std::string>();
    // Streaming feeds the fused string in pieces; a longer pattern could straddle two.
    if (after_fuse && utf8_sequence_length(step.pattern) != step.pattern.size()) {
      fail("a multi-character Replace after Fuse is not supported");
    }
  } else if (type == "ByteFallback") {
    if (after_fuse) fail("ByteFallback after Fuse is not supported");
    step.kind = DecoderStep::Kind::kByteFallback;
  } else if (type == "Fuse") {
    if (after_fuse) fail("two Fuse decoders");
    step.kind = DecoderStep::Kind::kFuse;
  } else if (type == "Strip") {
    step.kind = DecoderStep::Kind::kStrip;
    step.pattern = decoder.at("content").get<std::string>();
    if (utf8_sequence_length(step.pattern) != step.pattern.size()) {
      fail("Strip decoder content must be one character");
    }
    step.strip_start = decoder.value("start", size_t{0});
    if (decoder.value("stop", size_t{0}) != 0) fail("Strip decoder with stop > 0 is not supported");
  } else if (type == "Metaspace") {
    step.kind = DecoderStep::Kind::kMetaspace;
    step.pattern = decoder.value("replacement", std::string(kMetaspace));
    if (utf8_sequence_length(step.pattern) != step.pattern.size()) {
      fail("Metaspace replacement must be one character");
    }
    if (decoder.contains("prepend_scheme")) {
      step.metaspace_drops_first = decoder["prepend_scheme"].get<std::string>() != "never";
    } else {
      step.metaspace_drops_first = decoder.value("add_prefix_space", true);
    }
  } else {
    fail("decoder \"" + type +
         "\" is not supported (expected Replace, ByteFallback, Fuse, Strip or Metaspace)");
  }
  decoder_.push_back(std::move(step));
}

std::string HfTokenizer::normalize(std::string_view text) const {
  std::string result(text);
  for (const NormalizerStep& step : normalizer_) {
    if (step.kind == NormalizerStep::Kind::kPrepend) {
      if (!result.empty()) result.insert(0, step.text);
    } else {
      replace_all(result, step.text, step.content);
    }
  }
  return result;
}

std::vector<int32_t> HfTokenizer::encode(std::string_view text, bool add_bos) const {
  require_valid_utf8(text);
  std::vector<int32_t> ids;
  if (add_bos) ids = template_prefix_;
  for (const TextSegment& segment : split_on_added_tokens(text, raw_tokens_, raw_patterns_)) {
    if (segment.token_id >= 0) {
      ids.push_back(segment.token_id);
      continue;
    }
    const std::string normalized = normalize(segment.text);
    const std::vector<TextSegment> pieces =
        split_on_added_tokens(normalized, normalized_tokens_, normalized_patterns_);
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (pieces[i].token_id >= 0) {
        ids.push_back(pieces[i].token_id);
      } else {
        // Metaspace's "first" scheme asks whether this piece begins the original text.
        encode_plain(pieces[i].text, segment.offset == 0 && pieces[i].offset == 0, ids);
      }
    }
  }
  if (add_bos) ids.insert(ids.end(), template_suffix_.begin(), template_suffix_.end());
  return ids;
}

void HfTokenizer::encode_plain(std::string_view normalized, bool at_text_start,
                               std::vector<int32_t>& ids) const {
  if (!metaspace_) {
    encode_word(normalized, ids);
    return;
  }
  const MetaspacePreTokenizer& metaspace = *metaspace_;
  std::string text(normalized);
  replace_all(text, " ", metaspace.replacement);
  const bool prepend = metaspace.prepend == PrependScheme::kAlways ||
                       (metaspace.prepend == PrependScheme::kFirst && at_text_start);
  if (prepend && text.compare(0, metaspace.replacement.size(), metaspace.replacement) != 0) {
    text.insert(0, metaspace.replacement);
  }
  if (!metaspace.split) {
    encode_word(text, ids);
    return;
  }
  // Split before every replacement character (HF's MergedWithNext).
  size_t start = 0;
  for (size_t found = text.find(metaspace.replacement, 1); found != std::string::npos;
       found = text.find(metaspace.replacement, found + metaspace.replacement.size())) {
    if (found > start) encode_word(std::string_view(text).substr(start, found - start), ids);
    start = found;
  }
  if (start < text.size()) encode_word(std::string_view(text).substr(start), ids);
}

void HfTokenizer::encode_word(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(std::string(word)); it != vocab_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&](int32_t id) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, true});
    if (index > 0) symbols[index - 1].next = index;
  };
  int32_t pending_unk = -1;  // HF fuses consecutive unknown characters into one <unk>
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t length = std::max<size_t>(1, utf8_sequence_length(word.substr(pos)));
    const std::string character(word.substr(pos, length));
    pos += length;
    if (auto it = vocab_.find(character); it != vocab_.end()) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback_ && std::all_of(character.begin(), character.end(), [&](char byte) {
          return byte_ids_[static_cast<unsigned char>(byte)] >= 0;
        })) {
      for (char byte : character) add(byte_ids_[static_cast<unsigned char>(byte)]);
      continue;
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
      pending_unk = *unk_id_;
    }
    // Without an unk token HF drops the character; so do we.
  }
  if (pending_unk >= 0) add(pending_unk);

  // Merge the lowest-ranked adjacent pair first, leftmost on ties; entries that went stale
  // because a neighbour merged are skipped when popped.
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto consider = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    auto it = merges_.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(pair_key(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (const Symbol& symbol : symbols) {
    if (symbol.alive) ids.push_back(symbol.id);
  }
}

// --- decoding ----------------------------------------------------------------------------

// HF's ByteFallback: a run of byte pieces becomes its UTF-8 text, or one U+FFFD per byte when
// the run as a whole is not valid UTF-8.
void flush_byte_run(std::string& run, std::vector<std::string>& out) {
  if (run.empty()) return;
  if (is_valid_utf8(run)) {
    out.push_back(run);
  } else {
    for (size_t i = 0; i < run.size(); ++i) out.emplace_back(kReplacementChar);
  }
  run.clear();
}

// Removes up to `count` leading copies of `character`; returns how many went.
size_t strip_leading(std::string& text, const std::string& character, size_t count) {
  size_t removed = 0, pos = 0;
  while (removed < count && text.compare(pos, character.size(), character) == 0) {
    pos += character.size();
    ++removed;
  }
  text.erase(0, pos);
  return removed;
}

void metaspace_decode(std::string& token, const DecoderStep& step, bool first) {
  replace_all(token, step.pattern, first && step.metaspace_drops_first ? "" : " ");
}

std::string HfTokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    check_id(id);
    if (skip_special_tokens && special_[id]) continue;
    tokens.push_back(pieces_[id]);
  }
  for (const DecoderStep& step : decoder_) {
    switch (step.kind) {
      case DecoderStep::Kind::kReplace:
        for (std::string& token : tokens) replace_all(token, step.pattern, step.content);
        break;
      case DecoderStep::Kind::kByteFallback: {
        std::vector<std::string> out;
        std::string run;
        for (std::string& token : tokens) {
          if (auto byte = parse_byte_piece(token)) {
            run.push_back(static_cast<char>(*byte));
          } else {
            flush_byte_run(run, out);
            out.push_back(std::move(token));
          }
        }
        flush_byte_run(run, out);
        tokens = std::move(out);
        break;
      }
      case DecoderStep::Kind::kFuse: {
        std::string fused;
        for (const std::string& token : tokens) fused += token;
        tokens.assign(1, std::move(fused));
        break;
      }
      case DecoderStep::Kind::kStrip:
        for (std::string& token : tokens) strip_leading(token, step.pattern, step.strip_start);
        break;
      case DecoderStep::Kind::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) metaspace_decode(tokens[i], step, i == 0);
        break;
    }
  }
  std::string text;
  for (const std::string& token : tokens) text += token;
  return text;
}

HfIncrementalDecoder::HfIncrementalDecoder(const HfTokenizer& tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {
  reset();
}

void HfIncrementalDecoder::reset() {
  const size_t stages = tokenizer_.decoder().size();
  pending_bytes_.assign(stages, std::string());
  tokens_seen_.assign(stages, 0);
  strip_left_.assign(stages, 0);
  for (size_t i = 0; i < stages; ++i) strip_left_[i] = tokenizer_.decoder()[i].strip_start;
}

void HfIncrementalDecoder::push(int32_t id, std::string& out) {
  tokenizer_.check_id(id);
  if (skip_special_ && tokenizer_.is_special(id)) return;
  run_stages(0, {tokenizer_.id_to_piece(id)}, out);
}

// Pushes `tokens` through stages first_stage.. and appends what comes out. Stages after Fuse
// see successive chunks of the one fused string, so their per-token rules apply to the stream
// as a whole: Strip strips only its start, Metaspace treats everything as the first token.
void HfIncrementalDecoder::run_stages(size_t first_stage, std::vector<std::string> tokens,
                                      std::string& out) {
  const std::vector<DecoderStep>& steps = tokenizer_.decoder();
  for (size_t stage = first_stage; stage < steps.size() && !tokens.empty(); ++stage) {
    const DecoderStep& step = steps[stage];
    switch (step.kind) {
      case DecoderStep::Kind::kReplace:
        for (std::string& token : tokens) replace_all(token, step.pattern, step.content);
        break;
      case DecoderStep::Kind::kByteFallback: {
        std::vector<std::string> passed;
        for (std::string& token : tokens) {
          if (auto byte = parse_byte_piece(token)) {
            pending_bytes_[stage].push_back(static_cast<char>(*byte));
          } else {
            flush_byte_run(pending_bytes_[stage], passed);
            passed.push_back(std::move(token));
          }
        }
        tokens = std::move(passed);
        break;
      }
      case DecoderStep::Kind::kFuse: {
        std::string fused;
        for (const std::string& token : tokens) fused += token;
        tokens.assign(1, std::move(fused));
        break;
      }
      case DecoderStep::Kind::kStrip:
        for (std::string& token : tokens) {
          if (!step.after_fuse) {
            strip_leading(token, step.pattern, step.strip_start);
          } else if (strip_left_[stage] > 0 && !token.empty()) {
            const size_t removed = strip_leading(token, step.pattern, strip_left_[stage]);
            // Stripping ends at the first other character, even if the count is not used up.
            strip_left_[stage] = token.empty() ? strip_left_[stage] - removed : 0;
          }
        }
        break;
      case DecoderStep::Kind::kMetaspace:
        for (std::string& token : tokens) {
          metaspace_decode(token, step, step.after_fuse || tokens_seen_[stage] == 0);
          ++tokens_seen_[stage];
        }
        break;
    }
  }
  for (const std::string& token : tokens) out += token;
}

void HfIncrementalDecoder::finish(std::string& out) {
  const std::vector<DecoderStep>& steps = tokenizer_.decoder();
  for (size_t stage = 0; stage < steps.size(); ++stage) {
    if (pending_bytes_[stage].empty()) continue;
    std::vector<std::string> flushed;
    flush_byte_run(pending_bytes_[stage], flushed);
    run_stages(stage + 1, std::move(flushed), out);
  }
  reset();
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& json_file) {
  const std::string text = read_file_or_throw(json_file);
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    throw_error(ErrorKind::Tokenizer, json_file.string() + ": not valid JSON: " + e.what());
  }
  try {
    return std::make_unique<HfTokenizer>(json_file, doc);
  } catch (const json::exception& e) {
    // A field of the wrong type or a missing required field.
    throw_error(ErrorKind::Tokenizer,
                json_file.string() + ": malformed tokenizer.json: " + e.what());
  }
}

}  // namespace moxin::detail
