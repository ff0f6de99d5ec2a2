// A checkpoint's tensors by name. Tensors loaded from safetensors are read-only views into
// memory-mapped files: loading touches no weight bytes, and the page cache holds them once.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "moxin/tensor.h"

namespace moxin {

class WeightMap {
 public:
  // Throws FileFormat if `name` is already present (two shards claiming one tensor).
  void insert(const std::string& name, Tensor tensor, const std::string& source = "");
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const Tensor* find(const std::string& name) const;
  const Tensor& get(const std::string& name) const;  // throws MissingWeightError
  // The file a tensor was read from ("" for tensors made in memory); throws MissingWeightError.
  const std::string& source(const std::string& name) const;
  void erase(const std::string& name);  // no-op when absent
  std::vector<std::string> names() const;  // sorted
  size_t size() const { return tensors_.size(); }
  bool empty() const { return tensors_.empty(); }

 private:
  struct Entry {
    Tensor tensor;
    std::string source;
  };
  std::map<std::string, Entry> tensors_;
};

// One .safetensors file, validated and memory-mapped. Tensors are read-only views that keep the
// mapping alive; a tensor whose bytes are not aligned to its element size (a writer that did not
// pad its header) is copied into aligned memory instead. Errors: Io (open/map), FileFormat.
WeightMap load_safetensors(const std::filesystem::path& file);

// A model directory: `model.safetensors.index.json` with its shards when present, else
// `model.safetensors`. Every shard the index names must exist (Io) and be a plain file name in
// `dir` (FileFormat: no paths, no ".."), every tensor the index lists must be in the shard it
// names and no tensor may be in two shards (FileFormat); an index that is not the expected JSON
// is a Json error. Each shard is mapped once. Tensors a shard holds beyond the index are kept.
WeightMap load_safetensors_dir(const std::filesystem::path& dir);

// Writes tensors (any dtype) as one safetensors file, names sorted, with optional string
// metadata under "__metadata__". Written to a temporary name in the same directory, flushed and
// renamed into place, so readers (and existing mappings) never see a partial file. Errors: Io,
// and Request for names the format cannot hold (empty, "__metadata__", invalid UTF-8).
void save_safetensors(const std::filesystem::path& file, const WeightMap& weights,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace moxin
