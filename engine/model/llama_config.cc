#include "engine/model/llama_config.h"

#include <cmath>

namespace deft {

std::vector<float> Llama3RopeFreqFactors(int64_t rope_dim, float theta, float factor,
                                         float low_freq_factor, float high_freq_factor,
                                         int64_t original_context) {
  // Same rule as HF's _compute_llama3_parameters, written as a divisor of each base frequency:
  // short wavelengths keep their frequency, long ones are slowed by `factor`, and the band in
  // between interpolates smoothly.
  const double low_freq_wavelen = static_cast<double>(original_context) / low_freq_factor;
  const double high_freq_wavelen = static_cast<double>(original_context) / high_freq_factor;
  std::vector<float> factors(static_cast<size_t>(rope_dim / 2));
  for (int64_t i = 0; i < rope_dim / 2; ++i) {
    double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / rope_dim);
    double wavelen = 2.0 * M_PI / inv_freq;
    double scale;  // multiplier of inv_freq
    if (wavelen < high_freq_wavelen) {
      scale = 1.0;
    } else if (wavelen > low_freq_wavelen) {
      scale = 1.0 / factor;
    } else {
      double smooth =
          (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      scale = (1.0 - smooth) / factor + smooth;
    }
    factors[i] = static_cast<float>(1.0 / scale);
  }
  return factors;
}

std::vector<double> RopeInverseFrequencies(const LlamaConfig& c) {
  std::vector<double> inv(static_cast<size_t>(c.rope_dim / 2));
  for (int64_t i = 0; i < c.rope_dim / 2; ++i) {
    inv[i] = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / c.rope_dim);
    if (!c.rope_freq_factors.empty()) inv[i] /= c.rope_freq_factors[i];
  }
  return inv;
}

}  // namespace deft
