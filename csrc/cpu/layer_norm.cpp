// LayerNorm (+ residual) forward and backward on the CPU: rows in parallel, each row
// converted to float32 (float64 rows: computed in float64) once and reduced with two-pass statistics (mean, then the
// mean of squared deviations), vectorised with at::vec.
//
// Backward's dW/dB: rows are cut into a fixed number of blocks that depends only on the
// problem size; each block sums into its own partial row (the compute type) and the partial rows are
// added in block order. Results are bit-identical whatever the thread count.
#include <algorithm>
#include <vector>

#include "vec_utils.h"

namespace fused_attn::cpu {
namespace {

// Cache budgets: backward keeps a row's inputs and gradients in L1 (rowwise) up to
// kRowwiseBytes, else works on groups of rows whose inputs fill kGroupBytes (an L2's share);
// the partial dW/dB rows stay under kMaxPartialFloats per parameter.
constexpr int64_t kRowwiseBytes = int64_t(32) << 10;     // 32 KB, an L1
constexpr int64_t kGroupBytes = int64_t(256) << 10;      // 256 KB
constexpr int64_t kMaxPartialFloats = int64_t(1) << 22;  // 16 MB of float32

// Two-pass statistics of one row of T: mean, then the mean of squared deviations, in A
// (float32, or float64 for float64 rows).
template <typename T, typename A = compute_t<T>>
inline void row_stats_two_pass(const T* s, int64_t n, A eps, A& mean, A& rstd) {
  using V = Vec<A>;
  mean = sum_vec<A>(n, [&](int64_t i, int64_t c) { return load_as<A>(s + i, c); }) / static_cast<A>(n);
  const V vmean(mean), zero(A(0));
  const A var = sum_vec<A>(n,
                           [&](int64_t i, int64_t c) {
                             const V d = load_as<A>(s + i, c) - vmean;
                             // lanes past n were loaded as 0, so d = -mean there: drop them
                             return c == V::size() ? d * d : V::set(zero, d * d, c);
                           }) /
                static_cast<A>(n);
  rstd = A(1) / std::sqrt(var + eps);
}

// The same statistics a chunk at a time, so the row streams from memory once before the
// output pass: each chunk's sum and its sum of squared deviations from its own mean (two
// passes while the chunk is in L1), then mean = total / n (in float64) and the exact identity
// M2 = sum_b (M2_b + n_b (mean_b - mean)^2). No E[x^2] - E[x]^2 cancellation, and no
// running mean (whose rounding, at a large common offset, would swamp a small variance).
template <typename T>
inline void row_stats(const T* s, int64_t n, double eps, double& mean, double& rstd) {  // float64 rows
  row_stats_two_pass(s, n, eps, mean, rstd);
}
template <typename T>
inline void row_stats(const T* s, int64_t n, float eps, float& mean, float& rstd) {
  constexpr int64_t kChunk = 32 * kVec, kMaxChunks = 128;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks == 1 || chunks > kMaxChunks) return row_stats_two_pass(s, n, eps, mean, rstd);
  float sums[kMaxChunks], m2s[kMaxChunks];
  const fVec zero(0.f);
  double total = 0.0;  // the chunk sums are large (n_b * offset): add them without float32 rounding
  for (int64_t b = 0; b < chunks; ++b) {
    const int64_t c0 = b * kChunk, len = std::min(kChunk, n - c0);
    const T* x = s + c0;
    sums[b] = sum_vec(len, [&](int64_t i, int64_t c) { return load_f(x + i, c); });
    const fVec vmu(sums[b] / static_cast<float>(len));
    m2s[b] = sum_vec(len, [&](int64_t i, int64_t c) {
      const fVec d = load_f(x + i, c) - vmu;
      return c == kVec ? d * d : fVec::set(zero, d * d, c);  // lanes past len were loaded as 0
    });
    total += sums[b];
  }
  const double mean64 = total / static_cast<double>(n);
  double m2 = 0.0;
  for (int64_t b = 0; b < chunks; ++b) {
    const double len = static_cast<double>(std::min(kChunk, n - b * kChunk)), d = sums[b] / len - mean64;
    m2 += m2s[b] + len * d * d;
  }
  mean = static_cast<float>(mean64);
  rstd = 1.f / std::sqrt(static_cast<float>(m2 / static_cast<double>(n)) + eps);
}

template <typename T, typename W>
void fwd(const LayerNormFwdParams& p) {
  using A = compute_t<T>;
  using V = Vec<A>;
  const int64_t n = p.cols;
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> w, b;
    std::vector<T> scratch;
    if (p.weight) {
      w.resize(n);
      to_compute(static_cast<const W*>(p.weight), w.data(), n);
    }
    if (p.bias) {
      b.resize(n);
      to_compute(static_cast<const W*>(p.bias), b.data(), n);
    }
    if (p.residual && !p.sum_out) scratch.resize(n);
    for (int64_t row = begin; row < end; ++row) {
      const T* s = static_cast<const T*>(p.x) + row * n;
      if (p.residual) {
        // the sum is rounded to T: LayerNorm normalises exactly the tensor it returns
        const T* r = static_cast<const T*>(p.residual) + row * n;
        T* sum_row = p.sum_out ? static_cast<T*>(p.sum_out) + row * n : scratch.data();
        for_each_vec<A>(
            n, [&](int64_t i, int64_t c) { store_as<A>(sum_row + i, load_as<A>(s + i, c) + load_as<A>(r + i, c), c); });
        s = sum_row;
      }
      A mean, rstd;
      row_stats(s, n, static_cast<A>(p.eps), mean, rstd);
      static_cast<A*>(p.mean)[row] = mean;
      static_cast<A*>(p.rstd)[row] = rstd;
      const V vmean(mean), vrstd(rstd);
      T* y = static_cast<T*>(p.y) + row * n;
      const A* wp = p.weight ? w.data() : nullptr;
      const A* bp = p.bias ? b.data() : nullptr;
      for_each_vec<A>(n, [&](int64_t i, int64_t c) {
        V v = (load_as<A>(s + i, c) - vmean) * vrstd;
        if (wp) v = v * V::loadu(wp + i, c);
        if (bp) v = v + V::loadu(bp + i, c);
        store_as<A>(y + i, v, c);
      });
    }
  });
}

