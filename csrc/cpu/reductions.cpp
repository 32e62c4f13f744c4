// Bias and normalization-weight norms: ||sum_t g_t||^2 and ||sum_t g_t * xhat_t||^2 per sample.
//
// Memory-bound row reductions. Work item = (sample, chunk of kChunk features): the chunk's sum over the
// sample's valid rows accumulates in double in row order, then its squares are summed; items are added
// per sample in item order (deterministic for any thread count).
#include <algorithm>

#include "common.h"

namespace vigor {
namespace cpu {
namespace {

constexpr long kChunk = 256;

struct AsF32 {
  static double get(const void* p, size_t i) { return static_cast<const float*>(p)[i]; }
};
struct AsBF16 {
  static double get(const void* p, size_t i) { return bf16_to_float(static_cast<const uint16_t*>(p)[i]); }
};
struct AsF16 {
  static double get(const void* p, size_t i) { return f16_to_float(static_cast<const uint16_t*>(p)[i]); }
};

template <class C, bool kProduct>
void row_sum_sq(const void* g, const void* xhat, int64_t T, int64_t d, const Ranges& ranges, float* out) {
  const std::vector<Sample> live = live_samples(ranges, out);
  struct Item {
    size_t sample;
    long f0;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < live.size(); ++i) {
    for (long f0 = 0; f0 < d; f0 += kChunk) items.push_back({i, f0});
  }
  std::vector<double> result(items.size(), 0.0);
  double elements = 0.0;
  for (const Sample& s : live) elements += double(s.n) * double(d);
#pragma omp parallel for schedule(dynamic, 1) if (elements > kParallelMacs / 16)
  for (long it = 0; it < long(items.size()); ++it) {
    const Sample& s = live[items[it].sample];
    const long f0 = items[it].f0;
    const long fw = std::min<long>(kChunk, d - f0);
    double acc[kChunk] = {0.0};
    for (int64_t t = s.start; t < s.start + s.n; ++t) {
      const size_t base = size_t(s.b * T + t) * d + f0;
      for (long f = 0; f < fw; ++f) acc[f] += kProduct ? C::get(g, base + f) * C::get(xhat, base + f) : C::get(g, base + f);
    }
    double sq = 0.0;
    for (long f = 0; f < fw; ++f) sq += acc[f] * acc[f];
    result[it] = sq;
  }
  std::vector<double> per_sample(live.size(), 0.0);
  for (size_t it = 0; it < items.size(); ++it) per_sample[items[it].sample] += result[it];
  for (size_t i = 0; i < live.size(); ++i) out[live[i].b] = float(per_sample[i]);
}

template <bool kProduct>
void dispatch(const void* g, const void* xhat, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out) {
  switch (dtype) {
    case kFloat32:
      return row_sum_sq<AsF32, kProduct>(g, xhat, T, d, ranges, out);
    case kBFloat16:
      return row_sum_sq<AsBF16, kProduct>(g, xhat, T, d, ranges, out);
    case kFloat16:
      return row_sum_sq<AsF16, kProduct>(g, xhat, T, d, ranges, out);
    default:
      elem_size(dtype);  // throws for an unknown code
  }
}

}  // namespace

void bias(const void* g, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out) {
  dispatch<false>(g, nullptr, dtype, T, d, ranges, out);
}

void norm_weight(const void* g, const void* xhat, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out) {
  dispatch<true>(g, xhat, dtype, T, d, ranges, out);
}

}  // namespace cpu
}  // namespace vigor
