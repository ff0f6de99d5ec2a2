#include "moxin/config.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moxin/errors.h"

namespace moxin {

namespace {

using nlohmann::json;

// Upper bounds that no real model approaches; they keep hostile configs from driving
// allocations or index arithmetic into overflow.
constexpr int64_t kMaxWidth = 1 << 16;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxVocab = 1 << 22;

void require_range(const std::string& field, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi)
    throw InvalidConfigError(field, "must be in [" + std::to_string(lo) + ", " +
                                        std::to_string(hi) + "], got " + std::to_string(value));
}

int64_t get_int(const json& obj, const char* key, int64_t fallback, const std::string& scope) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_number_integer() && !it->is_number_unsigned())
    throw InvalidConfigError(scope + key, "must be an integer, got " + it->dump());
  if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(INT64_MAX))
    throw InvalidConfigError(scope + key, "is too large");
  return it->get<int64_t>();
}

float get_float(const json& obj, const char* key, float fallback, const std::string& scope) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_number()) throw InvalidConfigError(scope + key, "must be a number, got " + it->dump());
  return it->get<float>();
}

bool get_bool(const json& obj, const char* key, bool fallback, const std::string& scope) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) throw InvalidConfigError(scope + key, "must be true or false");
  return it->get<bool>();
}

MistralConfig parse_text_config(const json& obj) {
  const std::string scope = "text_config.";
  MistralConfig c;
  c.hidden_size = get_int(obj, "hidden_size", c.hidden_size, scope);
  c.num_hidden_layers = get_int(obj, "num_hidden_layers", c.num_hidden_layers, scope);
  c.num_attention_heads = get_int(obj, "num_attention_heads", c.num_attention_heads, scope);
  c.num_key_value_heads = get_int(obj, "num_key_value_heads", c.num_key_value_heads, scope);
  c.intermediate_size = get_int(obj, "intermediate_size", c.intermediate_size, scope);
  c.vocab_size = get_int(obj, "vocab_size", c.vocab_size, scope);
  c.rms_norm_eps = get_float(obj, "rms_norm_eps", c.rms_norm_eps, scope);
  c.rope_theta = get_float(obj, "rope_theta", c.rope_theta, scope);
  // transformers 5 writes the base inside rope_parameters; the flat key is the older form.
  const auto rope = obj.find("rope_parameters");
  if (rope != obj.end() && rope->is_object()) {
    const auto type = rope->find("rope_type");
    if (type != rope->end() && !(type->is_string() && type->get<std::string>() == "default"))
      throw InvalidConfigError(scope + "rope_parameters.rope_type",
                               "only the default rotary embedding is supported, got " + type->dump());
    c.rope_theta = get_float(*rope, "rope_theta", c.rope_theta, scope + "rope_parameters.");
  }
  c.tie_word_embeddings = get_bool(obj, "tie_word_embeddings", c.tie_word_embeddings, scope);
  c.head_dim = get_int(obj, "head_dim", c.head_dim, scope);
  c.max_position_embeddings =
      get_int(obj, "max_position_embeddings", c.max_position_embeddings, scope);
  // transformers writes null for "no sliding window".
  const auto window = obj.find("sliding_window");
  if (window != obj.end()) c.sliding_window = window->is_null() ? 0 : get_int(obj, "sliding_window", 0, scope);
  return c;
}

}  // namespace

void MistralConfig::validate() const {
  const std::string s = "text_config.";
  require_range(s + "hidden_size", hidden_size, 1, kMaxWidth);
  require_range(s + "num_hidden_layers", num_hidden_layers, 1, kMaxLayers);
  require_range(s + "num_attention_heads", num_attention_heads, 1, hidden_size);
  require_range(s + "num_key_value_heads", num_key_value_heads, 1, num_attention_heads);
  if (num_attention_heads % num_key_value_heads != 0)
    throw InvalidConfigError(s + "num_key_value_heads",
                             "must divide num_attention_heads (" +
                                 std::to_string(num_attention_heads) + "), got " +
                                 std::to_string(num_key_value_heads));
  if (head_dim == 0 && hidden_size % num_attention_heads != 0)
    throw InvalidConfigError(s + "num_attention_heads", "must divide hidden_size");
  require_range(s + "head_dim", resolved_head_dim(), 2, 1024);
  if (resolved_head_dim() % 2 != 0)
    throw InvalidConfigError(s + "head_dim", "must be even for rotary embeddings");
  require_range(s + "intermediate_size", intermediate_size, 1, 8 * kMaxWidth);
  require_range(s + "vocab_size", vocab_size, 1, kMaxVocab);
  if (!(rms_norm_eps > 0.0f) || !std::isfinite(rms_norm_eps))
    throw InvalidConfigError(s + "rms_norm_eps", "must be a positive number");
  if (!(rope_theta > 0.0f) || !std::isfinite(rope_theta))
    throw InvalidConfigError(s + "rope_theta", "must be a positive number");
  require_range(s + "max_position_embeddings", max_position_embeddings, 1, int64_t(1) << 24);
  require_range(s + "sliding_window", sliding_window, 0, int64_t(1) << 24);
}

