// Parsing of command-line values shared by several subcommands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moxin::cli {

// "1,560,28747" -> {1, 560, 28747}; Request error on anything else (empty items, signs,
// non-digits, values beyond int32).
std::vector<int32_t> parse_id_list(const std::string& text);

}  // namespace moxin::cli
