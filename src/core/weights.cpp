#include "moxin/weights.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>

#include "core/mapped_file.h"
#include "core/safetensors.h"
#include "moxin/errors.h"

namespace moxin {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// WeightMap

void WeightMap::insert(const std::string& name, Tensor tensor, const std::string& source) {
  auto [it, inserted] = tensors_.try_emplace(name, Entry{std::move(tensor), source});
  if (!inserted) {
    const std::string first = it->second.source.empty() ? "memory" : it->second.source;
    const std::string second = source.empty() ? "memory" : source;
    throw_error(ErrorKind::FileFormat,
                "tensor '" + name + "' appears twice: in " + first + " and in " + second);
  }
}

const Tensor* WeightMap::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.tensor;
}

const Tensor& WeightMap::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw MissingWeightError(name);
  return it->second.tensor;
}

const std::string& WeightMap::source(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw MissingWeightError(name);
  return it->second.source;
}

void WeightMap::erase(const std::string& name) {
  tensors_.erase(name);
}

std::vector<std::string> WeightMap::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, entry] : tensors_) out.push_back(name);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// Adds every tensor of one mapped safetensors file to `weights`, as views that keep the mapping
// alive. A tensor whose bytes are not aligned to its element size (a writer that did not pad
// its header) is copied instead: reading it in place would be undefined behaviour.
void add_tensors(const std::shared_ptr<const MappedFile>& file, WeightMap& weights) {
  const safetensors::Header header = safetensors::parse(file->data(), file->size(), file->path());
  for (const safetensors::Entry& entry : header.tensors) {
    const uint8_t* bytes = file->data() + header.data_offset + entry.begin;
    const size_t alignment = dtype_size(entry.dtype);
    Tensor tensor;
    if (reinterpret_cast<uintptr_t>(bytes) % alignment == 0) {
      tensor = Tensor::view(entry.shape, entry.dtype, bytes, file);
    } else {
      tensor = Tensor::empty(entry.shape, entry.dtype);
      if (tensor.nbytes()) std::memcpy(tensor.raw_mut(), bytes, tensor.nbytes());
    }
    weights.insert(entry.name, std::move(tensor), file->path());
  }
}

// The index is JSON whose shape we check by hand; duplicate keys would silently keep only the
// last shard for a tensor, so they are refused while parsing.
nlohmann::json parse_index_json(const MappedFile& file) {
  std::vector<std::set<std::string>> keys_per_object;
  auto refuse_duplicates = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) keys_per_object.emplace_back();
    if (event == Event::object_end && !keys_per_object.empty()) keys_per_object.pop_back();
    if (event == Event::key && !keys_per_object.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!keys_per_object.back().insert(key).second)
        throw_error(ErrorKind::Json, file.path() + ": duplicate key '" + key + "'");
    }
    return true;
  };
  const char* text = reinterpret_cast<const char*>(file.data());
  try {
    return nlohmann::json::parse(text, text + file.size(), refuse_duplicates);
  } catch (const nlohmann::json::exception& e) {
    throw_error(ErrorKind::Json, file.path() + ": not valid JSON: " + e.what());
  }
}

// A shard must be a file directly inside the model directory: an index from an untrusted
// download must not make us map arbitrary paths.
void check_shard_name(const std::string& shard, const std::string& tensor,
                      const std::string& index) {
  const auto refuse = [&](const std::string& why) {
    throw_error(ErrorKind::FileFormat,
                index + ": tensor '" + tensor + "' names shard '" + shard + "', which " + why);
  };
  if (shard.empty()) refuse("is empty");
  if (shard == "." || shard == "..") refuse("is not a file name");
  if (shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos)
    refuse("is a path, not a file name inside the model directory");
  if (shard.find('\0') != std::string::npos) refuse("contains a NUL byte");
}

