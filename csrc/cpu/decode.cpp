// Decode attention on the CPU (flash-decoding): a few queries per sequence against a KV
// cache held in pages.
//
// A task is (sequence, split of its keys), for every kv head: the heads of a token are
// adjacent in a page, so a tile of keys is read in memory order once, laid out head by head
// in a cached buffer (converted to float32 for 16-bit caches), and every head computes on it
// there (a task per head would read each head's rows at a stride of Hk * D, far below the
// memory's speed). A head's
// rows are every query of every query head of its GQA group (G * Lq rows), so each cached key
// and value is read once, whatever G. The keys any row may see (causal and the window,
// bottom-right aligned at the sequence's own length, as ALiBi's distances are) are divided
// evenly among the splits;
// S = Q K^T and O += P V go through the BLAS, one call per head and tile, with an online softmax whose accumulator is
// the running weighted average of the values (never above max |v|). Splits merge exactly by their log-sum-exp, in split
// order.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gemm.h"
#include "vec_utils.h"

namespace fused_attn::cpu {
namespace {

constexpr int64_t kMaxTile = 256;  // keys scored per online-softmax step at most

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

// Keys per tile: the tile's keys and values of every kv head stay in the core's cache while
// each head computes on them: about kTileKeyBytes of keys.
constexpr int64_t kTileKeyBytes = int64_t{1} << 18;  // 256 KB, within a core's L2
int64_t tile_keys(const DecodeParams& p, int64_t element_size) {
  const int64_t row_bytes = p.Hk * std::max(p.D, p.DV) * element_size;
  return std::clamp<int64_t>(kTileKeyBytes / row_bytes / 16 * 16, 16, kMaxTile);
}

// Split s of sequence b for every kv head: tile by tile, the tile's page runs (all heads'
// rows, contiguous) are read once from memory and computed on by each head while cached.
template <typename T>
void decode_task(const DecodeParams& p, int64_t b, int64_t s) {
  using A = compute_t<T>;
  using V = Vec<A>;
  const int64_t G = p.Hq / p.Hk, R = G * p.Lq, D = p.D, DV = p.DV, Hk = p.Hk;
  const int64_t n = p.seqlens[b];
  const int64_t tile = tile_keys(p, sizeof(A));

  AlignedBuf<A> qbuf(Hk * R * D), acc(Hk * R * DV), scores(R * tile), kbuf(Hk * tile * D), vbuf(Hk * tile * DV);
  std::vector<A> m(Hk * R, -std::numeric_limits<A>::infinity()), l(Hk * R, A(0));
  std::vector<RowRange> ranges(R);
  std::vector<A> slopes(Hk * R, A(0));  // ALiBi slope of each (kv head, row)
  const T* q = static_cast<const T*>(p.q);
  for (int64_t hk = 0; hk < Hk; ++hk)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / p.Lq, i = r % p.Lq;
      to_compute(q + b * p.q_sb + i * p.q_si + (hk * G + g) * p.q_sh, qbuf.data() + (hk * R + r) * D, D);
    }
  for (int64_t r = 0; r < R; ++r) ranges[r] = row_range(p, n, r % p.Lq);
  if (p.alibi)
    for (int64_t hk = 0; hk < Hk; ++hk)
      for (int64_t r = 0; r < R; ++r) slopes[hk * R + r] = A(p.alibi[b * p.alibi_stride + hk * G + r / p.Lq]);
  std::fill(acc.begin(), acc.end(), A(0));
  const auto [start, stop] = split_range(p, n, s);
  const T* k_all = static_cast<const T*>(p.k);
  const T* v_all = static_cast<const T*>(p.v);
  const int32_t* table = p.table + b * p.table_sb;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  // a tile [j0, j0 + nt) spans page runs: [j, j + len) at slot j % page of page table[j / page]
  auto for_each_run = [&](int64_t j0, int64_t nt, auto&& f) {
    for (int64_t j = j0; j < j0 + nt;) {
      const int64_t len = std::min(j0 + nt - j, p.page - j % p.page);
      f(j - j0, static_cast<int64_t>(table[j / p.page]), j % p.page, len);
      j += len;
    }
  };
  // the tile's keys and values, read in memory order (token by token, every head) and laid out
  // head by head in compute type: (Hk, tile, D) and (Hk, tile, DV)
  auto gather_tile = [&](int64_t j0, int64_t nt) {
    for_each_run(j0, nt, [&](int64_t col, int64_t page, int64_t slot, int64_t len) {
      for (int64_t t = 0; t < len; ++t) {
        const T* krow = k_all + page * p.k_sp + (slot + t) * p.k_ss;
        const T* vrow = v_all + page * p.v_sp + (slot + t) * p.v_ss;
        for (int64_t hk = 0; hk < Hk; ++hk) {
          to_compute(krow + hk * p.k_sh, kbuf.data() + (hk * tile + col + t) * D, D);
          to_compute(vrow + hk * p.v_sh, vbuf.data() + (hk * tile + col + t) * DV, DV);
        }
      }
    });
  };

