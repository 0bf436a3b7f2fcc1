// The feed-forward block on the CPU, a block of rows at a time: the block's GEMMs go
// through the BLAS torch ships with (MKL, multi-threaded, the weights packed once for all
// blocks), and the element-wise work (bias, activation, dropout; bias and residual) is
// applied to the block in parallel while its hidden tile is still in cache, in the pass
// that finishes it: no separate element-wise kernels over the whole tensors.
//
// Only pre = x W1^T + b1 is stored for backward: the hidden activation exists only as a
// block in cache. Backward, per row block: dA = dOut W2, then one pass over pre that
// recomputes hidden = act(pre) * keep and dh = dA * keep * act'(pre), then dW2 += dOut^T
// hidden, dW1 += dh^T x and dx = dh W1 while both are still in cache. Weight and bias
// gradients add up block by block in row order (deterministic).
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "gemm.h"
#include "vec_utils.h"

namespace fused_attn::cpu {
namespace {

// Rows per block: the block's d_ff-wide hidden tile should stay in cache between the
// GEMM that writes it, the element-wise pass and the GEMM that reads it, but the BLAS
// loses efficiency on short blocks and packing the weights once costs a pass over them.
// kHiddenTileElems (an L2's size in float32) was the fastest of 2^18..2^24 elements when it was
// chosen, and with fewer than 8 such blocks one whole-tensor block was as fast or faster
// (benchmarks/bench_feed_forward.py measures both sides).
constexpr int64_t kHiddenTileElems = int64_t(1) << 20;  // 4 MB of float32
int64_t block_rows(int64_t M, int64_t d_ff) {
  const int64_t rows = std::max<int64_t>(64, kHiddenTileElems / std::max<int64_t>(d_ff, 1));
  return M < 8 * rows ? std::max<int64_t>(M, 1) : rows;
}

// The calling thread's scratch for hidden blocks, kept between calls: a fresh multi-MB
// buffer per call costs a page fault per 4 KB page on first touch (a 32 MB backward
// scratch: ~8000 faults, several ms). Buffers up to kKeepFloats are kept; larger ones are
// returned after the call.
template <typename A>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    if (n <= kKeepElems) {
      if (static_cast<int64_t>(kept().size()) < n) kept() = std::vector<A>(n);  // no copy of the old contents
      data_ = kept().data();
    } else {
      own_.reset(new A[n]);
      data_ = own_.get();
    }
  }
  A* data() const { return data_; }

 private:
  static constexpr int64_t kKeepElems = (int64_t(1) << 26) / int64_t(sizeof(A));  // 64 MB
  static std::vector<A>& kept() {
    thread_local std::vector<A> buf;
    return buf;
  }
  std::unique_ptr<A[]> own_;
  A* data_ = nullptr;
};

template <typename A>
inline Vec<A> act(const Vec<A>& h, int32_t a) {
  using V = Vec<A>;
  switch (a) {
    case kRelu: return at::vec::maximum(h, V(A(0)));
    case kGelu: return V(A(0.5)) * h * (V(A(1)) + (h * V(A(kSqrtHalf))).erf());
    case kGeluTanh: {
      const V inner = V(A(kSqrt2OverPi)) * (h + V(A(kGeluTanhCubic)) * h * h * h);
      return V(A(0.5)) * h * (V(A(1)) + inner.tanh());
    }
    default: return h / (V(A(1)) + h.neg().exp());
  }
}

template <typename A>
inline Vec<A> act_grad(const Vec<A>& h, int32_t a) {
  using V = Vec<A>;
  switch (a) {
    case kRelu: return V::blendv(V(A(0)), V(A(1)), h > V(A(0)));
    case kGelu: {
      const V cdf = V(A(0.5)) * (V(A(1)) + (h * V(A(kSqrtHalf))).erf());
      const V pdf = (V(A(-0.5)) * h * h).exp() * V(A(kInvSqrt2Pi));
      return cdf + h * pdf;
    }
    case kGeluTanh: {
      const V t = (V(A(kSqrt2OverPi)) * (h + V(A(kGeluTanhCubic)) * h * h * h)).tanh();
      const V du = V(A(kSqrt2OverPi)) * (V(A(1)) + V(A(3 * kGeluTanhCubic)) * h * h);
      return V(A(0.5)) * (V(A(1)) + t) + V(A(0.5)) * h * (V(A(1)) - t * t) * du;
    }
    default: {
      const V s = V(A(1)) / (V(A(1)) + h.neg().exp());
      return s * (V(A(1)) + h * (V(A(1)) - s));
    }
  }
}

