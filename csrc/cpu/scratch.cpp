// Process-wide tunables and the scratch the CPU kernels keep per calling thread (see common.h).
#include <cstdlib>

#include "common.h"

namespace vigor {
namespace cpu {

Tuning& tuning() {
  static Tuning t = [] {
    Tuning init;
    if (const char* mb = std::getenv("VIGOR_CPP_PACK_MB")) {
      const long v = std::atol(mb);
      if (v > 0) init.pack_budget = size_t(v) << 20;
    }
    return init;
  }();
  return t;
}

namespace {
thread_local Scratch scratch_slots[2];
}  // namespace

Scratch& cached_scratch(ScratchSlot slot) { return scratch_slots[slot]; }

void release_scratch() {
  for (Scratch& s : scratch_slots) s.release();
}

void trim_scratch() {
  if (scratch_slots[kPackSlot].bytes() > tuning().pack_budget) scratch_slots[kPackSlot].release();
}

}  // namespace cpu
}  // namespace vigor
