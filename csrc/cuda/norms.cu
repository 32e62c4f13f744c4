// CUDA kernels for per-sample squared gradient norms (see cuda_ops.h for the interface).
//
// Every matrix kernel is built on tile_product: a 256-thread block computes one 64 x 64 tile
//   C[i][j] = sum_k A(k, i) B(k, j)
// staging 16 x 64 slabs of A and B in shared memory (converted to fp32 on load, zero outside the valid
// rows / features, so NaN in padding never enters), each thread holding a 4 x 4 register sub-tile at rows
// ty + 16 i, columns tx + 16 j (conflict-free shared-memory reads). fp32 accumulation; block sums are
// reduced in double with a fixed shuffle pattern and written to their own slot, then sum_partials adds a
// sample's slots in a fixed order: bitwise reproducible, no atomics.
//
//   gram_tiles     ghost norm: block (J, I, b), J >= I, computes X_I X_J^T and G_I G_J^T of sample b and
//                  sums w * Kx * Kg (w = 2 above the diagonal, 1 on it, 0 below). With kEmbedding the X Gram
//                  is replaced by [id_r == id_c >= 0]: the embedding norm sum_{t,s: id_t = id_s} g_t . g_s.
//   gtx_tiles      direct norm: block (in-tile, out-tile, b) forms a 64 x 64 tile of G^T X over the
//                  sample's tokens and sums its squares.
//   row_sums       bias / norm weight: one thread per feature sums its column over the valid rows (double),
//                  the block sums the squares.
//   tied_rows      P[b, t] = sum_s G_head[b, s, id_t] h[b, s]: A gathers G_head columns by the tile's ids.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/cuda_ops.h"

