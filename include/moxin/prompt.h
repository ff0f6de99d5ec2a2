// The reference's "pure" prompt format (Prismatic's PurePromptBuilder), which Moxin-VLM was
// trained with: a human turn is `In: {message}\nOut: `, a model turn `{reply}</s>`, and the
// prompt handed to the tokenizer (which prepends BOS) is the concatenation, right-trimmed. A
// single question therefore becomes exactly `In: {question}\nOut:`.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moxin {

enum class PromptFormat {
  Pure,  // the reference's builder
  Raw,   // the text unchanged: the caller wrote the whole prompt
};

// Python's str.strip(): removes leading and trailing Unicode whitespace (the characters
// str.isspace() accepts: ASCII \t\n\v\f\r, space, \x1c-\x1f, U+0085, U+00A0, U+1680,
// U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000). Text must be valid UTF-8.
std::string_view strip_whitespace(std::string_view text);
std::string_view rstrip_whitespace(std::string_view text);
std::string_view lstrip_whitespace(std::string_view text);

class PurePromptBuilder {
 public:
  // A human turn: `<image>` removed, then stripped. Error(Request) when the message is not valid
  // UTF-8, is empty after cleaning, or a human turn is already waiting for its reply.
  void add_human(std::string_view message);
  // The model's reply to the last human turn: stripped (the reference strips every message;
  // an empty reply becomes " ", as its wrap function does). Error(Request) out of turn order.
  void add_model(std::string_view reply);

  // The whole conversation, right-trimmed, without BOS (the tokenizer adds it).
  std::string prompt() const;
  // The text the last add_* appended (the reference's add_turn return value).
  const std::string& last_turn() const { return last_turn_; }
  int turn_count() const { return turn_count_; }
  bool awaiting_reply() const { return turn_count_ % 2 == 1; }

 private:
  std::string prompt_;
  std::string last_turn_;
  int turn_count_ = 0;
};

// One question -> the prompt text. Pure: `In: {question}\nOut:`. Raw: the text unchanged.
// Error(Request) for an empty prompt (empty after cleaning, for Pure) or invalid UTF-8.
std::string build_prompt(std::string_view question, PromptFormat format = PromptFormat::Pure);

}  // namespace moxin
