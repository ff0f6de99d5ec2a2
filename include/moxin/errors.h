// Typed errors. Every failure the library reports is a moxin::Error whose kind() tells the
// caller what went wrong; the message carries the context (file, tensor, shapes).
#pragma once

#include <stdexcept>
#include <string>

namespace moxin {

enum class ErrorKind {
  Compute,        // a numeric or backend failure while computing
  FileFormat,     // a model file is malformed (safetensors, index, quantized layout)
  Io,             // the operating system refused a read, write, open or map
  Json,           // a JSON document does not parse or has the wrong shape
  Tokenizer,      // tokenizer files missing or corrupt, or text that cannot be encoded
  MissingWeight,  // a tensor the model needs is absent from the checkpoint
  InvalidConfig,  // a configuration value is absent, nonsensical or contradicts the weights
  Image,          // an image that cannot be decoded, or is too large
  Request,        // a caller's request is invalid (shapes, ids, prompt, options)
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message);
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// A weight the model needs is not in the checkpoint; name() is the key that was looked up.
class MissingWeightError : public Error {
 public:
  explicit MissingWeightError(std::string name);
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

// A configuration value is wrong: field() names it, reason() says why.
class InvalidConfigError : public Error {
 public:
  InvalidConfigError(std::string field, std::string reason);
  const std::string& field() const { return field_; }
  const std::string& reason() const { return reason_; }

 private:
  std::string field_;
  std::string reason_;
};

[[noreturn]] void throw_error(ErrorKind kind, const std::string& message);

}  // namespace moxin
