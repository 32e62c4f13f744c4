// Run-time choice of the ISA copy of the kernels (see isa_kernels.h).
#include <cstdlib>
#include <cstring>
#include <string>

#include "isa_kernels.h"

namespace vigor {
namespace {

bool cpu_has(const char* level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(level, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  }
  if (std::strcmp(level, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(level, "base") == 0;
}

struct Level {
  const char* name;
  const IsaKernels* kernels;
};

// Best first; a level is usable when it was compiled in and the CPU runs it.
int usable_levels(Level* out) {
  const Level all[] = {{"avx512", isa_avx512_kernels()}, {"avx2", isa_avx2_kernels()}, {"base", isa_base_kernels()}};
  int n = 0;
  for (const Level& level : all) {
    if (level.kernels != nullptr && cpu_has(level.name)) out[n++] = level;
  }
  return n;
}

const IsaKernels* choose() {
  Level levels[3];
  const int n = usable_levels(levels);
  const char* forced = std::getenv("VIGOR_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    for (int i = 0; i < n; ++i) {
      if (std::strcmp(levels[i].name, forced) == 0) return levels[i].kernels;
    }
  }
  return levels[0].kernels;  // "base" is always compiled and always usable
}

}  // namespace

const IsaKernels& isa_kernels() {
  static const IsaKernels* chosen = choose();
  return *chosen;
}

const char* isa_levels_available() {
  static const std::string names = [] {
    Level levels[3];
    const int n = usable_levels(levels);
    std::string s;
    for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::string(levels[i].name);
    return s;
  }();
  return names.c_str();
}

#if !(defined(__x86_64__) || defined(__i386__)) || defined(VIGOR_NO_X86_LEVELS)
const IsaKernels* isa_avx2_kernels() { return nullptr; }
const IsaKernels* isa_avx512_kernels() { return nullptr; }
#endif

}  // namespace vigor
