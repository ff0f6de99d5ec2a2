#include "core/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>

#include "moxin/errors.h"

namespace moxin::safetensors {

namespace {

using nlohmann::json;

// Names come from untrusted files: keep messages printable and bounded.
std::string printable(std::string_view text) {
  constexpr size_t kMaxShown = 200;
  std::string out;
  for (size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f || c == '\\') {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += char(c);
    }
  }
  if (text.size() > kMaxShown) out += "...";
  return out;
}

[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  throw_error(ErrorKind::FileFormat, source + ": " + problem);
}

[[noreturn]] void fail_tensor(const std::string& source, std::string_view tensor,
                              const std::string& problem) {
  fail(source, "tensor '" + printable(tensor) + "': " + problem);
}

// Position of the first byte that breaks UTF-8 (overlong forms, surrogates and code points
// above U+10FFFF included), or nullopt when the text is valid.
std::optional<size_t> first_invalid_utf8(const uint8_t* text, size_t size) {
  size_t i = 0;
  while (i < size) {
    const uint8_t lead = text[i];
    if (lead < 0x80) {
      ++i;
      continue;
    }
    size_t length;
    uint32_t lowest;  // the smallest code point this length may encode (overlong check)
    uint32_t code;
    if ((lead & 0xe0) == 0xc0) {
      length = 2, lowest = 0x80, code = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      length = 3, lowest = 0x800, code = lead & 0x0f;
    } else if ((lead & 0xf8) == 0xf0) {
      length = 4, lowest = 0x10000, code = lead & 0x07;
    } else {
      return i;
    }
    if (size - i < length) return i;
    for (size_t k = 1; k < length; ++k) {
      if ((text[i + k] & 0xc0) != 0x80) return i;
      code = (code << 6) | (text[i + k] & 0x3f);
    }
    if (code < lowest || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return i;
    i += length;
  }
  return std::nullopt;
}

std::string describe(const json& value) {
  if (value.is_number_float()) return "the non-integer " + value.dump();
  if (value.is_number_integer() && !value.is_number_unsigned())
    return "the negative number " + value.dump();
  return std::string("a JSON ") + value.type_name();
}

// JSON integers the parser saw as unsigned (it stores every non-negative integer that way);
// floats such as 1.0 or 1e3 are refused, as the format's reference implementation does.
std::optional<uint64_t> non_negative_integer(const json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  return std::nullopt;
}

// Parses the header JSON while refusing what a DOM parse would silently accept or what would
// let a small header demand large work: duplicate keys (the DOM keeps only the last), nesting
// deeper than the format uses, and arrays longer than any shape may be.
json parse_header_json(const uint8_t* text, size_t size, const std::string& source) {
  std::vector<std::set<std::string>> keys_per_object;
  std::string tensor;  // the top-level key being parsed, for messages
  std::string field;   // the key inside a tensor entry being parsed
  size_t array_elements = 0;
  auto check = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        // Root object (0), tensor entry or metadata (1), shape or offsets array (2).
        if (depth > 2) fail_tensor(source, tensor, "'" + printable(field) + "' nests too deeply");
        if (depth == 2) array_elements = 0;
        if (event == json::parse_event_t::object_start) keys_per_object.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys_per_object.empty()) keys_per_object.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (depth == 1) tensor = key;
        if (depth == 2) field = key;
        if (!keys_per_object.empty() && !keys_per_object.back().insert(key).second) {
          if (depth == 1) fail_tensor(source, key, "appears twice in the header");
          if (tensor == "__metadata__")
            fail(source, "\"__metadata__\" has a duplicate key '" + printable(key) + "'");
          fail_tensor(source, tensor, "duplicate key '" + printable(key) + "'");
        }
        break;
      }
      case json::parse_event_t::value:
        if (depth == 3 && ++array_elements > kMaxRank)
          fail_tensor(
              source, tensor,
              "'" + printable(field) + "' has more than " + std::to_string(kMaxRank) + " entries");
        break;
      case json::parse_event_t::array_end:
        break;
    }
    return true;
  };
  const char* begin = reinterpret_cast<const char*>(text);
  try {
    return json::parse(begin, begin + size, check);
  } catch (const json::exception& e) {
    fail(source, std::string("header is not valid JSON: ") + e.what());
  }
}

