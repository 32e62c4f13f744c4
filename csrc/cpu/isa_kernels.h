// Compute kernels compiled once per x86 ISA level (isa_*.cpp) and picked at run time (select.cpp).
//
// Everything here works on "sliver-packed" fp32 operands: a matrix M (rows x K) is stored as slivers of
// 16 rows; element (r, k) sits at data[(r / 16) * sliver_stride + k * 16 + r % 16]. Rows past the end of
// the matrix are zero in the pack, so kernels never need edge cases in the row direction. The ghost norm
// packs a sample's rows (K = features), the direct norm packs its feature columns (K = tokens); the
// same micro-kernel then computes both X X^T tiles and G^T X tiles.
//
// The ISA translation units must not instantiate std:: templates: inline functions with the same name
// compiled under different -march flags would be merged by the linker (ODR), and an AVX-512 copy could
// then run on a machine without it. They only see this header and plain C.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vigor {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Packed {
  const float* data;
  long sliver_stride;  // floats between consecutive slivers of 16 rows
};

// Per-row results of head_stats_row (one row of an LM-head logits chunk).
struct HeadRowStats {
  float max;       // max_v z
  double sum_exp;  // sum_v exp(z - max), each exp in fp32, summed in double
  double sum_z;    // sum_v z in double
};

// The logit transform of the fused LM head: z <- f(z + bias), f(u) = softcap * tanh(scale * u / softcap)
// when has_softcap, else scale * u. bias: nullptr or the chunk's `cols` bias values (fp32).
struct HeadTransform {
  const float* bias;
  float scale;
  bool has_softcap;
  float softcap;
};

struct IsaKernels {
  const char* name;
  int mr;   // rows of a micro-tile (divides 16)
  int nv;   // slivers (16 columns each) of a micro-tile
  // Transposed pack: rows [0, n) of a row-major source (row stride ld elements, dtype) into slivers of
  // 16 rows, k-major over [0, k). Writes slivers [sl0, sl1) of dst (sliver stride k * 16).
  void (*pack_rows)(const void* src, int dtype, long ld, long n, long k, long sl0, long sl1, float* dst);
  // Straight pack: columns [0, cols) of rows [0, n) into slivers of 16 columns, row-major inside a
  // sliver (sliver stride n * 16). Writes rows [t0, t1) of slivers [sl0, sl1).
  void (*pack_cols)(const void* src, int dtype, long ld, long n, long cols, long t0, long t1, long sl0, long sl1,
                    float* dst);
  // C[r0 : r0 + rows, c0 : c0 + cols] (+)= sum_{k in [k0, k0 + kc)} A(r, k) B(c, k), C row-major with ldc.
  // rows, cols, r0, c0: multiples of 16. upper: skip micro-tiles entirely below the diagonal (r > c
  // everywhere; r0 == c0 then), leaving those C entries unwritten. accumulate: add to C instead of
  // overwriting it.
  void (*gemm_block)(Packed a, long r0, long rows, Packed b, long c0, long cols, long k0, long kc, float* c,
                     long ldc, bool upper, bool accumulate);
  // sum_{r, c} w(r, c) cx[r][c] * cg[r][c] over a block; w = 1 on the diagonal, 2 above it, 0 below it
  // when diag (r0 == c0), else w = 2 everywhere. Per-row fp32 dot products, summed in double.
  double (*ghost_reduce)(const float* cx, const float* cg, long ldc, long rows, long cols, bool diag);
  // sum of squares of a rows x cols block (row stride ldc), per-row fp32, summed in double.
  double (*sum_squares)(const float* c, long ldc, long rows, long cols);
  // One row z[0, cols) of an fp32 LM-head logits chunk (cols >= 1): transforms it in place (HeadTransform),
  // then returns its max, sum of exp(z - max) and sum of z.
  HeadRowStats (*head_stats_row)(float* z, long cols, HeadTransform f);
  // z[v] <- w (exp(z[v] - lse) - [v == target]) * scale * (1 - (z[v] / softcap)^2) in place (the last factor
  // only with a softcap); a raw row is transformed first. target outside [0, cols): no one-hot term.
  void (*head_grad_row)(float* z, long cols, HeadTransform f, bool raw, float lse, float w, long target);
};

const IsaKernels* isa_base_kernels();
const IsaKernels* isa_avx2_kernels();    // nullptr when not compiled in (non-x86 build)
const IsaKernels* isa_avx512_kernels();  // nullptr when not compiled in

// The kernels for this CPU: the best level it supports, or the level named by $VIGOR_CPU_ISA
// ("avx512", "avx2", "base"), never one the CPU lacks. Chosen once.
const IsaKernels& isa_kernels();
// Names of the levels this build contains and this CPU can run, best first.
const char* isa_levels_available();

}  // namespace vigor
