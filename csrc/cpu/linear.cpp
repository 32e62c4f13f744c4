// Per-sample squared norms of linear-layer weight gradients, ||G_b^T X_b||_F^2, on the CPU.
//
// ghost:  sum_{t,s} (x_t . x_s)(g_t . g_s) over the upper triangle of the T_b x T_b Gram matrices,
//         off-diagonal entries counted twice. Work item = one (row block I, column block J >= I) pair of
//         one sample: X_I X_J^T and G_I G_J^T are formed in two per-thread ghost_block^2 tiles, k-blocked
//         by ghost_kc features, then reduced; the full T x T Gram never exists.
// direct: ||G^T X||^2 with G^T X formed block by block. Work item = one (d_out block, d_in block) pair
//         of one sample, accumulated over its tokens in direct_kc steps, then its squares summed.
// Operands are packed to fp32 in the sliver layout of isa_kernels.h (bf16/fp16 widened there) so that the
// micro-kernels stream contiguous memory: ghost packs each sample's valid rows once, direct packs each
// k step of its block's columns into per-thread buffers. Each work item's sum is computed by one thread
// in a fixed order and the items are summed per sample in item order: results are bitwise the same for
// any thread count and run to run.
#include <algorithm>

#include "common.h"

namespace vigor {
namespace cpu {

namespace {

struct PackTask {
  size_t sample;  // index in the live samples
  bool is_g;
  long sl0, sl1;
};

constexpr long kSliversPerPackTask = 4;

void add_pack_tasks(std::vector<PackTask>& tasks, size_t sample, bool is_g, long slivers) {
  for (long s0 = 0; s0 < slivers; s0 += kSliversPerPackTask) {
    tasks.push_back({sample, is_g, s0, std::min(s0 + kSliversPerPackTask, slivers)});
  }
}

// Sums each sample's item results in item order (the order the items were built in, not the order the
// threads finished them), so the result does not depend on scheduling.
template <class Item>
void sum_per_sample(const std::vector<Item>& items, const std::vector<double>& result, const std::vector<Sample>& live,
                    size_t w0, size_t w1, float* out) {
  std::vector<double> acc(w1 - w0, 0.0);
  for (size_t it = 0; it < items.size(); ++it) acc[items[it].sample - w0] += result[it];
  for (size_t i = w0; i < w1; ++i) out[live[i].b] = float(acc[i - w0]);
}

// Work items per thread a wave should have: enough for dynamic scheduling to even out the threads.
constexpr long kItemsPerThread = 3;

// Half of a block size, kept a multiple of 48 (whole 8 x 48 micro-tile panels) and >= 96; the same size
// when it cannot shrink further.
long shrink(long block) {
  const long half = block / 2 / 48 * 48;
  return half >= 96 ? half : block;
}

// The block size that splits `extent` into as many blocks as `largest` would, evenly (a multiple of `unit`),
// so no thin last block is left over (896 by 288 with unit 48: 240 + 240 + 240 + 176, not 3 x 288 + 32).
long balanced(long extent, long largest, long unit) {
  if (largest % unit != 0 || extent <= 0) return largest;
  const long blocks = (extent + largest - 1) / largest;
  const long even = ((extent + blocks - 1) / blocks + unit - 1) / unit * unit;
  return even < largest ? even : largest;
}

// Block sizes: as large as the tuning allows (the packed operands are re-read once per block along the
// other dimension, so memory traffic falls as 1/block), shrunk while the wave would have fewer than
// kItemsPerThread items per thread.
long ghost_block_for(const std::vector<Sample>& live, size_t w0, size_t w1, long largest) {
  const long want = kItemsPerThread * max_threads();
  for (long gb = largest;; gb = shrink(gb)) {
    long items = 0;
    for (size_t i = w0; i < w1; ++i) {
      const long nb = (pad16(live[i].n) + gb - 1) / gb;
      items += nb * (nb + 1) / 2;
    }
    if (items >= want || shrink(gb) == gb) {
      long widest = 0;
      for (size_t i = w0; i < w1; ++i) widest = std::max(widest, pad16(live[i].n));
      return balanced(widest, gb, 16);
    }
  }
}

}  // namespace

std::pair<long, long> direct_blocks_for(size_t samples, long pout, long pin, long bm, long bn) {
  const long want = kItemsPerThread * max_threads();
  while (true) {
    const long items = long(samples) * ((pout + bm - 1) / bm) * ((pin + bn - 1) / bn);
    if (items >= want) return {balanced(pout, bm, 48), balanced(pin, bn, 48)};
    if (bm >= bn && shrink(bm) != bm) bm = shrink(bm);
    else if (shrink(bn) != bn) bn = shrink(bn);
    else if (shrink(bm) != bm) bm = shrink(bm);
    else return {balanced(pout, bm, 48), balanced(pin, bn, 48)};
  }
}

void linear_ghost(const void* x, const void* g, int dtype, int64_t T, int64_t d_in, int64_t d_out,
                  const Ranges& ranges, float* out) {
  const IsaKernels& K = isa_kernels();
  const Tuning tu = tuning();
  const size_t es = elem_size(dtype);
  const char* xs = static_cast<const char*>(x);
  const char* gs = static_cast<const char*>(g);
  const std::vector<Sample> live = live_samples(ranges, out);
  auto pack_floats = [&](const Sample& s) { return size_t(pad16(s.n)) * size_t(d_in + d_out); };
  Scratch& pack = cached_scratch(kPackSlot);
  Scratch& tiles = cached_scratch(kTileSlot);

  for (const auto& wave : waves(live, [&](size_t i) { return 4 * pack_floats(live[i]); }, tu.pack_budget)) {
    const size_t w0 = wave.first, w1 = wave.second;
    std::vector<size_t> off(w1 - w0 + 1, 0);
    std::vector<PackTask> tasks;
    for (size_t i = w0; i < w1; ++i) {
      off[i - w0 + 1] = off[i - w0] + pack_floats(live[i]);
      add_pack_tasks(tasks, i, false, pad16(live[i].n) / 16);
      add_pack_tasks(tasks, i, true, pad16(live[i].n) / 16);
    }
    pack.resize(off.back());
    auto packed_x = [&](size_t i) { return pack.data() + off[i - w0]; };
    auto packed_g = [&](size_t i) { return packed_x(i) + size_t(pad16(live[i].n)) * d_in; };
    const long gb = ghost_block_for(live, w0, w1, tu.ghost_block);
    tiles.resize(size_t(max_threads()) * 2 * gb * gb);
    double macs = 0.0;
    for (size_t i = w0; i < w1; ++i) macs += 0.5 * double(pad16(live[i].n)) * double(pad16(live[i].n)) * (d_in + d_out);
    const bool parallel = macs > kParallelMacs;

#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (long t = 0; t < long(tasks.size()); ++t) {
      const PackTask& task = tasks[t];
      const Sample& s = live[task.sample];
      const long d = task.is_g ? d_out : d_in;
      const char* src = (task.is_g ? gs : xs) + size_t(s.b * T + s.start) * d * es;
      float* dst = task.is_g ? packed_g(task.sample) : packed_x(task.sample);
      K.pack_rows(src, dtype, d, s.n, d, task.sl0, task.sl1, dst);
    }

    struct Item {
      size_t sample;
      long r0, c0;
    };
    std::vector<Item> items;
    for (size_t i = w0; i < w1; ++i) {
      const long np = pad16(live[i].n);
      for (long r0 = 0; r0 < np; r0 += gb) {
        for (long c0 = r0; c0 < np; c0 += gb) items.push_back({i, r0, c0});
      }
    }
    std::vector<double> result(items.size(), 0.0);

#pragma omp parallel if (parallel)
    {
      float* cx = tiles.data() + size_t(thread_id()) * 2 * gb * gb;
      float* cg = cx + gb * gb;
#pragma omp for schedule(dynamic, 1)
      for (long it = 0; it < long(items.size()); ++it) {
        const Item& item = items[it];
        const long np = pad16(live[item.sample].n);
        const long rows = std::min(gb, np - item.r0);
        const long cols = std::min(gb, np - item.c0);
        const bool diag = item.r0 == item.c0;
        const Packed px{packed_x(item.sample), long(d_in) * 16};
        const Packed pg{packed_g(item.sample), long(d_out) * 16};
        for (long k0 = 0; k0 < d_in; k0 += tu.ghost_kc) {
          const long kc = std::min<long>(tu.ghost_kc, d_in - k0);
          K.gemm_block(px, item.r0, rows, px, item.c0, cols, k0, kc, cx, gb, diag, k0 > 0);
        }
        for (long k0 = 0; k0 < d_out; k0 += tu.ghost_kc) {
          const long kc = std::min<long>(tu.ghost_kc, d_out - k0);
          K.gemm_block(pg, item.r0, rows, pg, item.c0, cols, k0, kc, cg, gb, diag, k0 > 0);
        }
        result[it] = K.ghost_reduce(cx, cg, gb, rows, cols, diag);
      }
    }
    sum_per_sample(items, result, live, w0, w1, out);
  }
  trim_scratch();
}

void linear_direct(const void* x, const void* g, int dtype, int64_t T, int64_t d_in, int64_t d_out,
                   const Ranges& ranges, float* out) {
  const IsaKernels& K = isa_kernels();
  const Tuning tu = tuning();
  const size_t es = elem_size(dtype);
  const char* xs = static_cast<const char*>(x);
  const char* gs = static_cast<const char*>(g);
  const std::vector<Sample> live = live_samples(ranges, out);
  if (live.empty()) return;
  const long pin = pad16(d_in), pout = pad16(d_out);
  const std::pair<long, long> blocks = direct_blocks_for(live.size(), pout, pin, tu.direct_block_m, tu.direct_block_n);
  const long bm = blocks.first, bn = blocks.second, kc_max = tu.direct_kc;
  // Per thread: the C block, then the packed G and X k-blocks of the current k step.
  const size_t per_thread = size_t(bm) * bn + size_t(bm + bn) * kc_max;
  Scratch& tiles = cached_scratch(kTileSlot);
  tiles.resize(size_t(max_threads()) * per_thread);

  struct Item {
    size_t sample;
    long m0, c0;
  };
  std::vector<Item> items;
  double macs = 0.0;
  for (size_t i = 0; i < live.size(); ++i) {
    macs += double(live[i].n) * double(pin) * double(pout);
    for (long m0 = 0; m0 < pout; m0 += bm) {
      for (long c0 = 0; c0 < pin; c0 += bn) items.push_back({i, m0, c0});
    }
  }
  std::vector<double> result(items.size(), 0.0);

#pragma omp parallel if (macs > kParallelMacs)
  {
    float* c = tiles.data() + size_t(thread_id()) * per_thread;
    float* g_block = c + size_t(bm) * bn;
    float* x_block = g_block + size_t(bm) * kc_max;
#pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < long(items.size()); ++it) {
      const Item& item = items[it];
      const Sample& s = live[item.sample];
      const long rows = std::min(bm, pout - item.m0);
      const long cols = std::min(bn, pin - item.c0);
      const char* g_rows = gs + size_t(s.b * T + s.start) * size_t(d_out) * es;
      const char* x_rows = xs + size_t(s.b * T + s.start) * size_t(d_in) * es;
      for (long k0 = 0; k0 < s.n; k0 += kc_max) {
        const long kc = std::min<long>(kc_max, s.n - k0);
        K.pack_cols(g_rows + (size_t(k0) * d_out + item.m0) * es, dtype, d_out, kc, d_out - item.m0, 0, kc, 0,
                    rows / 16, g_block);
        K.pack_cols(x_rows + (size_t(k0) * d_in + item.c0) * es, dtype, d_in, kc, d_in - item.c0, 0, kc, 0, cols / 16,
                    x_block);
        K.gemm_block(Packed{g_block, kc * 16}, 0, rows, Packed{x_block, kc * 16}, 0, cols, 0, kc, c, bn, false,
                     k0 > 0);
      }
      result[it] = K.sum_squares(c, bn, rows, cols);
    }
  }
  sum_per_sample(items, result, live, 0, live.size(), out);
}

}  // namespace cpu
}  // namespace vigor
