// CUDA kernels of vigor_kernels._C (built when nvcc is found). Plain C++ interface, no pybind11 and no
// libtorch: module.cpp binds these, the Python wrapper (vigor_kernels/cuda_backend) validates every tensor
// and passes device pointers, the per-sample bounds (int64 [B, 2] on the device), scratch it allocated,
// and the current stream. Results are deterministic: partial sums go to fixed slots and are added in a
// fixed order (no atomics).
#pragma once

#include <cstdint>
#include <string>

namespace vigor {
namespace cuda {

constexpr int kTile = 64;  // rows / columns of one output tile of every tiled kernel

std::string compiled_archs();

// Scratch: partial[B * nb * nb] doubles, nb = ceil(max_len / kTile).
void linear_ghost(const void* x, const void* g, int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                  const int64_t* bounds, int64_t max_len, double* partial, float* out, uintptr_t stream);
// Scratch: partial[B * ceil(d_out / kTile) * ceil(d_in / kTile)] doubles.
void linear_direct(const void* x, const void* g, int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                   const int64_t* bounds, double* partial, float* out, uintptr_t stream);
// Scratch: partial[B * ceil(d / 256)] doubles. xhat may be null (bias).
void row_sum_sq(const void* g, const void* xhat, int dtype, int64_t B, int64_t T, int64_t d, const int64_t* bounds,
                double* partial, float* out, uintptr_t stream);
// Scratch as linear_ghost.
void embedding(const int64_t* ids, const void* g, int dtype, int64_t B, int64_t T, int64_t d, const int64_t* bounds,
               int64_t max_len, double* partial, float* out, uintptr_t stream);
// out: zeroed float32 [B, T, d].
void tied_head_rows(const int64_t* ids, const void* h, const void* g_head, int dtype, int64_t B, int64_t T, int64_t d,
                    int64_t vocab, const int64_t* bounds, int64_t max_len, float* out, uintptr_t stream);

}  // namespace cuda
}  // namespace vigor
