// Shared plumbing of the CPU ops: ranges, aligned scratch, dtype sizes, OpenMP helpers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa_kernels.h"

namespace vigor {
namespace cpu {

// Per-sample valid rows [start, end) (RowRanges.host on the Python side, already validated there).
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

inline size_t elem_size(int dtype) {
  switch (dtype) {
    case kFloat32:
      return 4;
    case kBFloat16:
    case kFloat16:
      return 2;
    default:
      throw std::invalid_argument("vigor_kernels._C: unknown dtype code " + std::to_string(dtype));
  }
}

inline long pad16(long n) { return (n + 15) / 16 * 16; }

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Below this many multiply-adds a parallel region costs more than it saves (thread wake-up and the
// closing barrier, which on a busy machine can wait a whole scheduler slice): run on the calling thread.
constexpr double kParallelMacs = double(1 << 22);

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// 64-byte aligned float scratch that only grows. Allocated before any parallel region: an allocation
// failure must throw to Python, not terminate inside an OpenMP region. Large buffers ask for transparent
// huge pages: first-touch page faults are costly here (about 1 ms per MiB of 4 KiB pages in a VM).
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(size_t floats) { resize(floats); }
  void resize(size_t floats) {
    if (floats <= size_) return;
    const size_t huge = size_t(2) << 20;
    const size_t align = floats * sizeof(float) >= 2 * huge ? huge : 64;
    const size_t bytes = (floats * sizeof(float) + align - 1) / align * align;
    void* p = std::aligned_alloc(align, bytes);
    if (p == nullptr) throw std::bad_alloc();
#ifdef __linux__
    if (align == huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    data_.reset(static_cast<float*>(p));
    size_ = floats;
  }
  void release() {
    data_.reset();
    size_ = 0;
  }
  float* data() const { return data_.get(); }
  size_t bytes() const { return size_ * sizeof(float); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  size_t size_ = 0;
};

// Scratch kept by the calling thread between calls (slot 0: packed operands, slot 1: per-thread tiles),
// so that repeated calls do not fault the same pages in again. At most max(pack budget, one sample's
// pack) stays allocated; release_scratch() frees it.
enum ScratchSlot { kPackSlot = 0, kTileSlot = 1 };
Scratch& cached_scratch(ScratchSlot slot);
void release_scratch();
// Called at the end of an op: frees the pack if one oversized sample made it larger than the budget.
void trim_scratch();

struct Sample {
  int64_t b;      // index in the batch
  int64_t start;  // first valid row
  int64_t n;      // valid rows
};

// Samples with at least one valid row. When out is given (ops returning one value per sample), out[b] = 0
// for every sample first, so samples without rows read as 0.
inline std::vector<Sample> live_samples(const Ranges& ranges, float* out = nullptr) {
  std::vector<Sample> live;
  for (size_t b = 0; b < ranges.size(); ++b) {
    if (out != nullptr) out[b] = 0.0f;
    const int64_t n = ranges[b].second - ranges[b].first;
    if (n > 0) live.push_back({int64_t(b), ranges[b].first, n});
  }
  return live;
}

// Consecutive groups of samples whose scratch (bytes_of(index)) fits the budget; a sample above it is a group
// alone. Packing a group at once gives the threads work from several short samples together while
// the memory stays bounded.
template <class BytesOf>
std::vector<std::pair<size_t, size_t>> waves(const std::vector<Sample>& samples, BytesOf bytes_of, size_t budget) {
  std::vector<std::pair<size_t, size_t>> out;
  size_t i = 0;
  while (i < samples.size()) {
    size_t j = i, used = 0;
    while (j < samples.size() && (j == i || used + bytes_of(j) <= budget)) used += bytes_of(j++);
    out.emplace_back(i, j);
    i = j;
  }
  return out;
}

// Tunables of the blocked kernels (the largest block sizes; linear.cpp shrinks them when a call has too
// few work items for the threads). Two ghost tiles or one direct tile per thread stay in a 2 MiB L2.
struct Tuning {
  long ghost_block = 288;     // rows per Gram block (multiple of 16; of 48 for whole panels)
  long ghost_kc = 128;        // features per k step of a Gram block (a 48 x 128 B panel = 24 KiB of L1)
  long direct_block_m = 480;  // output features per G^T X block (multiple of 16)
  long direct_block_n = 288;  // input features per G^T X block (multiple of 16)
  long direct_kc = 128;       // tokens per k step of a G^T X block
  size_t pack_budget = size_t(128) << 20;  // bytes of packed operands per wave, kept between calls ($VIGOR_CPP_PACK_MB)
};
Tuning& tuning();

// (rows, cols) of the C blocks of a G^T X-shaped product over `samples` samples with pout x pin outputs
// each: the given maxima, shrunk while the threads would get too few blocks.
std::pair<long, long> direct_blocks_for(size_t samples, long pout, long pin, long bm, long bn);

void linear_ghost(const void* x, const void* g, int dtype, int64_t T, int64_t d_in, int64_t d_out,
                  const Ranges& ranges, float* out);
void linear_direct(const void* x, const void* g, int dtype, int64_t T, int64_t d_in, int64_t d_out,
                   const Ranges& ranges, float* out);
void bias(const void* g, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out);
void norm_weight(const void* g, const void* xhat, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out);
void embedding(const int64_t* ids, const void* g, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out);
void tied_head_rows(const int64_t* ids, const void* h, const void* g_head, int dtype, int64_t T, int64_t d,
                    int64_t vocab, const Ranges& ranges, float* out);
// The fused LM head's elementwise kernels on an fp32 logits chunk (head.cpp); bias: nullptr or [cols] of
// bias_dtype; sum_z_out may be nullptr.
void head_finish_stats(float* z, int64_t n, int64_t cols, int64_t ld, const void* bias, int bias_dtype, float scale,
                       bool has_softcap, float softcap, const int64_t* targets, int64_t v0, float* max_out,
                       double* sum_exp_out, float* target_out, double* sum_z_out);
void head_to_grad(float* z, int64_t n, int64_t cols, int64_t ld, const void* bias, int bias_dtype, bool raw,
                  float scale, bool has_softcap, float softcap, const float* lse, const float* w,
                  const int64_t* targets, int64_t v0);

}  // namespace cpu
}  // namespace vigor

namespace vigor {
namespace cpu {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    const float mag = float(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24
    std::memcpy(&u, &mag, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Element i of a float32 / bfloat16 / float16 array, as float.
inline float load_as_float(const void* p, int dtype, size_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kBFloat16 ? bf16_to_float(h) : f16_to_float(h);
}

}  // namespace cpu
}  // namespace vigor
