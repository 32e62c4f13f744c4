// pybind11 entry point of vigor_kernels._C.
//
// The Python wrappers in vigor_kernels/cpp_backend.py validate every tensor (device, dtype,
// contiguity, shape) and pass raw data pointers here, so this module does not link libtorch.
#include <pybind11/pybind11.h>

namespace py = pybind11;

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
  m.def("build_info", []() {
    py::dict info;
    info["cxx_standard"] = __cplusplus;
#ifdef VIGOR_HAVE_OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
#ifdef VIGOR_HAVE_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    return info;
  });
}
