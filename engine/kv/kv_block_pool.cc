#include "engine/kv/kv_block_pool.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "absl/strings/str_cat.h"

namespace deft {
namespace {

// A refcount call on a block that is not allocated: only a bug in the caller gets here, and going
// on would put the block on the free list twice or hand out shared storage.
[[noreturn]] void DieBadBlock(const char* op, int32_t block, int64_t num_blocks, int32_t count) {
  std::fprintf(stderr, "KvBlockPool::%s(%d): block is not allocated (pool of %lld, refcount %d)\n",
               op, block, static_cast<long long>(num_blocks), count);
  std::abort();
}

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

// The default storage: host fp32 in KvBlockPool's documented layout.
class HostKvStorage : public KvStorage {
 public:
  HostKvStorage(const KvPoolShape& shape, int64_t num_blocks)
      : shape_(shape), num_blocks_(num_blocks) {}
  // RESOURCE_EXHAUSTED when `floats` cannot be allocated.
  absl::Status Allocate(int64_t floats) {
    try {
      data_.assign(static_cast<size_t>(floats), 0.f);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot allocate KV pool of ", num_blocks_,
                                                       " blocks (", floats * 4, " bytes)"));
    } catch (const std::length_error&) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot allocate KV pool of ", num_blocks_,
                                                       " blocks (", floats * 4, " bytes)"));
    }
    return absl::OkStatus();
  }
  absl::Status CopyBlock(int32_t src, int32_t dst) override {
    // One layer's K and V of a block are contiguous: [kv][slot][kv_head][head_dim].
    const int64_t block_floats = 2 * int64_t{shape_.block_tokens} * kv_dim();
    for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
      std::memcpy(Block(layer, dst), Block(layer, src), block_floats * sizeof(float));
    }
    return absl::OkStatus();
  }
  absl::Status CopySlots(std::span<const int32_t> src, std::span<const int32_t> dst) override {
    const int64_t bt = shape_.block_tokens;
    for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
      for (size_t i = 0; i < src.size(); ++i) {
        for (int kv = 0; kv < 2; ++kv) {
          float* from = Block(layer, src[i] / bt) + (kv * bt + src[i] % bt) * kv_dim();
          float* to = Block(layer, dst[i] / bt) + (kv * bt + dst[i] % bt) * kv_dim();
          std::memcpy(to, from, kv_dim() * sizeof(float));
        }
      }
    }
    return absl::OkStatus();
  }
  float* host_data() override { return data_.data(); }
  int64_t bytes_per_token() const override { return shape_.bytes_per_token(); }

 private:
  int64_t kv_dim() const { return shape_.num_kv_heads * shape_.head_dim; }
  float* Block(int64_t layer, int64_t block) {
    return data_.data() + (layer * num_blocks_ + block) * 2 * shape_.block_tokens * kv_dim();
  }
  KvPoolShape shape_;
  int64_t num_blocks_;
  std::vector<float> data_;
};

}  // namespace

KvBlockPool::KvBlockPool(const KvPoolShape& shape, int64_t num_blocks)
    : shape_(shape), num_blocks_(num_blocks) {}

absl::StatusOr<std::unique_ptr<KvBlockPool>> KvBlockPool::Create(const KvPoolShape& shape,
                                                                 int64_t num_blocks) {
  return Create(shape, num_blocks, KvStorageFactory());
}

absl::StatusOr<std::unique_ptr<KvBlockPool>> KvBlockPool::Create(const KvPoolShape& shape,
                                                                 int64_t num_blocks,
                                                                 const KvStorageFactory& storage) {
  if (shape.num_layers <= 0 || shape.num_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.block_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV pool shape must be positive: num_layers=", shape.num_layers, " num_kv_heads=",
        shape.num_kv_heads, " head_dim=", shape.head_dim, " block_tokens=", shape.block_tokens));
  }
  if (num_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool needs at least one block, got num_blocks=", num_blocks));
  }
  if (num_blocks > kMaxSlots / shape.block_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("KV pool of ", num_blocks, " blocks of ",
                                                   shape.block_tokens, " tokens exceeds ",
                                                   kMaxSlots, " slots (slot ids are int32)"));
  }
  // floats = num_layers * num_blocks * 2 * block_tokens * kv_heads * head_dim, and bytes = 4x.
  int64_t floats = shape.num_layers;
  for (int64_t f : {num_blocks, int64_t{2}, int64_t{shape.block_tokens}, shape.num_kv_heads,
                    shape.head_dim, int64_t{4}}) {
    if (MulOverflows(floats, f, &floats)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "KV pool of ", num_blocks, " blocks is too large: its size in bytes overflows int64"));
    }
  }
  floats /= 4;
  std::unique_ptr<KvBlockPool> pool(new KvBlockPool(shape, num_blocks));
  if (storage) {
    auto made = storage(shape, num_blocks);
    if (!made.ok()) return made.status();
    pool->storage_ = std::move(*made);
  } else {
    auto host = std::make_unique<HostKvStorage>(shape, num_blocks);
    if (absl::Status s = host->Allocate(floats); !s.ok()) return s;
    pool->storage_ = std::move(host);
  }
  try {
    pool->refcount_.assign(num_blocks, 0);
    pool->free_list_.reserve(num_blocks);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate the free list of a KV pool of ", num_blocks, " blocks"));
  }
  // LIFO free list, block 0 on top: a fresh pool hands out 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) pool->free_list_.push_back(static_cast<int32_t>(b));
  return pool;
}

