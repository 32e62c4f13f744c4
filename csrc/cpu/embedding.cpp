// Embedding-table norms and the tied LM-head rows, on the CPU.
//
// embedding: ||S_b||^2 with S_b[v] = sum_{t: id_t = v} g_t. Each sample's (id, t) pairs are sorted, so the
//   rows of one id form a segment; work item = one segment (its row sum in double, then its squares).
// tied_head_rows: P[b, t] = sum_s G_head[b, s, id_t] h[b, s] for the sample's distinct ids U:
//   P_U = Gsel^T H with Gsel[s, u] = G_head[b, s, U[u]] (a T_b x |U| gather) and H the sample's rows of h,
//   computed by the blocked micro-kernel of the linear norms; each row of P_U is then written to the
//   output rows of the tokens carrying that id.
#include <algorithm>

#include "common.h"

namespace vigor {
namespace cpu {
namespace {

// (id, t) for the valid rows of a sample whose id >= 0 (ids == -1 carry no gradient), sorted by id then t.
std::vector<std::pair<int64_t, int64_t>> sorted_ids(const int64_t* ids, int64_t T, const Sample& s) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(size_t(s.n));
  for (int64_t t = s.start; t < s.start + s.n; ++t) {
    const int64_t id = ids[s.b * T + t];
    if (id >= 0) pairs.emplace_back(id, t);
  }
  std::sort(pairs.begin(), pairs.end());
  return pairs;
}

// [begin, end) of each run of equal ids in a sorted pair list.
std::vector<std::pair<size_t, size_t>> runs(const std::vector<std::pair<int64_t, int64_t>>& pairs) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t i = 0; i < pairs.size();) {
    size_t j = i + 1;
    while (j < pairs.size() && pairs[j].first == pairs[i].first) ++j;
    out.emplace_back(i, j);
    i = j;
  }
  return out;
}

}  // namespace

void embedding(const int64_t* ids, const void* g, int dtype, int64_t T, int64_t d, const Ranges& ranges, float* out) {
  elem_size(dtype);
  const std::vector<Sample> live = live_samples(ranges, out);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pairs(live.size());
  struct Segment {
    size_t sample, begin, end;
  };
  std::vector<Segment> segments;
  for (size_t i = 0; i < live.size(); ++i) {
    pairs[i] = sorted_ids(ids, T, live[i]);
    for (auto [b0, b1] : runs(pairs[i])) segments.push_back({i, b0, b1});
  }
  std::vector<double> result(segments.size(), 0.0);
  std::vector<double> sums(size_t(max_threads()) * size_t(d));
  double rows = 0.0;
  for (const Sample& s : live) rows += double(s.n);
#pragma omp parallel if (rows * double(d) > kParallelMacs / 16)
  {
    double* acc = sums.data() + size_t(thread_id()) * size_t(d);
#pragma omp for schedule(dynamic, 16)
    for (long k = 0; k < long(segments.size()); ++k) {
      const Segment& seg = segments[k];
      const Sample& s = live[seg.sample];
      std::fill(acc, acc + d, 0.0);
      for (size_t j = seg.begin; j < seg.end; ++j) {
        const size_t base = size_t(s.b * T + pairs[seg.sample][j].second) * size_t(d);
        for (int64_t f = 0; f < d; ++f) acc[f] += load_as_float(g, dtype, base + f);
      }
      double sq = 0.0;
      for (int64_t f = 0; f < d; ++f) sq += acc[f] * acc[f];
      result[k] = sq;
    }
  }
  std::vector<double> per_sample(live.size(), 0.0);
  for (size_t k = 0; k < segments.size(); ++k) per_sample[segments[k].sample] += result[k];
  for (size_t i = 0; i < live.size(); ++i) out[live[i].b] = float(per_sample[i]);
}

