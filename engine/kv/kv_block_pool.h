// A paged pool of fixed-size KV blocks shared by every tree, with reference counts.
//
// The data lives in a KvStorage (kv_storage.h): by default host fp32, layer-major so that one
// layer's pool is one contiguous array:
//   storage[layer][block][kv][slot][kv_head][head_dim], kv 0 = K, 1 = V.
// A backend may supply its own storage (the GPU's is device memory); k()/v() then do not apply.
// A "slot" names one token's place in the pool: slot = block * block_tokens + offset.
//
// Blocks are allocated with refcount 1; AddRef/Release share and free them. A block returns to
// the free list when its count reaches 0. Exhaustion is RESOURCE_EXHAUSTED, never a crash.
//
// Thread safety: Allocate/AddRef/Release/counters are thread-safe (internal mutex). Reading and
// writing K/V data is not synchronized: callers own the blocks they write (the engine writes a
// block only while its refcount is 1, copy-on-write otherwise).
#pragma once

#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/kv/kv_storage.h"

namespace deft {

struct KvPoolShape {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int32_t block_tokens = 16;
  int64_t bytes_per_token() const { return num_layers * 2 * num_kv_heads * head_dim * 4; }
};

class KvBlockPool {
 public:
  // INVALID_ARGUMENT for a non-positive shape or block count, or when num_blocks * block_tokens
  // does not fit the int32 slot ids (kMaxSlots); RESOURCE_EXHAUSTED when the storage size
  // overflows int64 or the memory cannot be allocated. The storage is zero-filled here, so an
  // over-large pool fails now rather than at first touch.
  static absl::StatusOr<std::unique_ptr<KvBlockPool>> Create(const KvPoolShape& shape,
                                                             int64_t num_blocks);
  // Same checks, with the storage made by `storage` (host fp32 when it is empty).
  static absl::StatusOr<std::unique_ptr<KvBlockPool>> Create(const KvPoolShape& shape,
                                                             int64_t num_blocks,
                                                             const KvStorageFactory& storage);
  // Blocks that fit in `bytes` (at least 1 when bytes > 0), capped at the most blocks Create
  // accepts for this block size; 0 when bytes <= 0 or the shape is not positive.
  static int64_t BlocksForBytes(const KvPoolShape& shape, int64_t bytes);
  // Slot ids are int32: a pool holds at most this many token slots.
  static constexpr int64_t kMaxSlots = INT32_MAX;

  const KvPoolShape& shape() const { return shape_; }
  int32_t block_tokens() const { return shape_.block_tokens; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t kv_dim() const { return shape_.num_kv_heads * shape_.head_dim; }

  // A block with refcount 1, or RESOURCE_EXHAUSTED "KV pool exhausted (N blocks of T tokens)".
  absl::StatusOr<int32_t> Allocate();
  // Allocates `n` blocks or none (all-or-nothing), appending them to `out`. INVALID_ARGUMENT
  // for n < 0.
  absl::Status AllocateMany(int64_t n, std::vector<int32_t>* out);
  // REQUIRES: block is allocated (refcount >= 1). Breaking this is a bug in the caller that
  // would corrupt the free list, so it aborts with a message (in every build type).
  void AddRef(int32_t block);
  void Release(int32_t block);
  // 0 for a free block or an id outside [0, num_blocks).
  int32_t refcount(int32_t block) const;

  // Returns `block` itself when its refcount is 1; otherwise a fresh block holding a copy of all
  // of its slots (every layer, K and V), and releases one reference to `block`.
  // RESOURCE_EXHAUSTED (nothing changed) when no block is free; FAILED_PRECONDITION for a block
  // that is not allocated.
  absl::StatusOr<int32_t> MakeWritable(int32_t block);

  int64_t free_blocks() const;
  int64_t used_blocks() const { return num_blocks_ - free_blocks(); }
  // Blocks referenced more than once (shared between nodes or trees).
  int64_t shared_blocks() const;

  // Copies every layer's K and V of slot src[i] into slot dst[i], wherever the data lives
  // (REQUIRES: the caller owns the dst slots; sizes equal). Errors come from the storage.
  absl::Status CopySlots(std::span<const int32_t> src, std::span<const int32_t> dst);
  KvStorage& storage() const { return *storage_; }

  // K or V of one token: [kv_heads * head_dim] floats. REQUIRES: host storage
  // (storage().host_data() != nullptr).
  float* k(int64_t layer, int64_t slot) { return At(layer, slot, 0); }
  float* v(int64_t layer, int64_t slot) { return At(layer, slot, 1); }
  const float* k(int64_t layer, int64_t slot) const { return At(layer, slot, 0); }
  const float* v(int64_t layer, int64_t slot) const { return At(layer, slot, 1); }

 private:
  KvPoolShape shape_;
  int64_t num_blocks_ = 0;
  std::unique_ptr<KvStorage> storage_;
  mutable std::mutex mu_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_list_;
  int64_t shared_ = 0;  // blocks with refcount > 1, kept up to date by every count change

  KvBlockPool(const KvPoolShape& shape, int64_t num_blocks);
  int32_t AllocateLocked();  // REQUIRES: mu_ held, free_list_ not empty
  void ReleaseLocked(int32_t block);
  absl::Status ExhaustedError() const;

  float* At(int64_t layer, int64_t slot, int kv) const {
    const int64_t bt = shape_.block_tokens, block = slot / bt, off = slot % bt;
    return storage_->host_data() + (((layer * num_blocks_ + block) * 2 + kv) * bt + off) * kv_dim();
  }
};

}  // namespace deft
