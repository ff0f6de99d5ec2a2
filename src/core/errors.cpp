#include "moxin/errors.h"

namespace moxin {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Compute: return "compute error";
    case ErrorKind::FileFormat: return "file format error";
    case ErrorKind::Io: return "I/O error";
    case ErrorKind::Json: return "JSON error";
    case ErrorKind::Tokenizer: return "tokenizer error";
    case ErrorKind::MissingWeight: return "missing weight";
    case ErrorKind::InvalidConfig: return "invalid config";
    case ErrorKind::Image: return "image error";
    case ErrorKind::Request: return "invalid request";
  }
  return "error";
}

Error::Error(ErrorKind kind, const std::string& message)
    : std::runtime_error(message), kind_(kind) {}

MissingWeightError::MissingWeightError(std::string name)
    : Error(ErrorKind::MissingWeight, "'" + name + "' is not in the checkpoint"), name_(std::move(name)) {}

InvalidConfigError::InvalidConfigError(std::string field, std::string reason)
    : Error(ErrorKind::InvalidConfig, field + ": " + reason),
      field_(std::move(field)),
      reason_(std::move(reason)) {}

void throw_error(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

}  // namespace moxin