namespace vigor {
namespace cuda {
namespace {

constexpr int TILE = kTile;
constexpr int BK = 16;
constexpr int THREADS = 256;
constexpr int SUB = 4;  // each thread: SUB x SUB outputs

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

struct Slab {
  float v[BK][TILE + 1];  // +1: the transposed stores of RowsOf hit distinct banks
};

// Operand whose k runs along the features of rows [row0, row0 + 64) of a row-major [*, ld] matrix
// (ghost: the tile's tokens); valid while row < row_end and feature < ld.
template <class T>
struct RowsOf {
  const T* m;
  int64_t ld, row0, row_end;
  __device__ void load(int k0, Slab& s) const {
    for (int idx = threadIdx.x; idx < BK * TILE; idx += THREADS) {
      const int k = idx % BK, i = idx / BK;  // consecutive threads read consecutive features
      const int64_t row = row0 + i, col = k0 + k;
      s.v[k][i] = (row < row_end && col < ld) ? to_float(m[row * ld + col]) : 0.0f;
    }
  }
};

// Operand whose k runs along rows [row_begin, row_end) and whose 64 columns are features
// [col0, col0 + 64) of a row-major [*, ld] matrix (direct: G and X over a sample's tokens).
template <class T>
struct ColsOf {
  const T* m;
  int64_t ld, col0, row_begin, row_end;
  __device__ void load(int k0, Slab& s) const {
    for (int idx = threadIdx.x; idx < BK * TILE; idx += THREADS) {
      const int i = idx % TILE, k = idx / TILE;  // consecutive threads read consecutive features
      const int64_t row = row_begin + k0 + k, col = col0 + i;
      s.v[k][i] = (row < row_end && col < ld) ? to_float(m[row * ld + col]) : 0.0f;
    }
  }
};

// Tied head: A(k = s, i = t) = G_head[row_begin + k, id_t] for the tile's tokens (ids in shared memory,
// -1 where the token is outside the range or carries no gradient).
template <class T>
struct HeadColumns {
  const T* gh;
  int64_t vocab, row_begin, row_end;
  const int64_t* tile_ids;
  __device__ void load(int k0, Slab& s) const {
    for (int idx = threadIdx.x; idx < BK * TILE; idx += THREADS) {
      const int i = idx % TILE, k = idx / TILE;
      const int64_t row = row_begin + k0 + k, id = tile_ids[i];
      s.v[k][i] = (row < row_end && id >= 0) ? to_float(gh[row * vocab + id]) : 0.0f;
    }
  }
};

template <class A, class B>
__device__ void tile_product(const A& a, const B& b, int64_t k_len, float acc[SUB][SUB], Slab& sa, Slab& sb) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t k0 = 0; k0 < k_len; k0 += BK) {
    a.load(int(k0), sa);
    b.load(int(k0), sb);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float av[SUB], bv[SUB];
#pragma unroll
      for (int i = 0; i < SUB; ++i) av[i] = sa.v[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < SUB; ++j) bv[j] = sb.v[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < SUB; ++i) {
#pragma unroll
        for (int j = 0; j < SUB; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
}

// Sum of one double per thread, same order every run; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[THREADS / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  }
  return total;
}

template <class T, bool kEmbedding>
__global__ void __launch_bounds__(THREADS)
    gram_tiles(const T* x, const T* g, const int64_t* ids, int64_t T_len, int64_t d_in, int64_t d_out,
               const int64_t* bounds, int nb_max, double* partial) {
  const int J = blockIdx.x, I = blockIdx.y, b = blockIdx.z;
  const int64_t start = bounds[2 * b], end = bounds[2 * b + 1];
  const int nb = int((end - start + TILE - 1) / TILE);
  double* slot = partial + (int64_t(b) * nb_max + I) * nb_max + J;
  if (J < I || J >= nb) {
    if (threadIdx.x == 0) *slot = 0.0;
    return;
  }
  __shared__ Slab sa, sb;
  const int64_t r0 = start + int64_t(I) * TILE, c0 = start + int64_t(J) * TILE;
  const int64_t base = int64_t(b) * T_len;
  float kx[SUB][SUB] = {}, kg[SUB][SUB] = {};
  if (!kEmbedding) {
    const T* xb = x + base * d_in;
    tile_product(RowsOf<T>{xb, d_in, r0, end}, RowsOf<T>{xb, d_in, c0, end}, d_in, kx, sa, sb);
  }
  const T* gb = g + base * d_out;
  tile_product(RowsOf<T>{gb, d_out, r0, end}, RowsOf<T>{gb, d_out, c0, end}, d_out, kg, sa, sb);

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < SUB; ++i) {
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
      const int64_t r = r0 + ty + 16 * i, c = c0 + tx + 16 * j;
      if (r >= end || c >= end || (I == J && c < r)) continue;
      const float w = (I != J || c > r) ? 2.0f : 1.0f;
      float other;
      if (kEmbedding) {
        const int64_t id_r = ids[base + r];
        other = (id_r >= 0 && id_r == ids[base + c]) ? 1.0f : 0.0f;
      } else {
        other = kx[i][j];
      }
      s += w * other * kg[i][j];
    }
  }
  const double total = block_sum(double(s));
  if (threadIdx.x == 0) *slot = total;
}

template <class T>
__global__ void __launch_bounds__(THREADS)
    gtx_tiles(const T* x, const T* g, int64_t T_len, int64_t d_in, int64_t d_out, const int64_t* bounds,
              double* partial) {
  const int ci = blockIdx.x, oi = blockIdx.y, b = blockIdx.z;
  const int64_t start = bounds[2 * b], end = bounds[2 * b + 1];
  __shared__ Slab sa, sb;
  const int64_t base = int64_t(b) * T_len;
  float acc[SUB][SUB] = {};
  tile_product(ColsOf<T>{g + base * d_out, d_out, int64_t(oi) * TILE, start, end},
               ColsOf<T>{x + base * d_in, d_in, int64_t(ci) * TILE, start, end}, end - start, acc, sa, sb);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < SUB; ++i) {
#pragma unroll
    for (int j = 0; j < SUB; ++j) s += acc[i][j] * acc[i][j];
  }
  const double total = block_sum(double(s));
  if (threadIdx.x == 0) partial[(int64_t(b) * gridDim.y + oi) * gridDim.x + ci] = total;
}