ViTConfig ViTConfig::dinov2_large() { return ViTConfig{}; }

ViTConfig ViTConfig::siglip_so400m() {
  ViTConfig c;
  c.embed_dim = 1152;
  c.depth = 27;
  c.num_heads = 16;
  c.mlp_hidden_dim = 4304;
  c.has_cls_token = false;
  c.num_registers = 0;
  c.has_layer_scale = false;
  return c;
}

void ViTConfig::validate(const std::string& name) const {
  require_range(name + ".embed_dim", embed_dim, 1, kMaxWidth);
  require_range(name + ".depth", depth, 2, kMaxLayers);  // features come from block depth-2
  require_range(name + ".num_heads", num_heads, 1, embed_dim);
  if (embed_dim % num_heads != 0)
    throw InvalidConfigError(name + ".num_heads", "must divide embed_dim");
  require_range(name + ".mlp_hidden_dim", mlp_hidden_dim, 1, 8 * kMaxWidth);
  require_range(name + ".patch_size", patch_size, 1, 1024);
  require_range(name + ".image_size", image_size, patch_size, 8192);
  if (image_size % patch_size != 0)
    throw InvalidConfigError(name + ".image_size", "must be a multiple of the patch size " +
                                                       std::to_string(patch_size));
  require_range(name + ".num_registers", num_registers, 0, 1024);
}

VLMConfig VLMConfig::parse(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    throw_error(ErrorKind::Json, source + ": " + e.what());
  }
  if (!root.is_object()) throw_error(ErrorKind::Json, source + ": top level is not an object");
  VLMConfig c;
  const auto text = root.find("text_config");
  if (text != root.end()) {
    if (!text->is_object()) throw InvalidConfigError("text_config", "must be an object");
    c.text_config = parse_text_config(*text);
  }
  const auto sizes = root.find("image_sizes");
  if (sizes != root.end()) {
    if (sizes->is_array() && sizes->size() == 2 && (*sizes)[0].is_number_integer() &&
        (*sizes)[1].is_number_integer()) {
      c.image_sizes = {(*sizes)[0].get<int64_t>(), (*sizes)[1].get<int64_t>()};
    } else if (sizes->is_number_integer()) {
      c.image_sizes = {sizes->get<int64_t>(), sizes->get<int64_t>()};
    } else {
      throw InvalidConfigError("image_sizes", "must be [height, width], got " + sizes->dump());
    }
  }
  c.image_token_index = get_int(root, "image_token_index", c.image_token_index, "");
  c.pad_token_id = get_int(root, "pad_token_id", c.pad_token_id, "");
  const auto ids = root.find("timm_model_ids");
  if (ids != root.end() && ids->is_array())
    for (const auto& id : *ids)
      if (id.is_string()) c.timm_model_ids.push_back(id.get<std::string>());
  const auto quant = root.find("quantization");
  if (quant != root.end() && !quant->is_null()) {
    if (!quant->is_object()) throw InvalidConfigError("quantization", "must be an object");
    QuantizationInfo q;
    q.group_size = int(get_int(*quant, "group_size", q.group_size, "quantization."));
    q.bits = int(get_int(*quant, "bits", q.bits, "quantization."));
    c.quantization = q;
  }
  c.validate();
  return c;
}

VLMConfig VLMConfig::load(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw_error(ErrorKind::Io, file.string() + ": cannot open: " + std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  return parse(text.str(), file.string());
}

void VLMConfig::validate() const {
  text_config.validate();
  require_range("image_sizes[0]", image_sizes[0], 1, 8192);
  require_range("image_sizes[1]", image_sizes[1], 1, 8192);
  if (quantization) {
    const int bits = quantization->bits, group = quantization->group_size;
    if (bits < 2 || bits > 8 || bits == 7)
      throw InvalidConfigError("quantization.bits", "must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(bits));
    if (group != 32 && group != 64 && group != 128)
      throw InvalidConfigError("quantization.group_size", "must be 32, 64 or 128, got " + std::to_string(group));
  }
  if (image_sizes[0] != image_sizes[1])
    throw InvalidConfigError("image_sizes", "only square inputs are supported, got " +
                                                std::to_string(image_sizes[0]) + "x" +
                                                std::to_string(image_sizes[1]));
}

}  // namespace moxin
