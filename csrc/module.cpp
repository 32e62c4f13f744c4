// pybind11 entry point of vigor_kernels._C.
//
// The Python wrappers (vigor_kernels/cpp_backend, vigor_kernels/cuda_backend) validate every tensor
// (device, dtype, contiguity, shape) and pass raw data pointers here as integers, so this module does not
// link libtorch. Every op writes into an output the wrapper allocated; dtype codes are those of
// csrc/cpu/isa_kernels.h (0 float32, 1 bfloat16, 2 float16). The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "cpu/common.h"
#ifdef VIGOR_HAVE_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using vigor::cpu::Ranges;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

py::dict build_info() {
  py::dict info;
  info["cxx_standard"] = __cplusplus;
#ifdef VIGOR_HAVE_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef VIGOR_HAVE_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = vigor::cuda::compiled_archs();
#else
  info["cuda"] = false;
#endif
  info["cpu_isa"] = vigor::isa_kernels().name;
  info["cpu_isa_levels"] = vigor::isa_levels_available();
  info["threads"] = vigor::cpu::max_threads();
  return info;
}

void bind_cpu(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "linear_ghost",
      [](uintptr_t x, uintptr_t g, int dtype, int64_t T, int64_t d_in, int64_t d_out, const Ranges& r, uintptr_t out) {
        vigor::cpu::linear_ghost(ptr<const void>(x), ptr<const void>(g), dtype, T, d_in, d_out, r, ptr<float>(out));
      },
      "||G_b^T X_b||^2 per sample by the Gram (ghost) form; x [B,T,d_in], g [B,T,d_out] contiguous, out float32 [B]",
      nogil);
  m.def(
      "linear_direct",
      [](uintptr_t x, uintptr_t g, int dtype, int64_t T, int64_t d_in, int64_t d_out, const Ranges& r, uintptr_t out) {
        vigor::cpu::linear_direct(ptr<const void>(x), ptr<const void>(g), dtype, T, d_in, d_out, r, ptr<float>(out));
      },
      "||G_b^T X_b||^2 per sample with G^T X formed block by block", nogil);
  m.def(
      "bias",
      [](uintptr_t g, int dtype, int64_t T, int64_t d, const Ranges& r, uintptr_t out) {
        vigor::cpu::bias(ptr<const void>(g), dtype, T, d, r, ptr<float>(out));
      },
      "||sum_t g_t||^2 per sample", nogil);
  m.def(
      "norm_weight",
      [](uintptr_t g, uintptr_t xhat, int dtype, int64_t T, int64_t d, const Ranges& r, uintptr_t out) {
        vigor::cpu::norm_weight(ptr<const void>(g), ptr<const void>(xhat), dtype, T, d, r, ptr<float>(out));
      },
      "||sum_t g_t * xhat_t||^2 per sample", nogil);
  m.def(
      "embedding",
      [](uintptr_t ids, uintptr_t g, int dtype, int64_t T, int64_t d, const Ranges& r, uintptr_t out) {
        vigor::cpu::embedding(ptr<const int64_t>(ids), ptr<const void>(g), dtype, T, d, r, ptr<float>(out));
      },
      "sum_v ||sum_{t: id_t = v} g_t||^2 per sample; ids int64 [B,T], -1 = no gradient", nogil);
  m.def(
      "tied_head_rows",
      [](uintptr_t ids, uintptr_t h, uintptr_t g_head, int dtype, int64_t T, int64_t d, int64_t vocab, const Ranges& r,
         uintptr_t out) {
        vigor::cpu::tied_head_rows(ptr<const int64_t>(ids), ptr<const void>(h), ptr<const void>(g_head), dtype, T, d,
                                   vocab, r, ptr<float>(out));
      },
      "P[b,t] = sum_s G_head[b,s,id_t] h[b,s] into a zeroed float32 [B,T,d]", nogil);
  m.def(
      "head_finish_stats",
      [](uintptr_t z, int64_t n, int64_t cols, int64_t ld, uintptr_t bias, int bias_dtype, float scale,
         bool has_softcap, float softcap, uintptr_t targets, int64_t v0, uintptr_t max_out, uintptr_t sum_exp_out,
         uintptr_t target_out, uintptr_t sum_z_out) {
        vigor::cpu::head_finish_stats(ptr<float>(z), n, cols, ld, ptr<const void>(bias), bias_dtype, scale, has_softcap,
                                      softcap, ptr<const int64_t>(targets), v0, ptr<float>(max_out),
                                      ptr<double>(sum_exp_out), ptr<float>(target_out), ptr<double>(sum_z_out));
      },
      "fp32 logits chunk z [n, cols] (row stride ld) <- f(z + bias) in place; per row max (f32), sum exp(z - max) "
      "(f64), target logit (f32), sum z (f64, sum_z_out may be 0); bias 0 = none",
      nogil);
  m.def(
      "head_to_grad",
      [](uintptr_t z, int64_t n, int64_t cols, int64_t ld, uintptr_t bias, int bias_dtype, bool raw, float scale,
         bool has_softcap, float softcap, uintptr_t lse, uintptr_t w, uintptr_t targets, int64_t v0) {
        vigor::cpu::head_to_grad(ptr<float>(z), n, cols, ld, ptr<const void>(bias), bias_dtype, raw, scale, has_softcap,
                                 softcap, ptr<const float>(lse), ptr<const float>(w), ptr<const int64_t>(targets), v0);
      },
      "fp32 logits chunk z [n, cols] <- w (exp(z - lse) - onehot(target - v0)) * f'(z) in place (raw: f(z + bias) "
      "first); lse, w float32 [n]",
      nogil);
  m.def(
      "set_tuning",
      [](long ghost_block, long ghost_kc, long direct_block_m, long direct_block_n, long direct_kc,
         size_t pack_budget_bytes) {
        for (long v : {ghost_block, direct_block_m, direct_block_n}) {
          if (v <= 0 || v % 16 != 0) throw std::invalid_argument("block sizes must be positive multiples of 16");
        }
        if (ghost_kc <= 0 || direct_kc <= 0) throw std::invalid_argument("k steps must be positive");
        auto& t = vigor::cpu::tuning();
        t = {ghost_block, ghost_kc, direct_block_m, direct_block_n, direct_kc, pack_budget_bytes};
      },
      "internal: block sizes of the CPU kernels and the pack budget per wave, for tests and tuning");
  m.def("get_tuning", []() {
    const auto& t = vigor::cpu::tuning();
    return py::make_tuple(t.ghost_block, t.ghost_kc, t.direct_block_m, t.direct_block_n, t.direct_kc, t.pack_budget);
  });
  m.def("set_num_threads", [](int n) {
#ifdef _OPENMP
    if (n < 1) throw std::invalid_argument("set_num_threads needs n >= 1");
    omp_set_num_threads(n);
#endif
  }, "OpenMP threads of later CPU kernel calls (the process-wide OpenMP setting, which torch shares)");
  m.def("get_num_threads", &vigor::cpu::max_threads);
  m.def("release_scratch", &vigor::cpu::release_scratch,
        "free the packing scratch the CPU kernels keep between calls on the calling thread");
}

