#include "cli/parse.h"

#include "moxin/errors.h"

namespace moxin::cli {

std::vector<int32_t> parse_id_list(const std::string& text) {
  std::vector<int32_t> ids;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string item = text.substr(at, comma - at);
    if (item.empty() || item.size() > 10 || item.find_first_not_of("0123456789") != std::string::npos)
      throw_error(ErrorKind::Request, "--ids must be comma-separated token ids, got '" + text + "'");
    const long long value = std::stoll(item);
    if (value > INT32_MAX) throw_error(ErrorKind::Request, "token id " + item + " is too large");
    ids.push_back(int32_t(value));
    at = comma + 1;
  }
  return ids;
}

}  // namespace moxin::cli
