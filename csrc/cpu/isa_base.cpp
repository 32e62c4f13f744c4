// Baseline copy of the kernels (the compiler's default target, e.g. SSE2 on x86-64, NEON on arm64):
// 2 x 16 micro-tiles. Always built, so every CPU has a path.
#define VIGOR_ISA_NS isa_base
#define VIGOR_ISA_NAME "base"
#define VIGOR_MR 2
#define VIGOR_NV 1
#include "isa_impl.inc"

namespace vigor {
const IsaKernels* isa_base_kernels() { return isa_base::kernels(); }
}  // namespace vigor