int64_t KvBlockPool::BlocksForBytes(const KvPoolShape& shape, int64_t bytes) {
  if (bytes <= 0 || shape.num_layers <= 0 || shape.num_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.block_tokens <= 0) {
    return 0;
  }
  const int64_t max_blocks = kMaxSlots / shape.block_tokens;
  int64_t block_bytes = shape.num_layers;
  for (int64_t f :
       {int64_t{2}, int64_t{shape.block_tokens}, shape.num_kv_heads, shape.head_dim, int64_t{4}}) {
    // One block larger than any int64 byte count: it certainly exceeds `bytes`.
    if (MulOverflows(block_bytes, f, &block_bytes)) return 1;
  }
  const int64_t blocks = bytes / block_bytes;
  if (blocks < 1) return 1;
  return blocks < max_blocks ? blocks : max_blocks;
}

absl::Status KvBlockPool::ExhaustedError() const {
  return absl::ResourceExhaustedError(absl::StrCat("KV pool exhausted (", num_blocks_,
                                                   " blocks of ", shape_.block_tokens, " tokens)"));
}

int32_t KvBlockPool::AllocateLocked() {
  const int32_t block = free_list_.back();
  free_list_.pop_back();
  refcount_[block] = 1;
  return block;
}

void KvBlockPool::ReleaseLocked(int32_t block) {
  if (block < 0 || block >= num_blocks_ || refcount_[block] <= 0) {
    DieBadBlock("Release", block, num_blocks_,
                block >= 0 && block < num_blocks_ ? refcount_[block] : 0);
  }
  if (refcount_[block] == 2) --shared_;
  if (--refcount_[block] == 0) free_list_.push_back(block);
}

absl::StatusOr<int32_t> KvBlockPool::Allocate() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_list_.empty()) return ExhaustedError();
  return AllocateLocked();
}

absl::Status KvBlockPool::AllocateMany(int64_t n, std::vector<int32_t>* out) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", n, " blocks"));
  std::lock_guard<std::mutex> lock(mu_);
  if (static_cast<int64_t>(free_list_.size()) < n) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool exhausted (", num_blocks_, " blocks of ", shape_.block_tokens,
                     " tokens): ", n, " blocks requested, ", free_list_.size(), " free"));
  }
  out->reserve(out->size() + n);
  for (int64_t i = 0; i < n; ++i) out->push_back(AllocateLocked());
  return absl::OkStatus();
}

void KvBlockPool::AddRef(int32_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  if (block < 0 || block >= num_blocks_ || refcount_[block] <= 0) {
    DieBadBlock("AddRef", block, num_blocks_,
                block >= 0 && block < num_blocks_ ? refcount_[block] : 0);
  }
  if (++refcount_[block] == 2) ++shared_;
}

void KvBlockPool::Release(int32_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  ReleaseLocked(block);
}

int32_t KvBlockPool::refcount(int32_t block) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (block < 0 || block >= num_blocks_) return 0;
  return refcount_[block];
}

absl::StatusOr<int32_t> KvBlockPool::MakeWritable(int32_t block) {
  int32_t copy;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (block < 0 || block >= num_blocks_ || refcount_[block] <= 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot make block ", block, " writable: it is not allocated"));
    }
    if (refcount_[block] == 1) return block;
    if (free_list_.empty()) return ExhaustedError();
    copy = AllocateLocked();
  }
  if (absl::Status s = storage_->CopyBlock(block, copy); !s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    ReleaseLocked(copy);
    return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  ReleaseLocked(block);
  return copy;
}

absl::Status KvBlockPool::CopySlots(std::span<const int32_t> src, std::span<const int32_t> dst) {
  if (src.size() != dst.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopySlots: ", src.size(), " sources but ", dst.size(), " destinations"));
  }
  if (src.empty()) return absl::OkStatus();
  return storage_->CopySlots(src, dst);
}

int64_t KvBlockPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_list_.size());
}

int64_t KvBlockPool::shared_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return shared_;
}

}  // namespace deft
