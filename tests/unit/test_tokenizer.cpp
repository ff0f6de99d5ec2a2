// The tokenizer against its references: HF `tokenizers` for tokenizer.json (and patched forms
// of it), the `sentencepiece` package for tokenizer.model, on the corpus in
// tests/fixtures/tokenizer/cases.json (reference/make_tokenizer_fixtures.py). The vocabulary is
// the real Mistral-7B one with <PAD> = 32000.
#include "moxin/tokenizer.h"

#include <gtest/gtest.h>
#include <sentencepiece_processor.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "moxin/errors.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;

fs::path model_dir() {
  return test::fixtures_dir() / "tokenizer" / "mistral";
}

const json& fixture() {
  static const json doc = [] {
    std::ifstream stream(test::fixtures_dir() / "tokenizer" / "cases.json");
    EXPECT_TRUE(stream) << "missing tests/fixtures/tokenizer/cases.json";
    return json::parse(stream);
  }();
  return doc;
}

std::string read_file(const fs::path& file) {
  std::ifstream stream(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(stream), {});
}

void write_file(const fs::path& file, std::string_view contents) {
  std::ofstream stream(file, std::ios::binary);
  stream.write(contents.data(), static_cast<std::streamsize>(contents.size()));
}

// A scratch directory per test process, removed at exit.
fs::path scratch(const std::string& name) {
  static const fs::path root = [] {
    fs::path dir = fs::temp_directory_path() / ("moxin_tokenizer_test_" + std::to_string(getpid()));
    fs::create_directories(dir);
    std::atexit([] {
      std::error_code error;
      fs::remove_all(
          fs::temp_directory_path() / ("moxin_tokenizer_test_" + std::to_string(getpid())), error);
    });
    return dir;
  }();
  fs::path dir = root / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// The same edits make_tokenizer_fixtures.py's apply_variant makes.
json apply_variant(json doc, const json& patch) {
  for (const auto& [key, value] : patch.items()) {
    if (key == "merges_as_strings") {
      for (json& merge : doc["model"]["merges"]) {
        if (merge.is_array())
          merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
      }
    } else if (key == "ignore_merges") {
      doc["model"]["ignore_merges"] = value;
    } else if (key == "pad_lstrip" || key == "pad_rstrip") {
      for (json& token : doc["added_tokens"]) {
        if (token["content"] == "<PAD>") token[key.substr(4)] = value;
      }
    } else {
      doc[key] = value;
    }
  }
  return doc;
}

const json& base_tokenizer_json() {
  static const json doc = json::parse(read_file(model_dir() / "tokenizer.json"));
  return doc;
}

// Loaded once: parsing the 1.3 MB tokenizer.json is the slow part of these tests.
const Tokenizer& hf_tokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(model_dir());
  return *tokenizer;
}

// tokenizer.model alone: what the `sentencepiece` package sees.
const Tokenizer& spm_tokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    const fs::path dir = scratch("spm_only");
    fs::copy_file(model_dir() / "tokenizer.model", dir / "tokenizer.model");
    return load_tokenizer(dir);
  }();
  return *tokenizer;
}

// tokenizer.model with transformers' added_tokens.json / tokenizer_config.json beside it.
const Tokenizer& spm_tokenizer_with_pad() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    const fs::path dir = scratch("spm_with_pad");
    for (const char* name : {"tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                             "special_tokens_map.json"}) {
      fs::copy_file(model_dir() / name, dir / name);
    }
    return load_tokenizer(dir);
  }();
  return *tokenizer;
}

const Tokenizer& variant_tokenizer(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto it = cache.find(name);
  if (it == cache.end()) {
    const fs::path dir = scratch("variant_" + name);
    write_file(dir / "tokenizer.json",
               apply_variant(base_tokenizer_json(), fixture()["variants"][name]).dump());
    it = cache.emplace(name, load_tokenizer(dir)).first;
  }
  return *it->second;
}

std::string printable(const std::string& text) {
  return json(text).dump();
}

Ids ids_of(const json& array) {
  return array.get<Ids>();
}