  for (int64_t j0 = start; j0 < stop; j0 += tile) {
    const int64_t nt = std::min(tile, stop - j0);
    gather_tile(j0, nt);
    for (int64_t hk = 0; hk < Hk; ++hk) {
      gemm<A>(false, true, R, nt, D, A(p.scale), qbuf.data() + hk * R * D, D, kbuf.data() + hk * tile * D, D, A(0),
              scores.data(), tile);
      for (int64_t r = 0; r < R; ++r) {
        A* sr = scores.data() + r * tile;
        A& mr = m[hk * R + r];
        A& lr = l[hk * R + r];
        if (p.softcap > 0)
          for (int64_t t = 0; t < nt; ++t) sr[t] = A(p.softcap) * std::tanh(sr[t] / A(p.softcap));
        if (p.alibi) alibi_row<A>(sr, nt, slopes[hk * R + r], n - p.Lq + r % p.Lq - j0);
        // keys outside the row's range: before lo, from hi on (both ends of the tile at most)
        const int64_t lo = std::clamp<int64_t>(ranges[r].lo - j0, 0, nt);
        const int64_t hi = std::clamp<int64_t>(ranges[r].hi - j0, lo, nt);
        if (lo == hi) {  // nothing of this tile: P = 0, the row's state unchanged
          std::fill(sr, sr + nt, A(0));
          continue;
        }
        std::fill(sr, sr + lo, neg_inf);
        std::fill(sr + hi, sr + nt, neg_inf);
        V vmax(neg_inf);
        for_each_vec<A>(hi - lo, [&](int64_t t, int64_t c) {
          vmax = at::vec::maximum(vmax, V::set(V(neg_inf), V::loadu(sr + lo + t, c), c));
        });
        const A m_new = std::max(mr, vec_max(vmax));
        const A alpha = std::exp(mr - m_new);  // 0 on the row's first keys
        const A tile_sum = sum_vec<A>(nt, [&](int64_t t, int64_t c) {
          const V e = exp_no_subnormal<A>(V::loadu(sr + t, c) - V(m_new));  // exp(-inf) = 0 outside the range
          e.store(sr + t, c);
          return V::set(V(A(0)), e, c);
        });
        const A l_new = lr * alpha + tile_sum;
        // acc stays the weighted average of the values seen: old part reweighted, new P / l_new
        const A keep = lr * alpha / l_new, inv = A(1) / l_new;
        for_each_vec<A>(nt, [&](int64_t t, int64_t c) { (V::loadu(sr + t, c) * V(inv)).store(sr + t, c); });
        A* ar = acc.data() + (hk * R + r) * DV;
        for_each_vec<A>(DV, [&](int64_t d, int64_t c) { (V::loadu(ar + d, c) * V(keep)).store(ar + d, c); });
        mr = m_new;
        lr = l_new;
      }
      gemm<A>(false, false, R, DV, nt, A(1), scores.data(), tile, vbuf.data() + hk * tile * DV, DV, A(1),
              acc.data() + hk * R * DV, DV);
    }
  }
  for (int64_t hk = 0; hk < Hk; ++hk) {
    const int64_t task = (b * Hk + hk) * p.splits + s;
    std::copy(acc.data() + hk * R * DV, acc.data() + (hk + 1) * R * DV, static_cast<A*>(p.part_out) + task * R * DV);
    A* part_lse = static_cast<A*>(p.part_lse) + task * R;
    for (int64_t r = 0; r < R; ++r) part_lse[r] = l[hk * R + r] > 0 ? m[hk * R + r] + std::log(l[hk * R + r]) : neg_inf;
  }
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
    at::parallel_for(0, p.B * p.splits, 1, [&](int64_t a, int64_t z) {
      for (int64_t t = a; t < z; ++t) decode_task<T>(p, t / p.splits, t % p.splits);
    });
    at::parallel_for(0, p.B * p.Hk * R, 64, [&](int64_t a, int64_t z) {
      for (int64_t t = a; t < z; ++t) merge_row<T>(p, t / (p.Hk * R), (t / R) % p.Hk, t % R);
    });
  });
}

}  // namespace fused_attn::cpu
