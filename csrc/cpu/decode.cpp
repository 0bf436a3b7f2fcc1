// Decode attention on the CPU (flash-decoding): a few queries per sequence against a KV
// cache held in pages.
//
// A task is (sequence, kv head, split). Its rows are every query of every query head of the
// GQA group (G * Lq rows), so each cached key and value is read once per task, whatever G.
// The keys any row may see (causal and the window, bottom-right aligned at the sequence's
// own length) are divided evenly among the splits; a task walks its share page by page in
// tiles of up to kTile keys, scores every row against each key, and keeps an online softmax
// whose accumulator is the running weighted average of the values (never above max |v|).
// Splits merge exactly by their log-sum-exp, in split order.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_utils.h"

namespace fused_attn::cpu {
namespace {

constexpr int64_t kTile = 64;  // keys scored per online-softmax step

struct RowRange {
  int64_t lo, hi;  // keys [lo, hi) the row may see
};

RowRange row_range(const DecodeParams& p, int64_t n, int64_t i) {
  const int64_t pos = n - p.Lq + i;  // bottom-right aligned
  int64_t lo = 0, hi = n;
  if (p.causal) hi = std::min(hi, pos + 1);
  if (p.window_right >= 0) hi = std::min(hi, pos + p.window_right + 1);
  if (p.window_left >= 0) lo = std::max<int64_t>(lo, pos - p.window_left);
  return {std::clamp<int64_t>(lo, 0, n), std::clamp<int64_t>(hi, 0, n)};
}

// The keys [lo, hi) of split s of sequence b: the union of its rows' ranges, cut evenly
// into splits of a multiple of 16 keys.
RowRange split_range(const DecodeParams& p, int64_t n, int64_t s) {
  int64_t lo = n, hi = 0;
  for (int64_t i = 0; i < p.Lq; ++i) {
    const auto r = row_range(p, n, i);
    if (r.lo < r.hi) lo = std::min(lo, r.lo), hi = std::max(hi, r.hi);
  }
  if (lo >= hi) return {0, 0};
  const int64_t chunk = ((hi - lo + p.splits - 1) / p.splits + 15) / 16 * 16;
  return {std::min(hi, lo + s * chunk), std::min(hi, lo + (s + 1) * chunk)};
}

template <typename T>
void decode_task(const DecodeParams& p, int64_t b, int64_t hk, int64_t s) {
  using A = compute_t<T>;
  const int64_t G = p.Hq / p.Hk, R = G * p.Lq, D = p.D, DV = p.DV;
  const int64_t n = p.seqlens[b];
  const int64_t task = (b * p.Hk + hk) * p.splits + s;
  A* part_out = static_cast<A*>(p.part_out) + task * R * DV;
  A* part_lse = static_cast<A*>(p.part_lse) + task * R;

  AlignedBuf<A> qbuf(R * D), acc(R * DV), scores(R * kTile);
  std::vector<A> m(R, -std::numeric_limits<A>::infinity()), l(R, A(0));
  std::vector<RowRange> ranges(R);
  const T* q = static_cast<const T*>(p.q);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / p.Lq, i = r % p.Lq;
    to_compute(q + b * p.q_sb + i * p.q_si + (hk * G + g) * p.q_sh, qbuf.data() + r * D, D);
    ranges[r] = row_range(p, n, i);
  }
  std::fill(acc.begin(), acc.end(), A(0));
  const auto [start, stop] = split_range(p, n, s);
  const T* kbase = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + hk * p.v_sh;
  const int32_t* table = p.table + b * p.table_sb;
  const A neg_inf = -std::numeric_limits<A>::infinity();