// --- exact parity with the references ----------------------------------------------------------

TEST(TokenizerJson, EncodeMatchesHfTokenizers) {
  const Tokenizer& tokenizer = hf_tokenizer();
  ASSERT_GE(fixture()["cases"].size(), 40u);
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(tokenizer.encode(text), ids_of(c["hf_ids"])) << printable(text);
    EXPECT_EQ(tokenizer.encode(text, /*add_bos=*/false), ids_of(c["hf_ids_no_bos"]))
        << printable(text);
  }
}

TEST(TokenizerJson, DecodeMatchesHfTokenizers) {
  const Tokenizer& tokenizer = hf_tokenizer();
  for (const json& c : fixture()["cases"]) {
    const Ids ids = ids_of(c["hf_ids"]);
    EXPECT_EQ(tokenizer.decode(ids), c["hf_decoded"].get<std::string>()) << printable(c["text"]);
    EXPECT_EQ(tokenizer.decode(ids, false), c["hf_decoded_with_special"].get<std::string>())
        << printable(c["text"]);
  }
  for (const json& c : fixture()["decode_only"]) {
    const Ids ids = ids_of(c["ids"]);
    EXPECT_EQ(tokenizer.decode(ids), c["hf_decoded"].get<std::string>()) << c["ids"].dump();
    EXPECT_EQ(tokenizer.decode(ids, false), c["hf_decoded_with_special"].get<std::string>())
        << c["ids"].dump();
  }
}

// Metaspace pre-tokenizers (prepend_scheme first/always/never, split), a Metaspace decoder, a
// decoder without Strip, "a b" merges, ignore_merges, lstrip/rstrip added tokens, an EOS template.
TEST(TokenizerJson, VariantsMatchHfTokenizers) {
  ASSERT_GE(fixture()["variants"].size(), 9u);
  for (const auto& [name, patch] : fixture()["variants"].items()) {
    SCOPED_TRACE("variant " + name);
    const Tokenizer& tokenizer = variant_tokenizer(name);
    for (const json& c : fixture()["cases"]) {
      const json& expected = c["variants"][name];
      const Ids ids = ids_of(expected["ids"]);
      EXPECT_EQ(tokenizer.encode(c["text"].get<std::string>()), ids) << printable(c["text"]);
      EXPECT_EQ(tokenizer.decode(ids), expected["decoded"].get<std::string>())
          << printable(c["text"]);
      EXPECT_EQ(tokenizer.decode(ids, false), expected["decoded_with_special"].get<std::string>())
          << printable(c["text"]);
    }
    for (const json& c : fixture()["decode_only"]) {
      const json& expected = c["variants"][name];
      const Ids ids = ids_of(c["ids"]);
      EXPECT_EQ(tokenizer.decode(ids), expected["decoded"].get<std::string>()) << c["ids"].dump();
      EXPECT_EQ(tokenizer.decode(ids, false), expected["decoded_with_special"].get<std::string>())
          << c["ids"].dump();
    }
  }
}

TEST(TokenizerModel, EncodeMatchesSentencePiecePackage) {
  const Tokenizer& tokenizer = spm_tokenizer();
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    Ids expected = ids_of(c["sp_ids"]);
    EXPECT_EQ(tokenizer.encode(text, false), expected) << printable(text);
    expected.insert(expected.begin(), 1);
    EXPECT_EQ(tokenizer.encode(text), expected) << printable(text);
  }
}

TEST(TokenizerModel, DecodeMatchesSentencePiecePackage) {
  const Tokenizer& plain = spm_tokenizer();
  const Tokenizer& with_pad = spm_tokenizer_with_pad();
  for (const json& c : fixture()["cases"]) {
    const Ids ids = ids_of(c["sp_ids"]);
    EXPECT_EQ(plain.decode(ids), c["sp_decoded"].get<std::string>()) << printable(c["text"]);
  }
  for (const json& c : fixture()["decode_only"]) {
    Ids ids = ids_of(c["ids"]);
    // With the added tokens known, <PAD> is special and skipped; without, it is no id at all.
    EXPECT_EQ(with_pad.decode(ids), c["sp_decoded"].get<std::string>()) << c["ids"].dump();
    std::erase_if(ids, [](int32_t id) { return id >= 32000; });
    EXPECT_EQ(plain.decode(ids), c["sp_decoded"].get<std::string>()) << c["ids"].dump();
  }
}