template <class T, bool kProduct>
__global__ void __launch_bounds__(THREADS)
    row_sums(const T* g, const T* xhat, int64_t T_len, int64_t d, const int64_t* bounds, double* partial) {
  const int b = blockIdx.y;
  const int64_t f = int64_t(blockIdx.x) * THREADS + threadIdx.x;
  const int64_t start = bounds[2 * b], end = bounds[2 * b + 1];
  double acc = 0.0;
  if (f < d) {
    for (int64_t t = start; t < end; ++t) {
      const int64_t at = (int64_t(b) * T_len + t) * d + f;
      acc += kProduct ? double(to_float(g[at])) * double(to_float(xhat[at])) : double(to_float(g[at]));
    }
  }
  const double total = block_sum(acc * acc);
  if (threadIdx.x == 0) partial[int64_t(b) * gridDim.x + blockIdx.x] = total;
}

template <class T>
__global__ void __launch_bounds__(THREADS)
    tied_rows(const int64_t* ids, const T* h, const T* gh, int64_t T_len, int64_t d, int64_t vocab,
              const int64_t* bounds, float* out) {
  const int fi = blockIdx.x, ti = blockIdx.y, b = blockIdx.z;
  const int64_t start = bounds[2 * b], end = bounds[2 * b + 1];
  const int64_t t0 = start + int64_t(ti) * TILE;
  if (t0 >= end) return;
  const int64_t base = int64_t(b) * T_len;
  __shared__ int64_t tile_ids[TILE];
  for (int i = threadIdx.x; i < TILE; i += THREADS) tile_ids[i] = (t0 + i < end) ? ids[base + t0 + i] : -1;
  __syncthreads();
  __shared__ Slab sa, sb;
  float acc[SUB][SUB] = {};
  tile_product(HeadColumns<T>{gh + base * vocab, vocab, start, end, tile_ids},
               ColsOf<T>{h + base * d, d, int64_t(fi) * TILE, start, end}, end - start, acc, sa, sb);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < SUB; ++i) {
    const int ti_local = ty + 16 * i;
    if (tile_ids[ti_local] < 0) continue;
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
      const int64_t f = int64_t(fi) * TILE + tx + 16 * j;
      if (f < d) out[(base + t0 + ti_local) * d + f] = acc[i][j];
    }
  }
}

// out[b] = sum of partial[b * per_sample, (b + 1) * per_sample), in a fixed order.
__global__ void __launch_bounds__(THREADS) sum_partials(const double* partial, int64_t per_sample, float* out) {
  const int b = blockIdx.x;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < per_sample; i += THREADS) s += partial[int64_t(b) * per_sample + i];
  const double total = block_sum(s);
  if (threadIdx.x == 0) out[b] = float(total);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vigor_kernels._C CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

// Calls fn with a null pointer of the element type of dtype (0 float32, 1 bfloat16, 2 float16).
template <class Fn>
void with_dtype(int dtype, Fn fn) {
  switch (dtype) {
    case 0:
      return fn(static_cast<const float*>(nullptr));
    case 1:
      return fn(static_cast<const __nv_bfloat16*>(nullptr));
    case 2:
      return fn(static_cast<const __half*>(nullptr));
    default:
      throw std::invalid_argument("vigor_kernels._C CUDA: unknown dtype code " + std::to_string(dtype));
  }
}

unsigned blocks_for(int64_t n, const char* what) {
  const int64_t blocks = (n + TILE - 1) / TILE;
  if (blocks > 65535) throw std::invalid_argument(std::string("vigor_kernels._C CUDA: ") + what + " too large");
  return unsigned(blocks < 1 ? 1 : blocks);
}