// keep * 1/(1-p) for the elements (row, cols [c0, c0+n)) of the hidden activation
template <typename A>
inline void dropout_row(const FeedForwardParams& p, int64_t row, int64_t c0, int64_t n, A* scale_out) {
  const A s = A(1) / (A(1) - static_cast<A>(p.dropout_p));
  const uint32_t base = static_cast<uint32_t>(row * p.d_ff + c0);
  for (int64_t j = 0; j < n; ++j)
    scale_out[j] = philox_draw(p.seed, base + static_cast<uint32_t>(j)) >= p.threshold ? s : A(0);
}

// acc[c] += sum over rows of A[r, c] (A rows x cols, row stride ld): rows are added in
// float32 in blocks of kSumRows, the block sums in double, so the error does not grow with
// the row count (a float32 running sum over 1M rows was ~100x less accurate than torch's)
constexpr int64_t kSumRows = 64;
template <typename S>
void add_column_sums(const S* a, int64_t rows, int64_t cols, int64_t ld, double* acc) {
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    std::vector<S> block(n);
    for (int64_t r0 = 0; r0 < rows; r0 += kSumRows) {
      std::fill(block.begin(), block.end(), S(0));
      for (int64_t r = r0; r < std::min(rows, r0 + kSumRows); ++r)
        for_each_vec<S>(n, [&](int64_t j, int64_t c) {
          (Vec<S>::loadu(block.data() + j, c) + Vec<S>::loadu(a + r * ld + c0 + j, c)).store(block.data() + j, c);
        });
      for (int64_t j = 0; j < n; ++j) acc[c0 + j] += block[j];
    }
  });
}

template <typename S>
void store_sums(const std::vector<double>& acc, void* out) {
  for (size_t j = 0; j < acc.size(); ++j) static_cast<S*>(out)[j] = static_cast<S>(acc[j]);
}

template <typename A>
void fwd(const FeedForwardParams& p) {
  using V = Vec<A>;
  auto F = [](const void* t) { return static_cast<const A*>(t); };
  auto Fm = [](void* t) { return static_cast<A*>(t); };
  const int64_t rb = block_rows(p.M, p.d_ff);
  const bool dropout = p.dropout_p > 0.0;
  // W1^T and W2^T packed once, reused by every block
  const PackedB<A> w1t(true, p.M, rb, p.d_ff, p.d_model, F(p.w1), p.d_model);
  const PackedB<A> w2t(true, p.M, rb, p.d_model, p.d_ff, F(p.w2), p.d_ff);
  const Scratch<A> scratch(rb * p.d_ff);
  A* hid = scratch.data();  // the block's hidden activation: never leaves the cache
  for (int64_t r0 = 0; r0 < p.M; r0 += rb) {
    const int64_t rows = std::min(rb, p.M - r0);
    w1t.gemm(rows, F(p.x) + r0 * p.d_model, p.d_model, A(0), hid, p.d_ff);  // x W1^T
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t z) {
      std::vector<A> keep(dropout ? p.d_ff : 0);
      for (int64_t r = a; r < z; ++r) {
        A* h = hid + r * p.d_ff;
        A* pre = p.pre ? Fm(p.pre) + (r0 + r) * p.d_ff : nullptr;
        if (dropout) dropout_row(p, r0 + r, 0, p.d_ff, keep.data());
        for_each_vec<A>(p.d_ff, [&](int64_t j, int64_t c) {
          V v = V::loadu(h + j, c);
          if (p.b1) v = v + V::loadu(F(p.b1) + j, c);
          if (pre) v.store(pre + j, c);
          v = act<A>(v, p.activation);
          if (dropout) v = v * V::loadu(keep.data() + j, c);
          v.store(h + j, c);
        });
      }
    });
    A* out = Fm(p.out) + r0 * p.d_model;
    if (p.b2 || p.residual) {  // out starts as b2 + residual; the GEMM adds onto it (beta = 1)
      at::parallel_for(0, rows, 16, [&](int64_t a, int64_t z) {
        for (int64_t r = a; r < z; ++r) {
          A* o = out + r * p.d_model;
          const A* res = p.residual ? F(p.residual) + (r0 + r) * p.d_model : nullptr;
          for_each_vec<A>(p.d_model, [&](int64_t j, int64_t c) {
            V v(A(0));
            if (p.b2) v = V::loadu(F(p.b2) + j, c);
            if (res) v = v + V::loadu(res + j, c);
            v.store(o + j, c);
          });
        }
      });
    }
    w2t.gemm(rows, hid, p.d_ff, (p.b2 || p.residual) ? A(1) : A(0), out, p.d_model);
  }
}

