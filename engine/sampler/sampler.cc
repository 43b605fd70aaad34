#include "engine/sampler/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"

namespace deft {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

double LogSumExp(std::span<const float> logits) {
  float mx = -INFINITY;
  for (float v : logits) mx = std::max(mx, v);
  // exp in float (a relative error of ~1 ulp per term, below the float the caller returns),
  // summed in double: a double exp per entry cost ~1 ms per 50k-entry row.
  double sum = 0;
  for (float v : logits) sum += std::exp(v - mx);
  return mx + std::log(sum);
}

// First index of the maximum.
int32_t ArgMax(std::span<const float> v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace

absl::Status SamplingParams::Validate(int64_t vocab_size) const {
  auto bad = [](const std::string& msg) { return absl::InvalidArgumentError(msg); };
  if (!(temperature >= 0.f) || !std::isfinite(temperature)) {
    return bad(absl::StrFormat("temperature must be >= 0, got %g", temperature));
  }
  if (top_k < 0) return bad(absl::StrFormat("top_k must be >= 0, got %d", top_k));
  if (!(top_p > 0.f && top_p <= 1.f)) {
    return bad(absl::StrFormat("top_p must be in (0, 1], got %g", top_p));
  }
  if (!(min_p >= 0.f && min_p < 1.f)) {
    return bad(absl::StrFormat("min_p must be in [0, 1), got %g", min_p));
  }
  if (!(repetition_penalty > 0.f) || !std::isfinite(repetition_penalty)) {
    return bad(absl::StrFormat("repetition_penalty must be > 0, got %g", repetition_penalty));
  }
  if (!(frequency_penalty >= -2.f && frequency_penalty <= 2.f)) {
    return bad(absl::StrFormat("frequency_penalty must be in [-2, 2], got %g", frequency_penalty));
  }
  if (!(presence_penalty >= -2.f && presence_penalty <= 2.f)) {
    return bad(absl::StrFormat("presence_penalty must be in [-2, 2], got %g", presence_penalty));
  }
  if (max_tokens < 1) return bad(absl::StrFormat("max_tokens must be >= 1, got %d", max_tokens));
  if (top_logprobs < 0 || top_logprobs > 20) {
    return bad(absl::StrFormat("top_logprobs must be in [0, 20], got %d", top_logprobs));
  }
  for (int32_t id : stop_token_ids) {
    if (id < 0 || id >= vocab_size) {
      return bad(
          absl::StrFormat("stop_token_ids: %d is outside the vocabulary [0, %d)", id, vocab_size));
    }
  }
  for (const std::string& s : stop_strings) {
    if (s.empty()) return bad("stop_strings: empty stop string");
  }
  return absl::OkStatus();
}

double Sampler::Uniform(uint64_t seed, uint64_t step) {
  uint64_t bits = SplitMix64(SplitMix64(seed) ^ (step * 0xD1B54A32D192ED03ull));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

Sampler::Sampler(const SamplingParams& params, std::span<const int32_t> prompt) : params_(params) {
  if (params_.repetition_penalty != 1.f) {
    for (int32_t id : prompt) EntryCount(id);
  }
}

float LogSoftmaxAt(std::span<const float> logits, int32_t id) {
  return static_cast<float>(logits[id] - LogSumExp(logits));
}

std::vector<TokenLogprob> TopLogprobs(std::span<const float> logits, int32_t n) {
  n = std::min<int32_t>(n, static_cast<int32_t>(logits.size()));
  if (n <= 0) return {};
  std::vector<int32_t> idx(logits.size());
  std::iota(idx.begin(), idx.end(), 0);
  auto better = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), better);
  double lse = LogSumExp(logits);
  std::vector<TokenLogprob> out(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) out[i] = {idx[i], static_cast<float>(logits[idx[i]] - lse)};
  return out;
}

namespace {

// Reorders `idx` so that the shortest prefix of the order `better` whose weight sum (work
// values of its elements, summed as doubles) satisfies `done` comes first, and returns its
// length; idx.size() + 1 when even the whole does not. Weighted quickselect: partition around
// a pivot, recurse into the side holding the boundary (expected O(size)). `done` must be
// monotone in the sum (weights are >= 0).
template <typename Better, typename Done>
size_t SelectPrefix(std::span<int32_t> idx, Better better, Done done,
                    const std::vector<float>& work) {
  size_t begin = 0, end = idx.size();
  double acc = 0;  // weight of idx[0, begin): all before the range, in any order
  while (end - begin > 1) {
    // Median of three by the order as the pivot, moved to the front of the range.
    const size_t mid = begin + (end - begin) / 2;
    int32_t a = idx[begin], b = idx[mid], c = idx[end - 1];
    const int32_t pivot = better(a, b) ? (better(b, c) ? b : (better(a, c) ? c : a))
                                       : (better(a, c) ? a : (better(b, c) ? c : b));
    auto first = idx.begin() + static_cast<std::ptrdiff_t>(begin);
    auto last = idx.begin() + static_cast<std::ptrdiff_t>(end);
    auto split = std::partition(first, last, [&](int32_t i) { return better(i, pivot); });
    auto at = std::find(split, last, pivot);  // the pivot itself, first of the rest
    std::iter_swap(split, at);
    double before = 0;
    for (auto it = first; it != split; ++it) before += work[*it];
    const size_t pos = static_cast<size_t>(split - idx.begin());
    if (pos > begin && done(acc + before)) {
      end = pos;  // the boundary is among the better ones
    } else if (done(acc + before + work[pivot])) {
      return pos + 1;
    } else {
      acc += before + work[pivot];
      begin = pos + 1;
    }
  }
  if (end - begin == 1 && done(acc + work[idx[begin]])) return begin + 1;
  return idx.size() + 1;
}

// The last element of `idx` in the order `better` (the worst).
template <typename Better>
int32_t LastOf(std::span<const int32_t> idx, Better better) {
  return *std::max_element(idx.begin(), idx.end(), better);
}

}  // namespace

SampledToken Sampler::Sample(std::span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  const SamplingParams& p = params_;
  work_.assign(logits.begin(), logits.end());
  // Each entry on its own (ids are unique): repetition (every entry), then frequency and
  // presence by count, with one fma (not a product and a sum the compiler may or may not
  // contract): the GPU sampler rounds the same way (kernels/model/sampling.h).
  const bool by_count = p.frequency_penalty != 0.f || p.presence_penalty != 0.f;
  for (size_t e = 0; e < entry_ids_.size(); ++e) {
    float& v = work_[entry_ids_[e]];
    if (p.repetition_penalty != 1.f) {
      v = v > 0 ? v / p.repetition_penalty : v * p.repetition_penalty;
    }
    if (by_count && entry_counts_[e] > 0) {
      v -= std::fma(p.frequency_penalty, static_cast<float>(entry_counts_[e]), p.presence_penalty);
    }
  }

  int32_t chosen;
  double raw_total = 0;  // > 0: the raw logits' softmax sum, relative to raw_max
  float raw_max = 0.f;
  if (p.temperature == 0.f) {
    chosen = ArgMax(work_);
  } else {
    // Softmax over the tempered logits.
    const float inv_t = 1.f / p.temperature;
    float mx = -INFINITY;
    for (float v : work_) mx = std::max(mx, v);
    double total = 0;
    for (float& v : work_) {
      v = std::exp((v - mx) * inv_t);
      total += v;
    }
    const bool raw = p.temperature == 1.f && p.repetition_penalty == 1.f &&
                     p.frequency_penalty == 0.f && p.presence_penalty == 0.f;
    if (raw) {
      raw_total = total;
      raw_max = mx;
    }
    // Candidates in the order (prob desc, id asc), never sorted: each prefix boundary is found
    // by a weighted quickselect (expected O(vocab)); a full sort of a 128k vocabulary took
    // 37 ms per row at top_p = 1.
    order_.resize(static_cast<size_t>(vocab));
    std::iota(order_.begin(), order_.end(), 0);
    auto better = [&](int32_t a, int32_t b) {
      return work_[a] > work_[b] || (work_[a] == work_[b] && a < b);
    };
    size_t n = order_.size();
    if (p.top_k > 0 && p.top_k < vocab) {
      std::nth_element(order_.begin(), order_.begin() + (p.top_k - 1), order_.end(), better);
      n = static_cast<size_t>(p.top_k);
    }
    // top_p = 1 keeps every candidate (a prefix reaching the total can stop short of the last
    // candidate only by p summing below the total's fp64 rounding: never drawn).
    if (p.top_p < 1.f) {
      const double target = p.top_p * total;
      n = std::min(n, SelectPrefix(std::span(order_.data(), n), better,
                                   [&](double sum) { return sum >= target; }, work_));
    }
    // min-p relative to the most likely token (at least that one stays).
    if (p.min_p > 0.f) {
      const int32_t top = *std::min_element(order_.begin(), order_.begin() + n, better);
      const float floor = p.min_p * work_[top];
      n = static_cast<size_t>(
          std::partition(order_.begin(), order_.begin() + n,
                         [&](int32_t i) { return i == top || work_[i] >= floor; }) -
          order_.begin());
    }
    double kept = 0;
    for (size_t i = 0; i < n; ++i) kept += work_[order_[i]];
    const double u = Uniform(p.seed, static_cast<uint64_t>(step_)) * kept;
    // The first candidate whose running sum exceeds u; the last one when rounding leaves none.
    const size_t m = SelectPrefix(std::span(order_.data(), n), better,
                                  [&](double sum) { return u < sum; }, work_);
    chosen = LastOf(std::span<const int32_t>(order_.data(), std::min(m, n)), better);
  }

  // At temperature 1 without penalties work_ already holds exp(logit - max) and total its sum.
  SampledToken out =
      Record(chosen, raw_total > 0
                         ? static_cast<float>(logits[chosen] - (raw_max + std::log(raw_total)))
                         : LogSoftmaxAt(logits, chosen));
  if (p.top_logprobs > 0) out.top = TopLogprobs(logits, p.top_logprobs);
  return out;
}

bool Sampler::Plain() const {
  return params_.repetition_penalty == 1.f && params_.frequency_penalty == 0.f &&
         params_.presence_penalty == 0.f;
}

int32_t& Sampler::EntryCount(int32_t id) {
  auto [it, inserted] = entry_of_.try_emplace(id, static_cast<int32_t>(entry_ids_.size()));
  if (inserted) {
    entry_ids_.push_back(id);
    entry_counts_.push_back(0);
  }
  return entry_counts_[static_cast<size_t>(it->second)];
}

void Sampler::AppendPenaltyEntries(std::vector<int32_t>* ids, std::vector<int32_t>* counts) const {
  ids->insert(ids->end(), entry_ids_.begin(), entry_ids_.end());
  counts->insert(counts->end(), entry_counts_.begin(), entry_counts_.end());
}

SampledToken Sampler::Record(int32_t id, float logprob) {
  if (!Plain()) ++EntryCount(id);
  ++step_;
  SampledToken out;
  out.id = id;
  out.logprob = logprob;
  return out;
}

}  // namespace deft
