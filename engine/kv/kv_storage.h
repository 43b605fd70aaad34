// Where a KvBlockPool keeps its K/V data: the pool owns allocation and reference counts, a
// KvStorage owns the bytes. The CPU backend uses host fp32 storage (the pool's own default); the
// GPU backend (engine/gpu) supplies device fp16/bf16 storage. Copies go through the storage so
// that copy-on-write and kept draft tokens work wherever the data lives.
//
// Thread safety: as KvBlockPool's data (callers own the blocks they copy into).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace deft {

struct KvPoolShape;

class KvStorage {
 public:
  virtual ~KvStorage() = default;
  // Copies every layer's K and V of block `src` into block `dst` (REQUIRES: src != dst).
  virtual absl::Status CopyBlock(int32_t src, int32_t dst) = 0;
  // Copies every layer's K and V of slot src[i] into slot dst[i] (REQUIRES: equal sizes; no dst
  // is also a src).
  virtual absl::Status CopySlots(std::span<const int32_t> src, std::span<const int32_t> dst) = 0;
  // The host fp32 array [layer][block][kv][slot in block][kv_head][head_dim] (KvBlockPool's
  // documented layout), or nullptr when the data lives on a device.
  virtual float* host_data() { return nullptr; }
  // Bytes one token takes in this storage (all layers, K and V).
  virtual int64_t bytes_per_token() const = 0;
};

// Makes the storage of a pool of `num_blocks` blocks of `shape`; zero-filled, or
// RESOURCE_EXHAUSTED when it cannot be allocated.
using KvStorageFactory = std::function<absl::StatusOr<std::unique_ptr<KvStorage>>(
    const KvPoolShape& shape, int64_t num_blocks)>;

}  // namespace deft