// Random id sequences, rich in byte pieces and control ids, against the C++ library itself.
TEST(TokenizerModel, DecodeMatchesSentencePieceLibraryOnRandomIds) {
  sentencepiece::SentencePieceProcessor processor;
  ASSERT_TRUE(processor.Load((model_dir() / "tokenizer.model").string()).ok());
  const Tokenizer& tokenizer = spm_tokenizer();
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> kind(0, 9), byte(3, 258), any(0, 31999), length(1, 24);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<int> ids(length(rng));
    for (int& id : ids) {
      const int k = kind(rng);
      id = k < 4 ? byte(rng) : k == 4 ? trial % 3 : k == 5 ? 28705 : any(rng);
    }
    const std::string expected = processor.DecodeIds(ids);
    ASSERT_EQ(tokenizer.decode(Ids(ids.begin(), ids.end())), expected) << json(ids).dump();
  }
}

// --- streaming -----------------------------------------------------------------------------------

bool valid_utf8(std::string_view text) {
  // Encoding it would throw on bad UTF-8; any tokenizer will do.
  try {
    hf_tokenizer().encode(text, false);
    return true;
  } catch (const Error&) {
    return false;
  }
}

void expect_stream_equals_decode(const Tokenizer& tokenizer, const Ids& ids, bool skip_special) {
  StreamingDetokenizer stream(tokenizer, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string chunk = stream.feed(id);
    EXPECT_TRUE(valid_utf8(chunk)) << "chunk " << printable(chunk);
    streamed += chunk;
  }
  streamed += stream.finish();
  EXPECT_EQ(streamed, tokenizer.decode(ids, skip_special))
      << json(ids).dump() << " skip_special=" << skip_special;
}

std::vector<Ids> stream_inputs(bool sentencepiece_ids) {
  std::vector<Ids> inputs;
  for (const json& c : fixture()["cases"]) {
    inputs.push_back(ids_of(c[sentencepiece_ids ? "sp_ids" : "hf_ids"]));
  }
  for (const json& c : fixture()["decode_only"]) inputs.push_back(ids_of(c["ids"]));
  std::mt19937 rng(99);
  std::uniform_int_distribution<int> kind(0, 9), byte(3, 258), any(0, 32000), length(1, 16);
  for (int trial = 0; trial < 1000; ++trial) {
    Ids ids(length(rng));
    for (int32_t& id : ids) {
      const int k = kind(rng);
      // Byte pieces, control ids and <PAD>, lone and double metaspaces, anything.
      id = k < 4    ? byte(rng)
           : k == 4 ? (trial % 4 == 3 ? 32000 : trial % 4)
           : k == 5 ? 28705
           : k == 6 ? 259
                    : any(rng);
    }
    inputs.push_back(std::move(ids));
  }
  return inputs;
}

TEST(StreamingDetokenizer, ConcatenationEqualsDecodeForTokenizerJson) {
  for (const Ids& ids : stream_inputs(false)) {
    expect_stream_equals_decode(hf_tokenizer(), ids, true);
    expect_stream_equals_decode(hf_tokenizer(), ids, false);
  }
}

TEST(StreamingDetokenizer, ConcatenationEqualsDecodeForVariants) {
  const std::vector<Ids> inputs = stream_inputs(false);
  // The variants whose decoders differ from the committed one.
  for (const char* name : {"metaspace_decoder", "no_strip_decoder"}) {
    SCOPED_TRACE(name);
    for (const Ids& ids : inputs) {
      expect_stream_equals_decode(variant_tokenizer(name), ids, true);
      expect_stream_equals_decode(variant_tokenizer(name), ids, false);
    }
  }
}