void gram(const int64_t* ids, const void* x, const void* g, int dtype, int64_t B, int64_t T, int64_t d_in,
          int64_t d_out, const int64_t* bounds, int64_t max_len, double* partial, float* out, uintptr_t stream,
          bool embedding) {
  if (B == 0) return;
  const unsigned nb = blocks_for(max_len, "sequence length");
  if (B > 65535) throw std::invalid_argument("vigor_kernels._C CUDA: batch too large");
  const dim3 grid(nb, nb, unsigned(B));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto* tag) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    if (embedding) {
      gram_tiles<E, true><<<grid, THREADS, 0, s>>>(nullptr, static_cast<const E*>(g), ids, T, 0, d_out, bounds,
                                                   int(nb), partial);
    } else {
      gram_tiles<E, false><<<grid, THREADS, 0, s>>>(static_cast<const E*>(x), static_cast<const E*>(g), nullptr, T,
                                                    d_in, d_out, bounds, int(nb), partial);
    }
  });
  check_launch(embedding ? "embedding tiles" : "ghost tiles");
  sum_partials<<<unsigned(B), THREADS, 0, s>>>(partial, int64_t(nb) * nb, out);
  check_launch("sum_partials");
}

}  // namespace

std::string compiled_archs() {
#ifdef VIGOR_CUDA_ARCHS
  return VIGOR_CUDA_ARCHS;
#else
  return "";
#endif
}

void linear_ghost(const void* x, const void* g, int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                  const int64_t* bounds, int64_t max_len, double* partial, float* out, uintptr_t stream) {
  gram(nullptr, x, g, dtype, B, T, d_in, d_out, bounds, max_len, partial, out, stream, false);
}

void embedding(const int64_t* ids, const void* g, int dtype, int64_t B, int64_t T, int64_t d, const int64_t* bounds,
               int64_t max_len, double* partial, float* out, uintptr_t stream) {
  gram(ids, nullptr, g, dtype, B, T, 0, d, bounds, max_len, partial, out, stream, true);
}

void linear_direct(const void* x, const void* g, int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                   const int64_t* bounds, double* partial, float* out, uintptr_t stream) {
  if (B == 0) return;
  if (B > 65535) throw std::invalid_argument("vigor_kernels._C CUDA: batch too large");
  const dim3 grid(blocks_for(d_in, "d_in"), blocks_for(d_out, "d_out"), unsigned(B));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto* tag) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    gtx_tiles<E><<<grid, THREADS, 0, s>>>(static_cast<const E*>(x), static_cast<const E*>(g), T, d_in, d_out, bounds,
                                         partial);
  });
  check_launch("direct tiles");
  sum_partials<<<unsigned(B), THREADS, 0, s>>>(partial, int64_t(grid.x) * grid.y, out);
  check_launch("sum_partials");
}

void row_sum_sq(const void* g, const void* xhat, int dtype, int64_t B, int64_t T, int64_t d, const int64_t* bounds,
                double* partial, float* out, uintptr_t stream) {
  if (B == 0) return;
  if (B > 65535) throw std::invalid_argument("vigor_kernels._C CUDA: batch too large");
  const unsigned chunks = unsigned((d + THREADS - 1) / THREADS);
  const dim3 grid(chunks < 1 ? 1 : chunks, unsigned(B));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto* tag) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    if (xhat != nullptr) {
      row_sums<E, true><<<grid, THREADS, 0, s>>>(static_cast<const E*>(g), static_cast<const E*>(xhat), T, d, bounds,
                                                 partial);
    } else {
      row_sums<E, false><<<grid, THREADS, 0, s>>>(static_cast<const E*>(g), nullptr, T, d, bounds, partial);
    }
  });
  check_launch("row sums");
  sum_partials<<<unsigned(B), THREADS, 0, s>>>(partial, int64_t(grid.x), out);
  check_launch("sum_partials");
}

void tied_head_rows(const int64_t* ids, const void* h, const void* g_head, int dtype, int64_t B, int64_t T, int64_t d,
                    int64_t vocab, const int64_t* bounds, int64_t max_len, float* out, uintptr_t stream) {
  if (B == 0 || max_len == 0 || d == 0) return;
  if (B > 65535) throw std::invalid_argument("vigor_kernels._C CUDA: batch too large");
  const dim3 grid(blocks_for(d, "d"), blocks_for(max_len, "sequence length"), unsigned(B));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto* tag) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    tied_rows<E><<<grid, THREADS, 0, s>>>(ids, static_cast<const E*>(h), static_cast<const E*>(g_head), T, d, vocab,
                                         bounds, out);
  });
  check_launch("tied head rows");
}

}  // namespace cuda
}  // namespace vigor