// Backward's first pass over one row: c1 = mean(g * xhat), c2 = mean(g), g = dy * w.
template <typename T, typename A = compute_t<T>>
inline void row_grad_sums(const T* x, const T* dy, const A* wp, int64_t n, A mean, A rstd, A& c1, A& c2) {
  using V = Vec<A>;
  const V vmean(mean), vrstd(rstd);
  // two accumulator pairs so consecutive vectors do not wait on each other
  V a1[2] = {V(A(0)), V(A(0))}, a2[2] = {V(A(0)), V(A(0))};
  int64_t k = 0;
  for_each_vec<A>(n, [&](int64_t i, int64_t c) {
    const V xhat = (load_as<A>(x + i, c) - vmean) * vrstd;  // lanes past n: dy = 0 there, so g = 0
    const V g = wp ? load_as<A>(dy + i, c) * V::loadu(wp + i, c) : load_as<A>(dy + i, c);
    a1[k] = at::vec::fmadd(g, xhat, a1[k]);
    a2[k] = a2[k] + g;
    k ^= 1;
  });
  const A inv_n = A(1) / static_cast<A>(n);
  c1 = reduce_sum<A>(a1[0] + a1[1]) * inv_n;
  c2 = reduce_sum<A>(a2[0] + a2[1]) * inv_n;
}

// Backward's row blocks in parallel: f(row0, row1, w, dw_partial_row, db_partial_row) for
// each block, w the weight in the compute type A (nullptr without one), the partial rows
// nullptr when that gradient is not wanted.
template <typename A, typename W, typename F>
void for_each_row_block(const LayerNormBwdParams& p, F&& f) {
  const int64_t n = p.cols, blocks = std::max<int64_t>(1, p.partial_rows);
  A* dw_partial = static_cast<A*>(p.dw_partial);
  A* db_partial = static_cast<A*>(p.db_partial);
  at::parallel_for(0, blocks, 1, [&](int64_t bbegin, int64_t bend) {
    std::vector<A> w;
    if (p.weight) {
      w.resize(n);
      to_compute(static_cast<const W*>(p.weight), w.data(), n);
    }
    for (int64_t blk = bbegin; blk < bend; ++blk) {
      f(p.rows * blk / blocks, p.rows * (blk + 1) / blocks, p.weight ? w.data() : nullptr,
        dw_partial ? dw_partial + blk * n : nullptr, db_partial ? db_partial + blk * n : nullptr);
    }
  });
}