TEST(StreamingDetokenizer, ConcatenationEqualsDecodeForTokenizerModel) {
  for (Ids ids : stream_inputs(true)) {
    expect_stream_equals_decode(spm_tokenizer_with_pad(), ids, true);
    expect_stream_equals_decode(spm_tokenizer_with_pad(), ids, false);
  }
}

TEST(StreamingDetokenizer, HoldsSplitCharactersAndKeepsSpaces) {
  const Tokenizer& tokenizer = hf_tokenizer();
  StreamingDetokenizer stream(tokenizer);
  EXPECT_EQ(stream.feed(1), "");           // <s>, skipped
  EXPECT_EQ(stream.feed(22557), "Hello");  // "▁Hello": the first leading space goes
  EXPECT_EQ(stream.feed(1526), " world");
  // "😀" arrives as four byte pieces: nothing until the run ends.
  for (int byte : {0xF0, 0x9F, 0x98, 0x80}) EXPECT_EQ(stream.feed(3 + byte), "");
  EXPECT_EQ(stream.feed(28705), "😀 ");
  EXPECT_EQ(stream.feed(3 + 0xE4), "");
  EXPECT_EQ(stream.finish(), "\xEF\xBF\xBD");  // an unfinished character, as decode renders it
  // After finish() the next id starts a new text.
  EXPECT_EQ(stream.feed(22557), "Hello");
}

TEST(StreamingDetokenizer, BadIdLeavesStateAlone) {
  for (const Tokenizer* tokenizer : {&hf_tokenizer(), &spm_tokenizer()}) {
    StreamingDetokenizer stream(*tokenizer);
    EXPECT_EQ(stream.feed(3 + 0xE4), "");
    try {
      stream.feed(tokenizer->vocab_size());
      ADD_FAILURE() << "no error for an out-of-range id";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Request);
    }
    EXPECT_EQ(stream.feed(3 + 0xBD), "");
    EXPECT_EQ(stream.feed(3 + 0xA0), "");
    EXPECT_EQ(stream.feed(1526), "你 world");
  }
}

// --- metadata ------------------------------------------------------------------------------------

TEST(Tokenizer, Metadata) {
  const Tokenizer& hf = hf_tokenizer();
  EXPECT_EQ(hf.vocab_size(), 32001);
  EXPECT_EQ(hf.bos_id(), 1);
  EXPECT_EQ(hf.eos_id(), 2);
  EXPECT_EQ(hf.pad_id(), std::optional<int32_t>(32000));
  EXPECT_EQ(hf.id_to_piece(0), "<unk>");
  EXPECT_EQ(hf.id_to_piece(13), "<0x0A>");
  EXPECT_EQ(hf.id_to_piece(28705), "▁");
  EXPECT_EQ(hf.id_to_piece(22557), "▁Hello");
  EXPECT_EQ(hf.id_to_piece(32000), "<PAD>");
  for (int32_t id : {0, 1, 2, 32000}) EXPECT_TRUE(hf.is_special(id)) << id;
  for (int32_t id : {3, 13, 28705, 31999, 32001, -1}) EXPECT_FALSE(hf.is_special(id)) << id;

  const Tokenizer& sp = spm_tokenizer();
  EXPECT_EQ(sp.vocab_size(), 32000);
  EXPECT_EQ(sp.bos_id(), 1);
  EXPECT_EQ(sp.eos_id(), 2);
  EXPECT_EQ(sp.pad_id(), std::nullopt);
  EXPECT_EQ(sp.id_to_piece(28705), "▁");
  EXPECT_TRUE(sp.is_special(1));
  EXPECT_FALSE(sp.is_special(0));  // <unk> renders as " ⁇ " in SentencePiece's decode

  const Tokenizer& padded = spm_tokenizer_with_pad();
  EXPECT_EQ(padded.vocab_size(), 32001);
  EXPECT_EQ(padded.pad_id(), std::optional<int32_t>(32000));
  EXPECT_TRUE(padded.is_special(32000));
  EXPECT_EQ(padded.id_to_piece(32000), "<PAD>");
  // The slow tokenizer's behaviour: <PAD> in text is the token, the rest goes to SentencePiece.
  EXPECT_EQ(padded.encode("Hello<PAD>world", false), (Ids{22557, 32000, 1526}));
}