void tied_head_rows(const int64_t* ids, const void* h, const void* g_head, int dtype, int64_t T, int64_t d,
                    int64_t vocab, const Ranges& ranges, float* out) {
  const IsaKernels& K = isa_kernels();
  const Tuning tu = tuning();
  const size_t es = elem_size(dtype);
  const char* hs = static_cast<const char*>(h);
  const std::vector<Sample> live = live_samples(ranges);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pairs(live.size());
  std::vector<std::vector<std::pair<size_t, size_t>>> id_runs(live.size());
  for (size_t i = 0; i < live.size(); ++i) {
    pairs[i] = sorted_ids(ids, T, live[i]);
    id_runs[i] = runs(pairs[i]);
  }
  const long pd = pad16(d);
  auto pu = [&](size_t i) { return pad16(long(id_runs[i].size())); };
  auto pack_floats = [&](size_t i) { return size_t(live[i].n) * size_t(pu(i) + pd); };
  Scratch& pack = cached_scratch(kPackSlot);
  Scratch& tiles = cached_scratch(kTileSlot);

  for (const auto& wave : waves(live, [&](size_t i) { return 4 * pack_floats(i); }, tu.pack_budget)) {
    const size_t w0 = wave.first, w1 = wave.second;
    std::vector<size_t> off(w1 - w0 + 1, 0);
    struct Task {
      size_t sample;
      bool is_gsel;
      long sl0, sl1;
    };
    std::vector<Task> tasks;
    for (size_t i = w0; i < w1; ++i) {
      off[i - w0 + 1] = off[i - w0] + pack_floats(i);
      for (long s0 = 0; s0 < pu(i) / 16; s0 += 4) tasks.push_back({i, true, s0, std::min(s0 + 4, pu(i) / 16)});
      for (long s0 = 0; s0 < pd / 16; s0 += 4) tasks.push_back({i, false, s0, std::min(s0 + 4, pd / 16)});
    }
    pack.resize(off.back());
    long widest = 0;
    for (size_t i = w0; i < w1; ++i) widest = std::max(widest, pu(i));
    const std::pair<long, long> blocks = direct_blocks_for(w1 - w0, widest, pd, tu.direct_block_m, tu.direct_block_n);
    const long bm = blocks.first, bn = blocks.second;
    tiles.resize(size_t(max_threads()) * bm * bn);
    double macs = 0.0;
    for (size_t i = w0; i < w1; ++i) macs += double(live[i].n) * double(pu(i)) * double(pd);
    const bool parallel = macs > kParallelMacs;
    auto packed_gsel = [&](size_t i) { return pack.data() + off[i - w0]; };
    auto packed_h = [&](size_t i) { return packed_gsel(i) + size_t(live[i].n) * pu(i); };

#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (long k = 0; k < long(tasks.size()); ++k) {
      const Task& task = tasks[k];
      const Sample& s = live[task.sample];
      if (!task.is_gsel) {
        K.pack_cols(hs + size_t(s.b * T + s.start) * d * es, dtype, d, s.n, d, 0, s.n, task.sl0, task.sl1,
                    packed_h(task.sample));
        continue;
      }
      // Gsel slivers: 16 distinct ids each, token-major: dst[(sl * n + s) * 16 + lane].
      const auto& ids_of = pairs[task.sample];
      const auto& id_run = id_runs[task.sample];
      for (long sl = task.sl0; sl < task.sl1; ++sl) {
        float* dst = packed_gsel(task.sample) + size_t(sl) * s.n * 16;
        for (int64_t r = 0; r < s.n; ++r) {
          const size_t row = size_t(s.b * T + s.start + r) * size_t(vocab);
          for (long lane = 0; lane < 16; ++lane) {
            const size_t u = size_t(sl * 16 + lane);
            dst[r * 16 + lane] = u < id_run.size() ? load_as_float(g_head, dtype, row + ids_of[id_run[u].first].first) : 0.0f;
          }
        }
      }
    }

    struct Item {
      size_t sample;
      long m0, c0;
    };
    std::vector<Item> items;
    for (size_t i = w0; i < w1; ++i) {
      for (long m0 = 0; m0 < pu(i); m0 += bm) {
        for (long c0 = 0; c0 < pd; c0 += bn) items.push_back({i, m0, c0});
      }
    }

#pragma omp parallel if (parallel)
    {
      float* c = tiles.data() + size_t(thread_id()) * bm * bn;
#pragma omp for schedule(dynamic, 1)
      for (long it = 0; it < long(items.size()); ++it) {
        const Item& item = items[it];
        const Sample& s = live[item.sample];
        const long rows = std::min(bm, pu(item.sample) - item.m0);
        const long cols = std::min(bn, pd - item.c0);
        const Packed pg{packed_gsel(item.sample), long(s.n) * 16};
        const Packed ph{packed_h(item.sample), long(s.n) * 16};
        for (long k0 = 0; k0 < s.n; k0 += tu.direct_kc) {
          const long kc = std::min<long>(tu.direct_kc, s.n - k0);
          K.gemm_block(pg, item.m0, rows, ph, item.c0, cols, k0, kc, c, bn, false, k0 > 0);
        }
        const auto& id_run = id_runs[item.sample];
        const long width = std::min<long>(cols, d - item.c0);
        for (long u = item.m0; u < item.m0 + rows && u < long(id_run.size()); ++u) {
          const float* src = c + (u - item.m0) * bn;
          for (size_t j = id_run[u].first; j < id_run[u].second; ++j) {
            const int64_t t = pairs[item.sample][j].second;
            std::copy(src, src + width, out + size_t(s.b * T + t) * size_t(d) + item.c0);
          }
        }
      }
    }
  }
  trim_scratch();
}

}  // namespace cpu
}  // namespace vigor