DType parse_dtype(const json& value, const std::string& source, const std::string& name) {
  if (!value.is_string()) fail_tensor(source, name, "\"dtype\" is " + describe(value));
  const std::string& text = value.get_ref<const std::string&>();
  if (auto dtype = dtype_from_name(text)) return *dtype;
  // Newer revisions of the format added sub-byte and 8-bit float types; name them as such.
  static const std::set<std::string_view> kKnownUnsupported = {
      "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64", "C128"};
  if (kKnownUnsupported.count(text))
    fail_tensor(source, name, "dtype " + text + " is not supported by this engine");
  fail_tensor(source, name, "unknown dtype \"" + printable(text) + "\"");
}

Shape parse_shape(const json& value, const std::string& source, const std::string& name) {
  if (!value.is_array()) fail_tensor(source, name, "\"shape\" is " + describe(value));
  if (value.size() > kMaxRank)
    fail_tensor(source, name,
                "rank " + std::to_string(value.size()) + " exceeds the limit of " +
                    std::to_string(kMaxRank));
  Shape shape;
  for (const json& dim : value) {
    const auto extent = non_negative_integer(dim);
    if (!extent) fail_tensor(source, name, "shape dimension is " + describe(dim));
    if (*extent > uint64_t(std::numeric_limits<int64_t>::max()))
      fail_tensor(source, name, "shape dimension " + std::to_string(*extent) + " is too large");
    shape.push_back(int64_t(*extent));
  }
  return shape;
}

// Byte length of a tensor, or nullopt when it does not fit in 64 bits (or its element count
// does not fit the int64 that Tensor uses). Any zero extent makes the tensor empty regardless
// of the others, so the answer does not depend on dimension order.
std::optional<uint64_t> byte_length(const Shape& shape, DType dtype) {
  uint64_t elements = 1;
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  for (int64_t extent : shape)
    if (__builtin_mul_overflow(elements, uint64_t(extent), &elements)) return std::nullopt;
  if (elements > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
  uint64_t bytes;
  if (__builtin_mul_overflow(elements, uint64_t(dtype_size(dtype)), &bytes)) return std::nullopt;
  return bytes;
}

std::string range_text(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

Entry parse_entry(const std::string& name, const json& value, uint64_t data_size,
                  const std::string& source) {
  if (name.empty()) fail(source, "a tensor has an empty name");
  if (!value.is_object()) fail_tensor(source, name, "entry is " + describe(value));
  // Other keys are ignored, as the reference implementation does.
  for (const char* required : {"dtype", "shape", "data_offsets"})
    if (!value.contains(required))
      fail_tensor(source, name, std::string("entry lacks \"") + required + "\"");

  Entry entry;
  entry.name = name;
  entry.dtype = parse_dtype(value["dtype"], source, name);
  entry.shape = parse_shape(value["shape"], source, name);

  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2)
    fail_tensor(source, name, "\"data_offsets\" must be [begin, end], not " + offsets.dump());
  const auto begin = non_negative_integer(offsets[0]);
  const auto end = non_negative_integer(offsets[1]);
  if (!begin) fail_tensor(source, name, "data_offsets begin is " + describe(offsets[0]));
  if (!end) fail_tensor(source, name, "data_offsets end is " + describe(offsets[1]));
  if (*begin > *end)
    fail_tensor(source, name, "data_offsets " + range_text(*begin, *end) + " begin after they end");
  entry.begin = *begin;
  entry.end = *end;

  const auto bytes = byte_length(entry.shape, entry.dtype);
  const std::string layout =
      "shape " + shape_to_string(entry.shape) + " of " + std::string(dtype_name(entry.dtype));
  if (!bytes) fail_tensor(source, name, layout + " overflows 64-bit sizes");
  if (*bytes != *end - *begin)
    fail_tensor(source, name,
                layout + " needs " + std::to_string(*bytes) + " bytes but data_offsets " +
                    range_text(*begin, *end) + " hold " + std::to_string(*end - *begin));
  if (*end > data_size)
    fail_tensor(source, name,
                "data_offsets " + range_text(*begin, *end) + " run past the data section of " +
                    std::to_string(data_size) + " bytes");
  return entry;
}

}  // namespace