TEST(Tokenizer, JsonTakesPrecedenceOverModel) {
  // The committed directory has both; "<PAD>" as text is one token only to the HF pipeline.
  EXPECT_EQ(hf_tokenizer().encode("<PAD>"), (Ids{1, 32000}));
  EXPECT_EQ(spm_tokenizer().encode("<PAD>"), (Ids{1, 523, 28753, 1841, 28767}));
}

TEST(Tokenizer, PromptFormat) {
  const Ids expected{1, 560, 28747, 1824, 349, 297, 272, 3469, 28804, 13, 2919, 28747};
  EXPECT_EQ(hf_tokenizer().encode("In: What is in the image?\nOut:"), expected);
  EXPECT_EQ(spm_tokenizer().encode("In: What is in the image?\nOut:"), expected);
}

TEST(Tokenizer, LongTextRoundTrips) {
  // The corpus, repeated, in one piece (~60 KB); minus the texts that spell special tokens, and
  // the literal "▁" that decodes to a space, so the round trip is exact.
  std::string text;
  for (const json& c : fixture()["cases"]) {
    const std::string piece = c["text"];
    if (piece.find('<') == std::string::npos && piece.find("▁") == std::string::npos) {
      text += piece + "\n";
    }
  }
  for (int i = 0; i < 5; ++i) text += text;
  const Ids hf_ids = hf_tokenizer().encode(text, false);
  EXPECT_GT(hf_ids.size(), 10000u);
  // The legacy HF pipeline and SentencePiece agree wherever no added token is involved.
  EXPECT_EQ(hf_ids, spm_tokenizer().encode(text, false));
  EXPECT_EQ(hf_tokenizer().decode(hf_ids), text);
  EXPECT_EQ(spm_tokenizer().decode(hf_ids), text);
}

// --- bad input ---------------------------------------------------------------------------------

void expect_error(const std::function<void()>& action, ErrorKind kind, const std::string& needle) {
  try {
    action();
    ADD_FAILURE() << "no error; expected one mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(TokenizerErrors, MissingFiles) {
  expect_error([] { load_tokenizer(scratch("empty") / "nope"); }, ErrorKind::Tokenizer, "nope");
  const fs::path empty = scratch("empty");
  expect_error([&] { load_tokenizer(empty); }, ErrorKind::Tokenizer, "tokenizer.model");
  expect_error([&] { load_tokenizer(empty); }, ErrorKind::Tokenizer, "tokenizer.json");
}

TEST(TokenizerErrors, CorruptTokenizerJson) {
  const std::string good = read_file(model_dir() / "tokenizer.json");
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "not valid JSON"},
      {"this is not json", "not valid JSON"},
      {good.substr(0, good.size() / 2), "not valid JSON"},
      {"[1, 2, 3]", "not an object"},
      {"{}", "model"},
      {R"({"model": {"type": "Unigram", "vocab": []}})", "Unigram"},
      {R"({"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}})", "malformed"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, "decoder": {"type": "Fuse"}})",
       "merge #0"},
  };
  for (const auto& [contents, needle] : bad) {
    const fs::path dir = scratch("bad_json");
    write_file(dir / "tokenizer.json", contents);
    fs::copy_file(model_dir() / "tokenizer.model", dir / "tokenizer.model");  // not a fallback
    expect_error([&] { load_tokenizer(dir); }, ErrorKind::Tokenizer, needle);
    expect_error([&] { load_tokenizer(dir); }, ErrorKind::Tokenizer, "tokenizer.json");
  }
}

// A minimal Llama-shaped tokenizer.json: small enough that each refusal below is cheap to test.
json minimal_tokenizer_json() {
  json doc = base_tokenizer_json();
  doc["model"]["vocab"] = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"a", 3}, {"b", 4}, {"ab", 5}};
  doc["model"]["merges"] = json::array({json::array({"a", "b"})});
  doc["added_tokens"] = json::array();
  return doc;
}

