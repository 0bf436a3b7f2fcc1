// LayerNorm (+ residual) forward and backward on the CPU: rows in parallel, each row
// converted to float32 once and reduced with two-pass statistics (mean, then the mean
// of squared deviations), vectorised with at::vec.
//
// Backward's dW/dB: rows are cut into a fixed number of blocks that depends only on the
// problem size; each block sums into its own float32 partial row and the partial rows are
// added in block order. Results are bit-identical whatever the thread count.
#include <algorithm>
#include <vector>

#include "vec_utils.h"

namespace fused_attn::cpu {
namespace {

// One row's statistics. `s` holds the normalised input in float32.
inline void row_stats(const float* s, int64_t n, float eps, float& mean, float& rstd) {
  mean = vsum(s, n) / static_cast<float>(n);
  const fVec vmean(mean);
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const fVec d = fVec::loadu(s + i) - vmean;
    acc0 = at::vec::fmadd(d, d, acc0);
  }
  if (i < n) {
    const fVec d = fVec::loadu(s + i, n - i) - vmean;
    // zero the lanes past n (the partial load fills them with 0, so d = -mean there)
    const fVec dm = fVec::set(fVec(0.f), d, n - i);
    acc1 = at::vec::fmadd(dm, dm, acc1);
  }
  const float var = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc0 + acc1) /
                    static_cast<float>(n);
  rstd = 1.f / std::sqrt(var + eps);
}

template <typename T, typename W>
void fwd(const LayerNormFwdParams& p) {
  const int64_t n = p.cols;
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(n), r, w, b;
    std::vector<T> rounded;
    if (p.residual) r.resize(n);
    if (p.weight) { w.resize(n); to_float(static_cast<const W*>(p.weight), w.data(), n); }
    if (p.bias) { b.resize(n); to_float(static_cast<const W*>(p.bias), b.data(), n); }
    if (p.residual && !p.sum_out) rounded.resize(n);
    for (int64_t row = begin; row < end; ++row) {
      const T* x = static_cast<const T*>(p.x) + row * n;
      to_float(x, s.data(), n);
      if (p.residual) {
        // the sum is rounded to T: LayerNorm normalises exactly the tensor it returns
        to_float(static_cast<const T*>(p.residual) + row * n, r.data(), n);
        at::vec::map2([](fVec a, fVec c) { return a + c; }, s.data(), s.data(), r.data(), n);
        T* sum_row = p.sum_out ? static_cast<T*>(p.sum_out) + row * n : rounded.data();
        from_float(s.data(), sum_row, n);
        to_float(sum_row, s.data(), n);
      }
      float mean, rstd;
      row_stats(s.data(), n, p.eps, mean, rstd);
      p.mean[row] = mean;
      p.rstd[row] = rstd;
      const fVec vmean(mean), vrstd(rstd);
      float* v = s.data();
      if (p.weight && p.bias) {
        at::vec::map3([&](fVec a, fVec wv, fVec bv) { return at::vec::fmadd((a - vmean) * vrstd, wv, bv); }, v, v,
                      w.data(), b.data(), n);
      } else if (p.weight) {
        at::vec::map2([&](fVec a, fVec wv) { return (a - vmean) * vrstd * wv; }, v, v, w.data(), n);
      } else if (p.bias) {
        at::vec::map2([&](fVec a, fVec bv) { return at::vec::fmadd(a - vmean, vrstd, bv); }, v, v, b.data(), n);
      } else {
        at::vec::map([&](fVec a) { return (a - vmean) * vrstd; }, v, v, n);
      }
      from_float(v, static_cast<T*>(p.y) + row * n, n);
    }
  });
}

template <typename T, typename W>
void bwd(const LayerNormBwdParams& p) {
  const int64_t n = p.cols;
  const int64_t blocks = std::max<int64_t>(1, p.partial_rows);
  const bool param_grads = p.dw_partial || p.db_partial;
  const float inv_n = 1.f / static_cast<float>(n);
  at::parallel_for(0, blocks, 1, [&](int64_t bbegin, int64_t bend) {
    std::vector<float> xhat(n), dy(n), g(n), tmp(n), w;
    if (p.weight) { w.resize(n); to_float(static_cast<const W*>(p.weight), w.data(), n); }
    for (int64_t blk = bbegin; blk < bend; ++blk) {
      const int64_t row0 = p.rows * blk / blocks, row1 = p.rows * (blk + 1) / blocks;
      float* dwp = p.dw_partial ? p.dw_partial + blk * n : nullptr;
      float* dbp = p.db_partial ? p.db_partial + blk * n : nullptr;
      for (int64_t row = row0; row < row1; ++row) {
        const fVec vmean(p.mean[row]), vrstd(p.rstd[row]);
        to_float(static_cast<const T*>(p.x) + row * n, xhat.data(), n);
        at::vec::map([&](fVec a) { return (a - vmean) * vrstd; }, xhat.data(), xhat.data(), n);
        to_float(static_cast<const T*>(p.dy) + row * n, dy.data(), n);
        if (p.weight) {
          at::vec::map2([](fVec a, fVec b) { return a * b; }, g.data(), dy.data(), w.data(), n);
        } else {
          std::copy(dy.begin(), dy.end(), g.begin());
        }
        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ the gradient of the returned sum)
        at::vec::map2([](fVec a, fVec b) { return a * b; }, tmp.data(), g.data(), xhat.data(), n);
        const fVec c1(vsum(tmp.data(), n) * inv_n), c2(vsum(g.data(), n) * inv_n);
        at::vec::map2([&](fVec gv, fVec xv) { return (gv - at::vec::fmadd(xv, c1, c2)) * vrstd; }, tmp.data(),
                      g.data(), xhat.data(), n);
        if (p.dsum) {
          to_float(static_cast<const T*>(p.dsum) + row * n, g.data(), n);
          at::vec::map2([](fVec a, fVec b) { return a + b; }, tmp.data(), tmp.data(), g.data(), n);
        }
        from_float(tmp.data(), static_cast<T*>(p.dx) + row * n, n);
        if (dwp) at::vec::map3([](fVec acc, fVec a, fVec b) { return at::vec::fmadd(a, b, acc); }, dwp, dwp,
                               dy.data(), xhat.data(), n);
        if (dbp) at::vec::map2([](fVec acc, fVec a) { return acc + a; }, dbp, dbp, dy.data(), n);
      }
    }
  });
  if (!param_grads) return;
  // Column sums of the partial rows, always in block order.
  at::parallel_for(0, n, 4096, [&](int64_t c0, int64_t c1) {
    for (float* out : {p.dw, p.db}) {
      const float* part = out == p.dw ? p.dw_partial : p.db_partial;
      if (!out || !part) continue;
      std::copy(part + c0, part + c1, out + c0);
      for (int64_t blk = 1; blk < blocks; ++blk)
        at::vec::map2([](fVec a, fVec b) { return a + b; }, out + c0, out + c0, part + blk * n + c0, c1 - c0);
    }
  });
}

template <template <typename, typename> class Kernel, typename Params>
void run(const Params& p) {
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (p.wdtype == DType::F32) {
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
  // at most 64 blocks, and at most 4M floats of partial sums per parameter
  return std::max<int64_t>(1, std::min<int64_t>({rows, 64, (int64_t(1) << 22) / cols}));
}

void layer_norm_fwd(const LayerNormFwdParams& p) { run<Fwd>(p); }
void layer_norm_bwd(const LayerNormBwdParams& p) { run<Bwd>(p); }

}  // namespace fused_attn::cpu
