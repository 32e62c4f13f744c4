// AVX2 + FMA copy of the kernels (compiled with -march=x86-64-v3): 4 x 16 micro-tiles, 8 ymm accumulators.
#define VIGOR_ISA_NS isa_avx2
#define VIGOR_ISA_NAME "avx2"
#define VIGOR_MR 4
#define VIGOR_NV 1
#include "isa_impl.inc"

namespace vigor {
const IsaKernels* isa_avx2_kernels() { return isa_avx2::kernels(); }
}  // namespace vigor