Header parse(const uint8_t* bytes, size_t size, const std::string& source) {
  if (size < 8)
    fail(source, "file is " + std::to_string(size) +
                     " bytes, too short for the 8-byte header length of a safetensors file");
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | bytes[i];  // little-endian
  if (header_size > kMaxHeaderBytes)
    fail(source, "header length " + std::to_string(header_size) + " exceeds the limit of " +
                     std::to_string(kMaxHeaderBytes) + " bytes");
  if (header_size > size - 8)
    fail(source, "header length " + std::to_string(header_size) + " runs past the end of the " +
                     std::to_string(size) + "-byte file");
  const uint8_t* text = bytes + 8;
  if (const auto bad = first_invalid_utf8(text, header_size))
    fail(source, "header is not valid UTF-8 (byte " + std::to_string(*bad) + " of the header)");
  // The JSON parser takes a NUL byte for the end of its input and would ignore what follows; no
  // valid header holds one (inside strings it must be escaped).
  if (const void* nul = std::memchr(text, 0, header_size))
    fail(source, "header holds a NUL byte (byte " +
                     std::to_string(static_cast<const uint8_t*>(nul) - text) + " of the header)");

  const json document = parse_header_json(text, header_size, source);
  if (!document.is_object()) fail(source, "header is " + describe(document) + ", not an object");

  Header header;
  header.data_offset = 8 + header_size;
  const uint64_t data_size = size - header.data_offset;
  for (const auto& [name, value] : document.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(source, "\"__metadata__\" is " + describe(value));
      for (const auto& [key, text_value] : value.items()) {
        if (!text_value.is_string())
          fail(source, "\"__metadata__\" value for '" + printable(key) + "' is " +
                           describe(text_value) + ", not a string");
        header.metadata.emplace(key, text_value.get<std::string>());
      }
      continue;
    }
    header.tensors.push_back(parse_entry(name, value, data_size, source));
  }

  // The data section is exactly the tensors, back to back: no gaps (hidden bytes), no overlaps
  // (aliasing tensors) and nothing after the last one, as the reference implementation demands.
  std::sort(header.tensors.begin(), header.tensors.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t expected = 0;
  for (const Entry& entry : header.tensors) {
    if (entry.begin > expected)
      fail_tensor(source, entry.name,
                  "data_offsets " + range_text(entry.begin, entry.end) +
                      " leave a gap after byte " + std::to_string(expected) +
                      " of the data section");
    if (entry.begin < expected)
      fail_tensor(source, entry.name,
                  "data_offsets " + range_text(entry.begin, entry.end) +
                      " overlap the previous tensor, which ends at byte " +
                      std::to_string(expected));
    expected = entry.end;
  }
  if (expected != data_size)
    fail(source, "data section is " + std::to_string(data_size) + " bytes but the tensors cover " +
                     std::to_string(expected) + " (trailing bytes)");
  return header;
}

std::string serialize_header(const std::vector<Entry>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  auto check_text = [](const std::string& text, const std::string& what) {
    if (first_invalid_utf8(reinterpret_cast<const uint8_t*>(text.data()), text.size()))
      throw_error(ErrorKind::Request, what + " '" + printable(text) + "' is not valid UTF-8");
  };
  json document = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [key, value] : metadata) {
      check_text(key, "metadata key");
      check_text(value, "metadata value");
      meta[key] = value;
    }
    document["__metadata__"] = std::move(meta);
  }
  for (const Entry& entry : tensors) {
    if (entry.name.empty())
      throw_error(ErrorKind::Request, "cannot save a tensor with an empty name");
    if (entry.name == "__metadata__")
      throw_error(ErrorKind::Request, "cannot save a tensor named __metadata__ (reserved)");
    check_text(entry.name, "tensor name");
    if (document.contains(entry.name))
      throw_error(ErrorKind::Request, "tensor '" + printable(entry.name) + "' is saved twice");
    document[entry.name] = {{"dtype", std::string(dtype_name(entry.dtype))},
                            {"shape", entry.shape},
                            {"data_offsets", {entry.begin, entry.end}}};
  }
  std::string text = document.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

}  // namespace moxin::safetensors
