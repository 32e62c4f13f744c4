// AVX-512 copy of the kernels (compiled with -march=x86-64-v4): 8 x 48 micro-tiles, 24 zmm accumulators.
#define VIGOR_ISA_NS isa_avx512
#define VIGOR_ISA_NAME "avx512"
#define VIGOR_MR 8
#define VIGOR_NV 3
#include "isa_impl.inc"

namespace vigor {
const IsaKernels* isa_avx512_kernels() { return isa_avx512::kernels(); }
}  // namespace vigor