  for (int64_t j0 = start; j0 < stop;) {
    const int64_t page = table[j0 / p.page], slot0 = j0 % p.page;
    const int64_t nt = std::min({kTile, stop - j0, p.page - slot0});
    const T* krows = kbase + page * p.k_sp + slot0 * p.k_ss;
    const T* vrows = vbase + page * p.v_sp + slot0 * p.v_ss;
    for (int64_t t = 0; t < nt; ++t) {  // each key row once, against every row of the group
      const T* kt = krows + t * p.k_ss;
      for (int64_t r = 0; r < R; ++r) {
        const A* qr = qbuf.data() + r * D;
        A dot = sum_vec<A>(D, [&](int64_t d, int64_t c) { return load_as<A>(qr + d, c) * load_as<A>(kt + d, c); });
        A sc = dot * A(p.scale);
        if (p.softcap > 0) sc = A(p.softcap) * std::tanh(sc / A(p.softcap));
        const int64_t j = j0 + t;
        scores.data()[r * kTile + t] = (j >= ranges[r].lo && j < ranges[r].hi) ? sc : neg_inf;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      A* sr = scores.data() + r * kTile;
      A tile_max = neg_inf;
      for (int64_t t = 0; t < nt; ++t) tile_max = std::max(tile_max, sr[t]);
      const A m_new = std::max(m[r], tile_max);
      if (m_new == neg_inf) {  // nothing seen yet: keep the row empty
        std::fill(sr, sr + nt, A(0));
        continue;
      }
      const A alpha = std::exp(m[r] - m_new);  // 0 on the row's first keys
      A tile_sum = 0;
      for (int64_t t = 0; t < nt; ++t) tile_sum += (sr[t] = std::exp(sr[t] - m_new));
      const A l_new = l[r] * alpha + tile_sum;
      // acc stays the weighted average of the values seen: old part reweighted, new part / l_new
      const A keep = l[r] * alpha / l_new, inv = A(1) / l_new;
      for (int64_t t = 0; t < nt; ++t) sr[t] *= inv;
      A* ar = acc.data() + r * DV;
      for_each_vec<A>(DV, [&](int64_t d, int64_t c) { (Vec<A>::loadu(ar + d, c) * Vec<A>(keep)).store(ar + d, c); });
      m[r] = m_new;
      l[r] = l_new;
    }
    for (int64_t t = 0; t < nt; ++t) {  // each value row once
      const T* vt = vrows + t * p.v_ss;
      for (int64_t r = 0; r < R; ++r) {
        const A w = scores.data()[r * kTile + t];
        if (w == A(0)) continue;
        A* ar = acc.data() + r * DV;
        for_each_vec<A>(DV, [&](int64_t d, int64_t c) {
          (Vec<A>::loadu(ar + d, c) + Vec<A>(w) * load_as<A>(vt + d, c)).store(ar + d, c);
        });
      }
    }
    j0 += nt;
  }
  std::copy(acc.begin(), acc.end(), part_out);
  for (int64_t r = 0; r < R; ++r) part_lse[r] = l[r] > 0 ? m[r] + std::log(l[r]) : neg_inf;
}

// out and lse of row r of (b, hk) from its splits' partial results.
template <typename T>
void merge_row(const DecodeParams& p, int64_t b, int64_t hk, int64_t r) {
  using A = compute_t<T>;
  const int64_t G = p.Hq / p.Hk, R = G * p.Lq, DV = p.DV;
  const int64_t g = r / p.Lq, i = r % p.Lq, h = hk * G + g;
  const A* part_out = static_cast<const A*>(p.part_out);
  const A* part_lse = static_cast<const A*>(p.part_lse);
  const int64_t first = (b * p.Hk + hk) * p.splits;
  A top = -std::numeric_limits<A>::infinity();
  for (int64_t s = 0; s < p.splits; ++s) top = std::max(top, part_lse[(first + s) * R + r]);
  std::vector<A> row(DV, A(0));
  A total = 0;
  if (top != -std::numeric_limits<A>::infinity()) {
    for (int64_t s = 0; s < p.splits; ++s) total += std::exp(part_lse[(first + s) * R + r] - top);
    for (int64_t s = 0; s < p.splits; ++s) {
      const A w = std::exp(part_lse[(first + s) * R + r] - top) / total;
      if (w == A(0)) continue;
      const A* o = part_out + ((first + s) * R + r) * DV;
      for (int64_t d = 0; d < DV; ++d) row[d] += w * o[d];
    }
  }
  T* out = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.Hq + h) * DV;
  for (int64_t d = 0; d < DV; ++d) out[d] = static_cast<T>(row[d]);
  static_cast<A*>(p.lse)[(b * p.Hq + h) * p.Lq + i] = total > 0 ? top + std::log(total) : top;
}

}  // namespace

void attention_decode(const DecodeParams& p) {
  const int64_t R = (p.Hq / p.Hk) * p.Lq;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, p.B * p.Hk * p.splits, 1, [&](int64_t a, int64_t z) {
      for (int64_t t = a; t < z; ++t) decode_task<T>(p, t / (p.Hk * p.splits), (t / p.splits) % p.Hk, t % p.splits);
    });
    at::parallel_for(0, p.B * p.Hk * R, 64, [&](int64_t a, int64_t z) {
      for (int64_t t = a; t < z; ++t) merge_row<T>(p, t / (p.Hk * R), (t / R) % p.Hk, t % R);
    });
  });
}

}  // namespace fused_attn::cpu