template <typename A>
void bwd(const FeedForwardParams& p) {
  using V = Vec<A>;
  auto F = [](const void* t) { return static_cast<const A*>(t); };
  auto Fm = [](void* t) { return static_cast<A*>(t); };
  const int64_t rb = block_rows(p.M, p.d_ff);
  const bool dropout = p.dropout_p > 0.0;
  const PackedB<A> w2(false, p.M, rb, p.d_ff, p.d_model, F(p.w2), p.d_ff);
  const PackedB<A> w1(false, p.M, rb, p.d_model, p.d_ff, F(p.w1), p.d_model);
  const Scratch<A> scratch(2 * rb * p.d_ff);
  A* hid = scratch.data();    // the block's hidden activation, recomputed from pre
  A* dh = hid + rb * p.d_ff;  // the block's gradient of pre
  std::vector<double> db1(p.db1 ? p.d_ff : 0, 0.0);
  for (int64_t r0 = 0; r0 < p.M; r0 += rb) {
    const int64_t rows = std::min(rb, p.M - r0);
    const A* dout = F(p.dout) + r0 * p.d_model;
    const A* x = F(p.x) + r0 * p.d_model;
    const A beta = r0 > 0 ? A(1) : A(0);               // the weight gradients add up block by block, in order
    w2.gemm(rows, dout, p.d_model, A(0), dh, p.d_ff);  // dA = dOut W2
    // one pass over pre: hidden = act(pre) * keep, dh = dA * keep * act'(pre)
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t z) {
      std::vector<A> keep(dropout ? p.d_ff : 0);
      for (int64_t r = a; r < z; ++r) {
        A* g = dh + r * p.d_ff;
        A* h = hid + r * p.d_ff;
        const A* pre = F(p.pre) + (r0 + r) * p.d_ff;
        if (dropout) dropout_row(p, r0 + r, 0, p.d_ff, keep.data());
        for_each_vec<A>(p.d_ff, [&](int64_t j, int64_t c) {
          const V v = V::loadu(pre + j, c);
          V hv = act<A>(v, p.activation), gv = V::loadu(g + j, c);
          if (dropout) {
            const V k = V::loadu(keep.data() + j, c);
            hv = hv * k, gv = gv * k;
          }
          hv.store(h + j, c);
          (gv * act_grad<A>(v, p.activation)).store(g + j, c);
        });
      }
    });
    gemm<A>(true, false, p.d_model, p.d_ff, rows, A(1), dout, p.d_model, hid, p.d_ff, beta, Fm(p.dw2), p.d_ff);
    gemm<A>(true, false, p.d_ff, p.d_model, rows, A(1), dh, p.d_ff, x, p.d_model, beta, Fm(p.dw1), p.d_model);
    w1.gemm(rows, dh, p.d_ff, A(0), Fm(p.dx) + r0 * p.d_model, p.d_model);  // dx = dh W1
    if (p.db1) add_column_sums(dh, rows, p.d_ff, p.d_ff, db1.data());
  }
  if (p.db1) store_sums<A>(db1, p.db1);
  if (p.db2) {
    std::vector<double> db2(p.d_model, 0.0);
    add_column_sums(F(p.dout), p.M, p.d_model, p.d_model, db2.data());
    store_sums<A>(db2, p.db2);
  }
}

}  // namespace

// every tensor in float32, or every one in float64 (DType::F64)
void feed_forward_fwd(const FeedForwardParams& p) {
  if (p.dtype == DType::F64) return fwd<double>(p);
  fwd<float>(p);
}

void feed_forward_bwd(const FeedForwardParams& p) {
  if (p.dtype == DType::F64) return bwd<double>(p);
  bwd<float>(p);
}

}  // namespace fused_attn::cpu
