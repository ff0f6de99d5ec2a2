// A whole file mapped read-only into memory. Weights are served straight from the page cache:
// mapping touches no bytes, and tensors that view the mapping keep it alive through the
// shared_ptr that open() returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace moxin {

class MappedFile {
 public:
  // Throws Io (with the operating system's reason) when the path is missing, is not a regular
  // file, cannot be read or cannot be mapped. An empty file maps to size() == 0, data() == nullptr.
  static std::shared_ptr<const MappedFile> open(const std::filesystem::path& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace moxin