TEST(TokenizerErrors, UnsupportedTokenizerJsonForms) {
  {  // The unpatched minimal document loads, so each failure below is the patch's doing.
    const fs::path dir = scratch("minimal");
    write_file(dir / "tokenizer.json", minimal_tokenizer_json().dump());
    EXPECT_EQ(load_tokenizer(dir)->encode("ab a"), (Ids{1, 0, 5, 0, 3}));  // "▁" is <unk> here
  }
  const std::vector<std::pair<json, std::string>> patches = {
      {{{"normalizer", {{"type", "NFKC"}}}}, "NFKC"},
      {{{"normalizer", {{"type", "Replace"}, {"pattern", {{"Regex", " "}}}, {"content", "x"}}}},
       "regex"},
      {{{"pre_tokenizer", {{"type", "ByteLevel"}}}}, "ByteLevel"},
      {{{"decoder", {{"type", "WordPiece"}}}}, "WordPiece"},
      {{{"decoder", nullptr}}, "no decoder"},
      {{{"post_processor", {{"type", "RobertaProcessing"}}}}, "RobertaProcessing"},
  };
  for (const auto& [patch, needle] : patches) {
    const fs::path dir = scratch("unsupported");
    write_file(dir / "tokenizer.json", apply_variant(minimal_tokenizer_json(), patch).dump());
    expect_error([&] { load_tokenizer(dir); }, ErrorKind::Tokenizer, needle);
  }
  json doc = minimal_tokenizer_json();
  doc["model"]["type"] = "WordPiece";
  const fs::path dir = scratch("unsupported");
  write_file(dir / "tokenizer.json", doc.dump());
  expect_error([&] { load_tokenizer(dir); }, ErrorKind::Tokenizer, "WordPiece");
}

TEST(TokenizerErrors, CorruptTokenizerModel) {
  const std::string good = read_file(model_dir() / "tokenizer.model");
  std::string flipped = good;
  for (size_t i = 0; i < 64; ++i) flipped[i] = static_cast<char>(~flipped[i]);
  const std::vector<std::string> bad = {"", "not a protobuf at all \xff\xff\xff",
                                        good.substr(0, good.size() / 3), flipped,
                                        read_file(model_dir() / "tokenizer_config.json")};
  for (const std::string& contents : bad) {
    const fs::path dir = scratch("bad_model");
    write_file(dir / "tokenizer.model", contents);
    expect_error([&] { load_tokenizer(dir); }, ErrorKind::Tokenizer, "tokenizer.model");
  }
}

TEST(TokenizerErrors, InvalidUtf8Text) {
  const std::vector<std::string> bad = {
      "\x80",              // lone continuation byte
      "ok \xC0\x80",       // overlong NUL
      "\xE4\xBD",          // truncated CJK character
      "\xED\xA0\x80",      // UTF-16 surrogate
      "\xF4\x90\x80\x80",  // past U+10FFFF
      "abc\xFF",
      "\xF0\x9F\x98",  // truncated emoji
  };
  for (const Tokenizer* tokenizer : {&hf_tokenizer(), &spm_tokenizer()}) {
    for (const std::string& text : bad) {
      expect_error([&] { tokenizer->encode(text); }, ErrorKind::Tokenizer, "UTF-8");
    }
  }
}

TEST(TokenizerErrors, IdsOutOfRange) {
  for (const Tokenizer* tokenizer :
       {&hf_tokenizer(), &spm_tokenizer(), &spm_tokenizer_with_pad()}) {
    for (int32_t id : {-1, tokenizer->vocab_size(), 32063, INT32_MAX}) {
      expect_error(
          [&] {
            tokenizer->decode(Ids{22557, id});
          },
          ErrorKind::Request, std::to_string(id));
      expect_error([&] { tokenizer->id_to_piece(id); }, ErrorKind::Request, std::to_string(id));
    }
  }
}

}  // namespace
}  // namespace moxin