// Backward, row by row: for rows whose second pass (x, dy, dx, w and the dW/dB partial
// rows) fits in L1.
template <typename T, typename W>
void bwd_rowwise(const LayerNormBwdParams& p) {
  using A = compute_t<T>;
  using V = Vec<A>;
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const int64_t n = p.cols;
  for_each_row_block<A, W>(p, [&](int64_t row0, int64_t row1, const A* wp, A* dwp, A* dbp) {
    for (int64_t row = row0; row < row1; ++row) {
      const bool first = row == row0;  // the block's first row initialises its partial sums
      const T* x = static_cast<const T*>(p.x) + row * n;
      const T* dy = static_cast<const T*>(p.dy) + row * n;
      const T* ds = p.dsum ? static_cast<const T*>(p.dsum) + row * n : nullptr;
      T* dx = static_cast<T*>(p.dx) + row * n;
      const V vmean(mean[row]), vrstd(rstd[row]);
      // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ the gradient of the returned sum), g = dy * w
      A s1, s2;
      row_grad_sums(x, dy, wp, n, mean[row], rstd[row], s1, s2);
      const V c1(s1), c2(s2);
      for_each_vec<A>(n, [&](int64_t i, int64_t c) {
        const V xhat = (load_as<A>(x + i, c) - vmean) * vrstd;
        const V dyv = load_as<A>(dy + i, c);
        const V g = wp ? dyv * V::loadu(wp + i, c) : dyv;
        V out = (g - at::vec::fmadd(xhat, c1, c2)) * vrstd;
        if (ds) out = out + load_as<A>(ds + i, c);
        store_as<A>(dx + i, out, c);
        if (dwp) (first ? dyv * xhat : at::vec::fmadd(dyv, xhat, V::loadu(dwp + i, c))).store(dwp + i, c);
        if (dbp) (first ? dyv : V::loadu(dbp + i, c) + dyv).store(dbp + i, c);
      });
    }
  });
}

// Wider rows: in groups small enough that their x and dy stay in L2 between the two
// passes; the second pass runs a column chunk at a time over the group, so the chunk's
// dW/dB sums stay in registers instead of streaming the partial rows once per input row
// (benchmarks/bench_layer_norm.py measures it).
template <typename T, typename W>
void bwd_grouped(const LayerNormBwdParams& p) {
  using A = compute_t<T>;
  using V = Vec<A>;
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const int64_t n = p.cols;
  constexpr int64_t kColVecs = 8, kCols = kColVecs * V::size();
  const int64_t group = std::clamp<int64_t>(kGroupBytes / (n * int64_t(sizeof(T))), 1, 64);
  for_each_row_block<A, W>(p, [&](int64_t row0, int64_t row1, const A* wp, A* dwp, A* dbp) {
    A c1[64], c2[64];  // per row of the group
    for (int64_t g0 = row0; g0 < row1; g0 += group) {
      const int64_t g1 = std::min(row1, g0 + group);
      // pass 1, per row
      for (int64_t row = g0; row < g1; ++row) {
        row_grad_sums(static_cast<const T*>(p.x) + row * n, static_cast<const T*>(p.dy) + row * n, wp, n, mean[row],
                      rstd[row], c1[row - g0], c2[row - g0]);
      }
      // pass 2, a column chunk at a time: dx = rstd * (g - xhat * c1 - c2) (+ the gradient
      // of the returned sum); dW += dy * xhat and dB += dy, rows added in order
      const bool first = g0 == row0;  // the block's first group starts its partial sums at 0
      for (int64_t j0 = 0; j0 < n; j0 += kCols) {
        const int64_t len = std::min(kCols, n - j0), nv = (len + V::size() - 1) / V::size();
        auto cnt = [&](int64_t v) { return std::min<int64_t>(V::size(), len - v * V::size()); };
        V aw[kColVecs], ab[kColVecs];
        for (int64_t v = 0; v < nv; ++v) {
          aw[v] = first || !dwp ? V(A(0)) : V::loadu(dwp + j0 + v * V::size(), cnt(v));
          ab[v] = first || !dbp ? V(A(0)) : V::loadu(dbp + j0 + v * V::size(), cnt(v));
        }
        for (int64_t row = g0; row < g1; ++row) {
          const T* x = static_cast<const T*>(p.x) + row * n + j0;
          const T* dy = static_cast<const T*>(p.dy) + row * n + j0;
          const T* ds = p.dsum ? static_cast<const T*>(p.dsum) + row * n + j0 : nullptr;
          T* dx = static_cast<T*>(p.dx) + row * n + j0;
          const V vmean(mean[row]), vrstd(rstd[row]), vc1(c1[row - g0]), vc2(c2[row - g0]);
          for (int64_t v = 0; v < nv; ++v) {
            const int64_t i = v * V::size(), c = cnt(v);
            const V xhat = (load_as<A>(x + i, c) - vmean) * vrstd;
            const V dyv = load_as<A>(dy + i, c);
            const V gv = wp ? dyv * V::loadu(wp + j0 + i, c) : dyv;
            V out = (gv - at::vec::fmadd(xhat, vc1, vc2)) * vrstd;
            if (ds) out = out + load_as<A>(ds + i, c);
            store_as<A>(dx + i, out, c);
            aw[v] = at::vec::fmadd(dyv, xhat, aw[v]);
            ab[v] = ab[v] + dyv;
          }
        }
        for (int64_t v = 0; v < nv; ++v) {
          if (dwp) aw[v].store(dwp + j0 + v * V::size(), cnt(v));
          if (dbp) ab[v].store(dbp + j0 + v * V::size(), cnt(v));
        }
      }
    }
  });
}