#ifdef VIGOR_HAVE_CUDA
// Device pointers, the bounds tensor (int64 [B, 2] on the device), scratch and the stream all come from the
// Python wrapper (vigor_kernels/cuda_backend), which allocates them with torch on the tensors' device.
void bind_cuda(py::module_& m) {
  namespace vc = vigor::cuda;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("cuda_tile") = vc::kTile;
  m.def(
      "cuda_linear_ghost",
      [](uintptr_t x, uintptr_t g, int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out, uintptr_t bounds,
         int64_t max_len, uintptr_t partial, uintptr_t out, uintptr_t stream) {
        vc::linear_ghost(ptr<const void>(x), ptr<const void>(g), dtype, B, T, d_in, d_out, ptr<const int64_t>(bounds),
                         max_len, ptr<double>(partial), ptr<float>(out), stream);
      },
      nogil);
  m.def(
      "cuda_linear_direct",
      [](uintptr_t x, uintptr_t g, int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out, uintptr_t bounds,
         uintptr_t partial, uintptr_t out, uintptr_t stream) {
        vc::linear_direct(ptr<const void>(x), ptr<const void>(g), dtype, B, T, d_in, d_out,
                          ptr<const int64_t>(bounds), ptr<double>(partial), ptr<float>(out), stream);
      },
      nogil);
  m.def(
      "cuda_row_sum_sq",
      [](uintptr_t g, uintptr_t xhat, int dtype, int64_t B, int64_t T, int64_t d, uintptr_t bounds, uintptr_t partial,
         uintptr_t out, uintptr_t stream) {
        vc::row_sum_sq(ptr<const void>(g), ptr<const void>(xhat), dtype, B, T, d, ptr<const int64_t>(bounds),
                       ptr<double>(partial), ptr<float>(out), stream);
      },
      nogil);
  m.def(
      "cuda_embedding",
      [](uintptr_t ids, uintptr_t g, int dtype, int64_t B, int64_t T, int64_t d, uintptr_t bounds, int64_t max_len,
         uintptr_t partial, uintptr_t out, uintptr_t stream) {
        vc::embedding(ptr<const int64_t>(ids), ptr<const void>(g), dtype, B, T, d, ptr<const int64_t>(bounds), max_len,
                      ptr<double>(partial), ptr<float>(out), stream);
      },
      nogil);
  m.def(
      "cuda_tied_head_rows",
      [](uintptr_t ids, uintptr_t h, uintptr_t g_head, int dtype, int64_t B, int64_t T, int64_t d, int64_t vocab,
         uintptr_t bounds, int64_t max_len, uintptr_t out, uintptr_t stream) {
        vc::tied_head_rows(ptr<const int64_t>(ids), ptr<const void>(h), ptr<const void>(g_head), dtype, B, T, d, vocab,
                           ptr<const int64_t>(bounds), max_len, ptr<float>(out), stream);
      },
      nogil);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vigor-kernels compiled per-sample gradient norm kernels";
#ifdef VIGOR_HAVE_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
#ifdef VIGOR_HAVE_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("build_info", &build_info);
  bind_cpu(m);
#ifdef VIGOR_HAVE_CUDA
  bind_cuda(m);
#endif
}