WeightMap load_sharded(const fs::path& dir, const fs::path& index_path) {
  const auto index_file = MappedFile::open(index_path);
  const std::string index = index_file->path();
  const nlohmann::json document = parse_index_json(*index_file);
  if (!document.is_object())
    throw_error(ErrorKind::Json,
                index + ": expected a JSON object, found " + std::string(document.type_name()));
  if (document.contains("metadata") && !document["metadata"].is_object())
    throw_error(ErrorKind::Json, index + ": \"metadata\" is a " +
                                     std::string(document["metadata"].type_name()) +
                                     ", not an object");
  if (!document.contains("weight_map")) throw_error(ErrorKind::Json, index + ": no \"weight_map\"");
  const nlohmann::json& weight_map = document["weight_map"];
  if (!weight_map.is_object())
    throw_error(ErrorKind::Json, index + ": \"weight_map\" is a " +
                                     std::string(weight_map.type_name()) + ", not an object");

  std::map<std::string, std::string> shard_of;  // tensor -> shard file name
  std::set<std::string> shards;
  for (const auto& [tensor, shard] : weight_map.items()) {
    if (!shard.is_string())
      throw_error(ErrorKind::Json, index + ": shard of tensor '" + tensor + "' is a " +
                                       std::string(shard.type_name()) + ", not a string");
    const std::string& name = shard.get_ref<const std::string&>();
    check_shard_name(name, tensor, index);
    shard_of.emplace(tensor, name);
    shards.insert(name);
  }

  WeightMap weights;
  std::map<std::string, std::string> path_of_shard;
  for (const std::string& shard : shards) {
    const fs::path path = dir / shard;
    std::shared_ptr<const MappedFile> file;
    try {
      file = MappedFile::open(path);
    } catch (const Error& e) {
      throw_error(e.kind(), "shard '" + shard + "' named by " + index + ": " + e.what());
    }
    path_of_shard[shard] = file->path();
    add_tensors(file, weights);  // refuses a tensor already loaded from another shard
  }
  for (const auto& [tensor, shard] : shard_of) {
    const std::string& expected = path_of_shard[shard];
    if (!weights.contains(tensor))
      throw_error(ErrorKind::FileFormat,
                  index + " lists tensor '" + tensor + "' in " + expected + ", which lacks it");
    if (weights.source(tensor) != expected)
      throw_error(ErrorKind::FileFormat, index + " lists tensor '" + tensor + "' in " + expected +
                                             ", which lacks it (it is in " +
                                             weights.source(tensor) + ")");
  }
  return weights;
}

}  // namespace

WeightMap load_safetensors(const fs::path& file) {
  WeightMap weights;
  add_tensors(MappedFile::open(file), weights);
  return weights;
}

WeightMap load_safetensors_dir(const fs::path& dir) {
  std::error_code error;
  const fs::file_status status = fs::status(dir, error);
  if (error || !fs::exists(status))
    throw_error(ErrorKind::Io, "model directory " + dir.string() +
                                   " does not exist or cannot be read" +
                                   (error ? ": " + error.message() : ""));
  if (!fs::is_directory(status))
    throw_error(ErrorKind::Io, "model directory " + dir.string() + " is not a directory");

  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index, error)) return load_sharded(dir, index);
  const fs::path single = dir / "model.safetensors";
  if (fs::exists(single, error)) return load_safetensors(single);
  throw_error(ErrorKind::Io, "model directory " + dir.string() +
                                 " has neither model.safetensors.index.json nor model.safetensors");
}

// ---------------------------------------------------------------------------------------------
// Saving

namespace {

[[noreturn]] void throw_write_error(const std::string& what, const std::string& path, int error) {
  throw_error(ErrorKind::Io, what + " " + path + ": " + std::strerror(error));
}

// A file being written under a temporary name; removed again unless commit() renamed it.
class TemporaryFile {
 public:
  explicit TemporaryFile(const fs::path& target) : target_(target.string()) {
    static std::atomic<unsigned> counter{0};
    const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
    for (int attempt = 0;; ++attempt) {
      path_ = (dir / ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()) +
                      "-" + std::to_string(counter++)))
                  .string();
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0) break;
      if (errno != EEXIST || attempt > 100) throw_write_error("cannot create", path_, errno);
    }
  }
  ~TemporaryFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;

  void write(const void* data, size_t size) {
    const char* bytes = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t written = ::write(fd_, bytes, size);
      if (written < 0) {
        if (errno == EINTR) continue;
        throw_write_error("cannot write", path_, errno);
      }
      bytes += written;
      size -= size_t(written);
    }
  }

  // Flushes to disk before the rename, so a crash never leaves a truncated file under the
  // final name.
  void commit() {
    if (::fsync(fd_) != 0) throw_write_error("cannot flush", path_, errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw_write_error("cannot close", path_, errno);
    if (::rename(path_.c_str(), target_.c_str()) != 0)
      throw_write_error("cannot rename " + path_ + " to", target_, errno);
    committed_ = true;
  }

 private:
  std::string target_;
  std::string path_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

void save_safetensors(const fs::path& file, const WeightMap& weights,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<safetensors::Entry> entries;
  std::vector<const Tensor*> tensors;
  uint64_t offset = 0;
  for (const std::string& name : weights.names()) {
    const Tensor& tensor = weights.get(name);
    if (!tensor.defined())
      throw_error(ErrorKind::Request, "cannot save undefined tensor '" + name + "'");
    entries.push_back({name, tensor.dtype(), tensor.shape(), offset, offset + tensor.nbytes()});
    tensors.push_back(&tensor);
    offset += tensor.nbytes();
  }
  const std::string header = safetensors::serialize_header(entries, metadata);
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(header.size()) >> (8 * i));

  TemporaryFile out(file);
  out.write(length, sizeof length);
  out.write(header.data(), header.size());
  for (const Tensor* tensor : tensors)
    if (tensor->nbytes()) out.write(tensor->raw(), tensor->nbytes());
  out.commit();
}

}  // namespace moxin