template <typename T, typename W>
void bwd(const LayerNormBwdParams& p) {
  using A = compute_t<T>;
  using V = Vec<A>;
  const int64_t n = p.cols;
  if (n * (3 * int64_t(sizeof(T)) + 3 * int64_t(sizeof(A))) <= kRowwiseBytes) {
    bwd_rowwise<T, W>(p);
  } else {
    bwd_grouped<T, W>(p);
  }
  const int64_t blocks = std::max<int64_t>(1, p.partial_rows);
  if (!p.dw_partial && !p.db_partial) return;
  // Column sums of the partial rows, always in block order.
  at::parallel_for(0, n, 4096, [&](int64_t c0, int64_t c1) {
    for (int which = 0; which < 2; ++which) {
      const A* part = static_cast<const A*>(which == 0 ? p.dw_partial : p.db_partial);
      A* out = static_cast<A*>(which == 0 ? p.dw : p.db);
      if (!out || !part) continue;
      for_each_vec<A>(c1 - c0, [&](int64_t i, int64_t c) {
        V acc = V::loadu(part + c0 + i, c);
        for (int64_t blk = 1; blk < blocks; ++blk) acc = acc + V::loadu(part + blk * n + c0 + i, c);
        acc.store(out + c0 + i, c);
      });
    }
  });
}

template <template <typename, typename> class Kernel, typename Params>
void run(const Params& p) {
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, double>) {
      Kernel<T, T>::run(p);  // float64 rows take float64 weights only (the checks say so)
    } else if (p.wdtype == DType::F32) {
      Kernel<T, float>::run(p);
    } else {
      Kernel<T, T>::run(p);
    }
  });
}

template <typename T, typename W>
struct Fwd {
  static void run(const LayerNormFwdParams& p) { fwd<T, W>(p); }
};
template <typename T, typename W>
struct Bwd {
  static void run(const LayerNormBwdParams& p) { bwd<T, W>(p); }
};

}  // namespace

int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t cols) {
  // blocks of >= 32 rows, at most 64 of them, and at most 4M floats of partial sums per
  // parameter; never fewer rows than blocks, so every block has a first row
  const int64_t blocks = std::min<int64_t>({(rows + 31) / 32, 64, kMaxPartialFloats / cols});
  return std::max<int64_t>(1, std::min(blocks, rows));
}

void layer_norm_fwd(const LayerNormFwdParams& p) { run<Fwd>(p); }
void layer_norm_bwd(const LayerNormBwdParams& p) { run<Bwd>(p); }

}  // namespace fused_attn::cpu
