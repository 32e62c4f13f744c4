// The fused LM head's elementwise work on an fp32 logits chunk z [n, cols] (row stride ld, unit column
// stride), for vigor_kernels/cpp_head.py; the GEMMs around it and the tiling stay with torch
// (vigor_kernels/torch_backend/head.py), exactly as for the Triton kernels.
//
// head_finish_stats: per row, z <- f(z + bias) in place (the ISA copy's head_stats_row), then its max, sum of
//   exp(z - max) and sum of z (per-lane double sums), and the logit at column targets[t] - v0 (0 when the
//   target is outside the chunk).
// head_to_grad: per row, z <- w_t (exp(z - lse_t) - [v = y_t]) * scale * (1 - (z / softcap)^2) in place, a raw
//   (recomputed) chunk transformed first.
// Rows are independent and cost the same: a static split of the rows over the OpenMP threads; each row is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#include "common.h"

namespace vigor {
namespace cpu {
namespace {

// Below this many elements the chunk runs on the calling thread (see kParallelMacs; an element costs two
// exps' worth of arithmetic at most, a few dozen flops).
constexpr double kParallelElems = kParallelMacs / 64;

// The target's column in a chunk starting at v0 with `cols` columns, or -1 (no overflow for any target).
inline long local_column(int64_t target, int64_t v0, int64_t cols) {
  return target >= v0 && target - v0 < cols ? long(target - v0) : -1;
}

// The chunk's bias as fp32: an fp32 bias as is, a bf16 / fp16 one widened once here (exactly; cols values,
// before the parallel region) rather than once per row in the row loops.
const float* fp32_bias(const void* bias, int dtype, int64_t cols, std::vector<float>& widened) {
  if (bias == nullptr) return nullptr;
  elem_size(dtype);  // throws for an unknown code
  if (dtype == kFloat32) return static_cast<const float*>(bias);
  widened.resize(size_t(cols));
  for (int64_t v = 0; v < cols; ++v) widened[size_t(v)] = load_as_float(bias, dtype, size_t(v));
  return widened.data();
}

}  // namespace

void head_finish_stats(float* z, int64_t n, int64_t cols, int64_t ld, const void* bias, int bias_dtype, float scale,
                       bool has_softcap, float softcap, const int64_t* targets, int64_t v0, float* max_out,
                       double* sum_exp_out, float* target_out, double* sum_z_out) {
  if (n <= 0 || cols <= 0) return;
  std::vector<float> widened;
  const HeadTransform f{fp32_bias(bias, bias_dtype, cols, widened), scale, has_softcap, softcap};
  const IsaKernels& k = isa_kernels();
#pragma omp parallel for schedule(static) if (double(n) * double(cols) > kParallelElems)
  for (int64_t t = 0; t < n; ++t) {
    float* row = z + t * ld;
    const HeadRowStats st = k.head_stats_row(row, long(cols), f);
    max_out[t] = st.max;
    sum_exp_out[t] = st.sum_exp;
    const long col = local_column(targets[t], v0, cols);
    target_out[t] = col >= 0 ? row[col] : 0.0f;
    if (sum_z_out != nullptr) sum_z_out[t] = st.sum_z;
  }
}

void head_to_grad(float* z, int64_t n, int64_t cols, int64_t ld, const void* bias, int bias_dtype, bool raw,
                  float scale, bool has_softcap, float softcap, const float* lse, const float* w,
                  const int64_t* targets, int64_t v0) {
  if (n <= 0 || cols <= 0) return;
  std::vector<float> widened;
  const HeadTransform f{raw ? fp32_bias(bias, bias_dtype, cols, widened) : nullptr, scale, has_softcap, softcap};
  const IsaKernels& k = isa_kernels();
#pragma omp parallel for schedule(static) if (double(n) * double(cols) > kParallelElems)
  for (int64_t t = 0; t < n; ++t) {
    k.head_grad_row(z + t * ld, long(cols), f, raw, lse[t], w[t], local_column(targets[t], v0, cols));
  }
}

}  // namespace cpu
}  // namespace vigor
