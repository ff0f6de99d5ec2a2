// The reference's "pure" prompt format (Prismatic's PurePromptBuilder) and Python-compatible
// stripping. Expected strings are the builder's documented output, written out by hand; the
// token ids are HF `tokenizers` on the committed Mistral tokenizer.json.
#include <gtest/gtest.h>

#include "moxin/errors.h"
#include "moxin/prompt.h"
#include "moxin/tokenizer.h"
#include "test_support.h"

namespace moxin {
namespace {

void expect_request_error(const std::function<void()>& f, const std::string& mentions) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << mentions;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Request) << e.what();
    EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
  }
}

TEST(Prompt, SingleTurnIsInOut) {
  EXPECT_EQ(build_prompt("What is in the image?"), "In: What is in the image?\nOut:");
  EXPECT_EQ(build_prompt("What is in the image?", PromptFormat::Pure),
            "In: What is in the image?\nOut:");
}

TEST(Prompt, ImageTagsRemovedThenStripped) {
  EXPECT_EQ(build_prompt("<image>\n  Describe this.  \n"), "In: Describe this.\nOut:");
  EXPECT_EQ(build_prompt("A <image>cat<image>?"), "In: A cat?\nOut:");
  // Inner whitespace and newlines are kept.
  EXPECT_EQ(build_prompt(" two\n\nlines "), "In: two\n\nlines\nOut:");
  // Python's strip() also removes Unicode spaces: U+3000, U+00A0, U+2029, U+0085.
  EXPECT_EQ(build_prompt("\xE3\x80\x80hi\xC2\xA0\xE2\x80\xA9\xC2\x85"), "In: hi\nOut:");
  // ... but not zero-width characters (U+200B is not str.isspace()).
  EXPECT_EQ(build_prompt("hi\xE2\x80\x8B"), "In: hi\xE2\x80\x8B\nOut:");
}

TEST(Prompt, MultiTurn) {
  PurePromptBuilder b;
  b.add_human("What is this?");
  EXPECT_EQ(b.last_turn(), "In: What is this?\nOut: ");
  EXPECT_EQ(b.prompt(), "In: What is this?\nOut:");
  b.add_model("  A cat. ");
  EXPECT_EQ(b.last_turn(), "A cat.</s>");
  EXPECT_EQ(b.prompt(), "In: What is this?\nOut: A cat.</s>");
  b.add_human("<image>What colour?");
  EXPECT_EQ(b.prompt(), "In: What is this?\nOut: A cat.</s>In: What colour?\nOut:");
  EXPECT_EQ(b.turn_count(), 3);
  EXPECT_TRUE(b.awaiting_reply());
  // An empty reply becomes one space, as the reference's wrap function writes it.
  b.add_model("");
  EXPECT_EQ(b.prompt(), "In: What is this?\nOut: A cat.</s>In: What colour?\nOut:  </s>");
}

TEST(Prompt, TurnOrderIsEnforced) {
  PurePromptBuilder b;
  expect_request_error([&] { b.add_model("reply first"); }, "human turn first");
  b.add_human("q");
  expect_request_error([&] { b.add_human("again"); }, "waiting");
}

TEST(Prompt, EmptyOrInvalidPromptsAreRequestErrors) {
  expect_request_error([] { build_prompt(""); }, "empty");
  expect_request_error([] { build_prompt(" \n\t "); }, "empty");
  expect_request_error([] { build_prompt("<image>"); }, "empty");
  expect_request_error([] { build_prompt("", PromptFormat::Raw); }, "empty");
  expect_request_error([] { build_prompt("caf\xE9"); }, "UTF-8");       // Latin-1 byte
  expect_request_error([] { build_prompt("\xED\xA0\x80"); }, "UTF-8");  // a surrogate
  expect_request_error([] { build_prompt("ok\xC0\xAF", PromptFormat::Raw); }, "UTF-8");  // overlong
  PurePromptBuilder b;
  b.add_human("q");
  expect_request_error([&] { b.add_model("\xFF"); }, "UTF-8");
  // A failed turn leaves the conversation as it was.
  EXPECT_EQ(b.prompt(), "In: q\nOut:");
}

TEST(Prompt, RawPassesTextUnchanged) {
  EXPECT_EQ(build_prompt("  <image> In: x\nOut: \n", PromptFormat::Raw),
            "  <image> In: x\nOut: \n");
  EXPECT_EQ(build_prompt(" ", PromptFormat::Raw), " ");
}

TEST(Prompt, StripMatchesPython) {
  EXPECT_EQ(strip_whitespace(""), "");
  EXPECT_EQ(strip_whitespace(" \t\n\v\f\r\x1c\x1d\x1e\x1f"), "");
  EXPECT_EQ(strip_whitespace("\xE2\x80\x80"
                             "a b"
                             "\xE2\x80\x8A"),
            "a b");  // U+2000, U+200A
  EXPECT_EQ(lstrip_whitespace("  a  "), "a  ");
  EXPECT_EQ(rstrip_whitespace("  a  "), "  a");
  EXPECT_EQ(rstrip_whitespace("\xE6\x97\xA5\xE3\x80\x80"), "\xE6\x97\xA5");  // 日 + U+3000
  EXPECT_EQ(strip_whitespace("\xE1\x9A\x80x\xE2\x81\x9F"), "x");             // U+1680, U+205F
}

TEST(Prompt, TokenizesAsTheReference) {
  // HF tokenizers on tests/fixtures/tokenizer/mistral/tokenizer.json:
  //   Tokenizer.from_file(...).encode("In: What is in the image?\nOut:").ids
  const auto tok = load_tokenizer(test::fixtures_dir() / "tokenizer" / "mistral");
  EXPECT_EQ(
      tok->encode(build_prompt("What is in the image?")),
      (std::vector<int32_t>{1, 560, 28747, 1824, 349, 297, 272, 3469, 28804, 13, 2919, 28747}));
  // The multi-turn prompt: "</s>" is the special token 2 and the next turn starts with "▁In".
  PurePromptBuilder b;
  b.add_human("q1");
  b.add_model("a1");
  b.add_human("q2");
  EXPECT_EQ(tok->encode(b.prompt()),
            (std::vector<int32_t>{1, 560, 28747, 4256, 28740, 13, 2919, 28747, 264, 28740, 2, 560,
                                  28747, 4256, 28750, 13, 2919, 28747}));
}

}  // namespace
}  // namespace moxin
