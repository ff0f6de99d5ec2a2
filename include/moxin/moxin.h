// moxin-vlm: the whole public API.
#pragma once

#include "moxin/config.h"
#include "moxin/dtype.h"
#include "moxin/errors.h"
#include "moxin/generate.h"
#include "moxin/image.h"
#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "moxin/quantize.h"
#include "moxin/tensor.h"
#include "moxin/tokenizer.h"
#include "moxin/weights.h"
