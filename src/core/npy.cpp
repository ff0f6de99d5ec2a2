#include "core/npy.h"

#include <cstring>
#include <fstream>
#include <sstream>

#include "moxin/errors.h"

namespace moxin::npy {

namespace {

constexpr char kMagic[] = "\x93NUMPY";

[[noreturn]] void fail(const std::filesystem::path& file, const std::string& why) {
  throw_error(ErrorKind::FileFormat, file.string() + ": not a valid .npy file: " + why);
}

std::string descr_for(DType dtype) {
  switch (dtype) {
    case DType::F32: return "<f4";
    case DType::F16: return "<f2";
    case DType::F64: return "<f8";
    case DType::U8: return "|u1";
    case DType::BF16:
    case DType::U16: return "<u2";
    case DType::U32: return "<u4";
    case DType::I32: return "<i4";
    case DType::I64: return "<i8";
    case DType::U64: return "<u8";
    case DType::I8: return "|i1";
    case DType::I16: return "<i2";
    case DType::Bool: return "|b1";
  }
  return "";
}

DType dtype_for(const std::string& descr, const std::filesystem::path& file) {
  static const std::pair<const char*, DType> kTable[] = {
      {"<f4", DType::F32}, {"<f2", DType::F16}, {"<f8", DType::F64}, {"|u1", DType::U8},
      {"<u2", DType::U16}, {"<u4", DType::U32}, {"<u8", DType::U64}, {"|i1", DType::I8},
      {"<i2", DType::I16}, {"<i4", DType::I32}, {"<i8", DType::I64}, {"|b1", DType::Bool}};
  for (const auto& [name, dtype] : kTable)
    if (descr == name) return dtype;
  fail(file, "unsupported dtype '" + descr + "'");
}

// The header is a Python dict literal; we read the three keys NumPy always writes.
std::string dict_value(const std::string& header, const std::string& key,
                       const std::filesystem::path& file) {
  const std::string quoted = "'" + key + "':";
  const size_t at = header.find(quoted);
  if (at == std::string::npos) fail(file, "header lacks '" + key + "'");
  size_t begin = at + quoted.size();
  while (begin < header.size() && header[begin] == ' ') ++begin;
  size_t end = begin;
  if (begin < header.size() && header[begin] == '(') {
    end = header.find(')', begin);
    if (end == std::string::npos) fail(file, "unterminated shape");
    return header.substr(begin + 1, end - begin - 1);
  }
  if (begin < header.size() && header[begin] == '\'') {
    end = header.find('\'', begin + 1);
    if (end == std::string::npos) fail(file, "unterminated string");
    return header.substr(begin + 1, end - begin - 1);
  }
  end = header.find_first_of(",}", begin);
  if (end == std::string::npos) fail(file, "malformed header");
  return header.substr(begin, end - begin);
}

}  // namespace

Tensor load(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw_error(ErrorKind::Io, file.string() + ": cannot open: " + std::strerror(errno));
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, kMagic, 6) != 0) fail(file, "bad magic");
  const int major = uint8_t(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    uint8_t len[2];
    if (!in.read(reinterpret_cast<char*>(len), 2)) fail(file, "truncated header");
    header_len = uint32_t(len[0]) | uint32_t(len[1]) << 8;
  } else if (major == 2 || major == 3) {
    uint8_t len[4];
    if (!in.read(reinterpret_cast<char*>(len), 4)) fail(file, "truncated header");
    header_len = uint32_t(len[0]) | uint32_t(len[1]) << 8 | uint32_t(len[2]) << 16 |
                 uint32_t(len[3]) << 24;
  } else {
    fail(file, "unknown format version " + std::to_string(major));
  }
  if (header_len > (1u << 20)) fail(file, "header too large");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) fail(file, "truncated header");

  const DType dtype = dtype_for(dict_value(header, "descr", file), file);
  if (dict_value(header, "fortran_order", file) != "False") fail(file, "Fortran order");
  Shape shape;
  std::stringstream dims(dict_value(header, "shape", file));
  std::string item;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    try {
      size_t used = 0;
      const long long d = std::stoll(item, &used);
      if (d < 0) fail(file, "negative dimension");
      shape.push_back(d);
    } catch (const std::logic_error&) {
      fail(file, "bad dimension '" + item + "'");
    }
  }
  Tensor t = Tensor::empty(shape, dtype);
  if (!in.read(static_cast<char*>(t.raw_mut()), std::streamsize(t.nbytes())))
    fail(file, "truncated data (" + std::to_string(t.nbytes()) + " bytes expected)");
  return t;
}

void save(const std::filesystem::path& file, const Tensor& tensor) {
  std::string dims;
  for (int i = 0; i < tensor.ndim(); ++i) {
    dims += std::to_string(tensor.shape()[size_t(i)]);
    if (tensor.ndim() == 1) dims += ",";  // Python's one-element tuple
    else if (i + 1 < tensor.ndim()) dims += ", ";
  }
  std::string header = "{'descr': '" + descr_for(tensor.dtype()) +
                       "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Pad so the data starts on a 64-byte boundary, newline-terminated, as NumPy writes it.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) throw_error(ErrorKind::Io, file.string() + ": cannot create: " + std::strerror(errno));
  out.write(kMagic, 6);
  const char version[2] = {1, 0};
  out.write(version, 2);
  const uint16_t len = uint16_t(header.size());
  const char len_bytes[2] = {char(len & 0xff), char(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), std::streamsize(header.size()));
  out.write(static_cast<const char*>(tensor.raw()), std::streamsize(tensor.nbytes()));
  if (!out) throw_error(ErrorKind::Io, file.string() + ": write failed: " + std::strerror(errno));
}

}  // namespace moxin::npy
