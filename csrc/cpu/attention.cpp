// Masked scaled-dot-product attention on the CPU: a blocked flash attention.
//
// Forward: tasks are (batch, head, block of queries), run in parallel. Each streams the
// keys in blocks: S = scale * Q K^T through the BLAS torch ships with, the mask applied
// to S through its broadcast strides, an online softmax in float32 (ATen's exp_u20),
// then O = O * rescale + (P * 2^-e) V with l < 2^e (O stays below max |v|), O / (l 2^-e)
// at the end. Memory beyond the inputs: one tile per thread, never Lq x Lk. Keys past the
// last one a key-padding mask allows are skipped.
//
// Backward, deterministic: tasks are (batch, kv head, chunk of query blocks). A task walks
// its query blocks (for every query head of a GQA group) and the key blocks they see,
// recomputing P = exp(S - m) / l from the forward's row statistics, and accumulates
// dV += P^T dO, dK += dS^T Q (in its own buffer) and dQ += dS K for rows only it owns.
// The chunk count depends on the problem size, never on the thread count; chunk sums
// are added in chunk order. Results are bit-identical whatever the number of threads
// (given MKL's own reproducibility: MKL_CBWR).
//
// Packed sequences (AttentionParams::n_seq): each sequence with queries is a problem of its
// own (B = 1, its lengths, pointers at its first rows, outputs in the packed layout through
// their strides); the tasks of every problem run in one loop, taken one at a time.
//
// Dropout: Philox-4x32-10 draws identical to the Triton and CUDA kernels (philox_draw).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "gemm.h"
#include "vec_utils.h"

namespace fused_attn::cpu {
namespace {

// (queries, keys) per block. Large blocks keep the GEMMs efficient (fewer, bigger BLAS
// calls); backward holds three tiles, so it uses smaller ones.
struct Blocks {
  int64_t m, n;
};
constexpr Blocks kFwd{256, 512};
constexpr Blocks kBwd{128, 256};
template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();
constexpr float NEG_INF = kNegInf<float>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Causal offset: query i may see key j <= i + offset.
inline int64_t causal_offset(const AttentionParams& p) { return p.causal == kCausalLowerRight ? p.Lk - p.Lq : 0; }

// Query i may see keys [row_lo, row_hi): the causal variant and the sliding window
// (bottom-right aligned: position i + Lk - Lq), both rising with i.
inline int64_t row_hi(const AttentionParams& p, int64_t i) {
  int64_t hi = p.Lk;
  if (p.causal != kCausalNone) hi = std::min(hi, i + causal_offset(p) + 1);
  if (p.windowed && p.window_right >= 0) hi = std::min(hi, i + p.Lk - p.Lq + p.window_right + 1);
  return std::clamp<int64_t>(hi, 0, p.Lk);
}
inline int64_t row_lo(const AttentionParams& p, int64_t i) {
  if (!p.windowed || p.window_left < 0) return 0;
  return std::clamp<int64_t>(i + p.Lk - p.Lq - p.window_left, 0, p.Lk);
}

// One past the last key any query in [i0, i1) may see.
inline int64_t key_limit(const AttentionParams& p, int64_t i1) { return row_hi(p, i1 - 1); }

// The first key block any query of [i0, ...) may see starts here (a multiple of 16, so that
// forward and backward, whose query blocks differ, tile the keys alike): blocks wholly left
// of a sliding window are never visited.
inline int64_t key_start(const AttentionParams& p, int64_t i0) { return row_lo(p, i0) / 16 * 16; }

// With a window of `left` keys, query blocks of about left / 4 rows visit little more than
// their rows' windows (a 256-row block under a 256-key window would compute twice the keys it
// uses).
inline int64_t window_block_m(const AttentionParams& p, int64_t cap) {
  if (!p.windowed || p.window_left < 0) return cap;
  return std::clamp<int64_t>(round_up(p.window_left / 4, 32), 32, cap);
}

// Key tiles under a window: one tile holds a whole query block's window (its rows see keys
// from left before the first to the last row; +15 for the start's rounding to 16), so each
// block of scores is one GEMM of the width it needs (key tiles of about left / 2 took two or
// three smaller GEMMs per block, and their edges computed more masked keys).
inline int64_t key_tile(const AttentionParams& p, int64_t block_m, int64_t cap) {
  if (!p.windowed || p.window_left < 0) return std::min(cap, round_up(p.Lk, 16));
  return std::min({round_up(p.window_left + block_m + 15, 16), int64_t(kFwd.n), round_up(p.Lk, 16)});
}
inline int64_t bwd_block_m(const AttentionParams& p) { return std::min(window_block_m(p, kBwd.m), p.Lq); }

inline double mask_value(DType t, const void* base, int64_t off) {  // one element of a float mask
  switch (t) {
    case DType::F32: return static_cast<const float*>(base)[off];
    case DType::F16: return static_cast<float>(static_cast<const c10::Half*>(base)[off]);
    case DType::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[off]);
    case DType::F64: return static_cast<const double*>(base)[off];
  }
  return 0.0;
}

// The mask of one (batch, head): what mask_row reads.
struct MaskView {
  int32_t kind;  // 0 none, 1 bool, 2 float
  DType dtype;   // of a float mask
  const void* data;
  int64_t stride_m, stride_n;  // query, key
};

MaskView mask_view(const AttentionParams& p, int64_t b, int64_t h) {
  const int64_t* ms = p.mask_stride;
  const char* base = static_cast<const char*>(p.mask);
  const int64_t elt = p.mask_kind == kMaskBool ? 1 : dtype_size(p.mask_dtype);
  return {p.mask_kind, p.mask_dtype, base ? base + (b * ms[0] + h * ms[1]) * elt : nullptr, ms[2], ms[3]};
}

// A bool mask that is the same for every query (a key-padding mask) becomes one float
// row of 0 / -inf, built once per task: applying it is then a vector add.
template <typename A>
MaskView as_float_row(const MaskView& m, int64_t lk, std::vector<A>& row) {
  if (m.kind != 1 || m.stride_m != 0) return m;
  row.resize(lk);
  const uint8_t* d = static_cast<const uint8_t*>(m.data);
  for (int64_t j = 0; j < lk; ++j) row[j] = d[j * m.stride_n] ? A(0) : kNegInf<A>;
  return {2, std::is_same_v<A, double> ? DType::F64 : DType::F32, row.data(), 0, 1};
}

// Row s of a score tile holds scale * q.k for query i and keys [j0, j0+nb) (the scale
// rides on the GEMM's alpha). Calls f(load, valid): keys at or past `valid` are masked
// (causal limit, or a bool key-padding value that masks the whole row), and load(j, c)
// gives s[j, j+c) with the mask applied (float mask added, -inf where a bool mask says
// no), lanes past c at -inf. The mask is applied while the scores are read, never in a
// pass of its own.
template <typename A, typename G>
void with_masked_row(const AttentionParams& p, const MaskView& mv, const A* s, int64_t i, int64_t j0, int64_t nb,
                     G&& g) {
  using V = Vec<A>;
  const int64_t valid = std::clamp<int64_t>(row_hi(p, i) - j0, 0, nb);
  const V vneg(kNegInf<A>);
  // keys left of a sliding window's edge (the first `first` of this block) load as -inf
  const int64_t first = std::clamp<int64_t>(row_lo(p, i) - j0, 0, valid);
  auto f = [&](auto&& load, int64_t v) {
    if (first == 0) return g(load, v);
    return g(
        [&](int64_t j, int64_t c) {
          const V x = load(j, c);
          return j >= first ? x : V::set(x, vneg, std::min<int64_t>(first - j, c));
        },
        v);
  };
  auto tail = [vneg](const V& v, int64_t c) { return c == V::size() ? v : V::set(vneg, v, c); };
  auto plain = [&](int64_t j, int64_t c) { return tail(V::loadu(s + j, c), c); };
  if (mv.kind == 0 || valid == 0) return f(plain, valid);
  const int64_t row_off = i * mv.stride_m + j0 * mv.stride_n, st = mv.stride_n;
  if (mv.kind == 1) {
    const uint8_t* m = static_cast<const uint8_t*>(mv.data) + row_off;
    if (st == 0) return f(plain, m[0] ? valid : 0);  // one value for the whole row
    const V zero(A(0));
    return f(
        [&, m, st](int64_t j, int64_t c) {
          A keep[V::size()] = {};
          if (st == 1 && c == V::size()) {
            for (int64_t k = 0; k < V::size(); ++k) keep[k] = m[j + k];  // vectorised byte -> A
          } else {
            for (int64_t k = 0; k < c; ++k) keep[k] = m[(j + k) * st];
          }
          return tail(V::blendv(vneg, V::loadu(s + j, c), V::loadu(keep, c) != zero), c);
        },
        valid);
  }
  dispatch_dtype(mv.dtype, [&](auto tag) {
    using M = decltype(tag);
    // a float mask has the inputs' dtype: float64 with float64, the others with float32
    if constexpr (std::is_same_v<M, double> == std::is_same_v<A, double>) {
      const M* m = static_cast<const M*>(mv.data) + row_off;
      if (st == 1) {
        f([&, m](int64_t j, int64_t c) { return tail(V::loadu(s + j, c) + load_as<A>(m + j, c), c); }, valid);
      } else {
        f(
            [&, m, st](int64_t j, int64_t c) {
              A tmp[V::size()] = {};
              for (int64_t k = 0; k < c; ++k) tmp[k] = static_cast<A>(m[(j + k) * st]);
              return tail(V::loadu(s + j, c) + V::loadu(tmp, c), c);
            },
            valid);
      }
    }
  });
}

// P values may exceed 1 by up to e^kLazy: the running reference m is raised only when a
// score passes it by more than that (FlashAttention-4's conditional rescaling), so the
// row max never needs a pass of its own. Relative precision is the same at any scale,
// and P is scaled by a power of two near 1/l before it meets V.
constexpr double kLazy = 16.0;

// Forward, one row, one pass: s[0:valid) = exp(masked score - m), s[valid:nb) = 0, where
// m (the running reference, in/out) is raised first whenever a vector of scores passes
// m + kLazy, rescaling what this row already holds. Returns the row's sum at the final m.
template <typename A, typename Load>
A exp_row_lazy(A* s, int64_t valid, int64_t nb, A& m, Load&& load) {
  using V = Vec<A>;
  V sum(A(0)), vm(m), vthreshold(m + A(kLazy));
  for (int64_t j = 0; j < valid; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), valid - j);
    const V v = load(j, c);
    // rare: a new reference (always the first finite score). A NaN score counts as passing
    // (!(v <= threshold)): vec_max propagates it into m, so the row comes out NaN, as in
    // torch's math path, instead of a NaN query row silently giving 0
    if ((v <= vthreshold).zero_mask() != 0) {
      const A m_new = vec_max<A>(v);
      const V f(std::exp(m - m_new));  // 0 while m is -inf
      for_each_vec<A>(j, [&](int64_t k, int64_t ck) { (V::loadu(s + k, ck) * f).store(s + k, ck); });
      sum = sum * f;
      m = m_new, vm = V(m), vthreshold = V(m + A(kLazy));
    }
    // nothing allowed so far in this row (m = -inf): 0, not exp(-inf - -inf) = NaN
    const V e = m == kNegInf<A> ? V(A(0)) : exp_no_subnormal<A>(v - vm);
    e.store(s + j, c);
    sum = sum + (c == V::size() ? e : V::set(V(A(0)), e, c));
  }
  std::fill(s + valid, s + nb, A(0));
  return reduce_sum<A>(sum);
}

// The largest masked score of a row (-inf when none is allowed; NaN propagates).
template <typename A, typename Load>
A masked_row_max(int64_t valid, Load&& load) {
  using V = Vec<A>;
  V mx(kNegInf<A>);
  for (int64_t j = 0; j < valid; j += V::size())
    mx = at::vec::maximum(mx, load(j, std::min<int64_t>(V::size(), valid - j)));
  return vec_max<A>(mx);
}

// Backward, one row: s[0:valid) = exp(masked score - m) * inv_l (the forward's stats; a
// fully masked row has inv_l = 0), s[valid:nb) = 0.
template <typename A, typename Load>
void exp_row_stats(A* s, int64_t valid, int64_t nb, A m, A inv_l, Load&& load) {
  using V = Vec<A>;
  const V vm(m), vinv(inv_l);
  for (int64_t j = 0; j < valid; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), valid - j);
    (exp_no_subnormal<A>(load(j, c) - vm) * vinv).store(s + j, c);
  }
  std::fill(s + valid, s + nb, A(0));
}

// softcap c > 0 (Gemma-2): a score s becomes c * tanh(s / c), before masks; this is tanh(s / c).
template <typename A>
inline Vec<A> softcap_tanh(const Vec<A>& s, A c) {
  return (s * Vec<A>(A(1) / c)).tanh();
}

// s[0, n) = c * tanh(s / c); with `slope`, also d(c tanh(s / c)) / ds = 1 - tanh^2 into
// slope[0, n) (the backward's chain rule).
template <typename A>
void softcap_row(A* s, int64_t n, A c, A* slope) {
  using V = Vec<A>;
  const V vc(c), one(A(1));
  for_each_vec<A>(n, [&](int64_t j, int64_t k) {
    const V t = softcap_tanh<A>(V::loadu(s + j, k), c);
    (t * vc).store(s + j, k);
    if (slope) (one - t * t).store(slope + j, k);
  });
}

// The ALiBi slope of (b, h) (0 without ALiBi).
template <typename A>
A alibi_slope(const AttentionParams& p, int64_t b, int64_t h) {
  return p.alibi ? static_cast<A>(p.alibi[b * p.alibi_stride + h]) : A(0);
}

// When the mask is the same for every query (a key-padding mask: query stride 0), keys
// after its last allowed one need not be visited at all.
int64_t mask_key_limit(const AttentionParams& p, int64_t b, int64_t h, int64_t hi) {
  if (p.mask_kind == kMaskNone || p.mask_stride[2] != 0) return hi;
  const int64_t base = b * p.mask_stride[0] + h * p.mask_stride[1];
  const int64_t st = p.mask_stride[3];
  for (int64_t j = hi - 1; j >= 0; --j) {
    const bool allowed = p.mask_kind == kMaskBool ? static_cast<const uint8_t*>(p.mask)[base + j * st] != 0
                                                  : mask_value(p.mask_dtype, p.mask, base + j * st) != kNegInf<double>;
    if (allowed) return j + 1;
  }
  return 0;
}

// Multiplies P row r (queries i0 + r, keys j0..) by keep / (1 - p); with `also`, that row too.
template <typename A>
void apply_dropout(const AttentionParams& p, int64_t bh, A* P, A* also, int64_t ld, int64_t rows, int64_t i0,
                   int64_t nb, int64_t j0) {
  const A scale = A(1) / (A(1) - static_cast<A>(p.dropout_p));
  const uint64_t key = p.seed + static_cast<uint64_t>(bh);
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t base = static_cast<uint32_t>((i0 + r) * p.Lk + j0);
    A* s = P + r * ld;
    A* t = also ? also + r * ld : nullptr;
    for (int64_t n = 0; n < nb; ++n) {
      const A f = philox_draw(key, base + static_cast<uint32_t>(n)) >= p.threshold ? scale : A(0);
      s[n] *= f;
      if (t) t[n] *= f;
    }
  }
}

// The problems a call holds: the batch itself, or each packed sequence with queries, the
// costliest (Lq * Lk) first so that the threads taking tasks one at a time end together.
template <typename A>
std::vector<AttentionParams> problems(const AttentionParams& p) {
  if (p.n_seq == 0) return {p};
  std::vector<AttentionParams> out;
  for (int64_t s = 0; s < p.n_seq; ++s)
    if (p.seq_q[s + 1] > p.seq_q[s]) select_sequence<A, A>(out.emplace_back(p), s);
  std::stable_sort(out.begin(), out.end(),
                   [](const AttentionParams& a, const AttentionParams& b) { return a.Lq * a.Lk > b.Lq * b.Lk; });
  return out;
}

// Calls work(next) once per thread; next() gives the thread's next task in [0, total), or -1.
// One problem: contiguous ranges of tasks (consecutive tasks share mask tiles in cache).
// Packed sequences (`dynamic`), whose tasks differ in cost: one task at a time from a shared
// counter. A task's result never depends on the thread that runs it.
template <typename Work>
void run_tasks(int64_t total, bool dynamic, Work&& work) {
  if (!dynamic) {
    at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
      int64_t t = begin;
      work([&]() { return t < end ? t++ : int64_t(-1); });
    });
    return;
  }
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, std::min<int64_t>(total, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    work([&]() {
      const int64_t t = counter.fetch_add(1);
      return t < total ? t : int64_t(-1);
    });
  });
}

// Tasks of several problems in one parallel loop: problem i owns tasks [first[i], first[i + 1]).
struct TaskRanges {
  std::vector<int64_t> first{0};
  void add(int64_t n) { first.push_back(first.back() + n); }
  int64_t total() const { return first.back(); }
  int64_t problem_of(int64_t t) const { return std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1; }
};

// ---- Sliding windows: one tile per query block, scores transposed ----
// Under a window a query block's keys fit one tile, so its softmax needs no running rescale.
// The scores are computed transposed, S^T (keys x queries) = K (scale Q)^T, by a register-blocked
// kernel that skips the query vectors a key's window leaves out (a GEMM of the whole tile
// computes the tile's masked corners too: 320 keys per row for 257 used under a 256-key window,
// with 64-row blocks); the softmax runs down the key axis, vectorised over queries; O = P V by a
// kernel over groups of kBandPVRows queries that reads only the keys of their windows.
// float32 only, without a mask tensor or dropout (those take the tiled path).
constexpr int64_t kBandW = fVec::size();
constexpr int64_t kBandRows = 4 * kBandW;        // queries per block (64 with AVX-512)
constexpr int64_t kBandMaxSpan = 1024;           // keys a block may span
constexpr int kBandKeys = kBandW >= 16 ? 6 : 2;  // keys per score kernel call
constexpr int kBandQV = 4;                       // query vectors per score kernel call
constexpr int kBandPVRows = 4;                   // queries per P V kernel call (divides kBandW)
constexpr int kBandPVD = kBandW >= 16 ? 4 : 2;   // output vectors per P V kernel call
static_assert(kBandW % kBandPVRows == 0);

// Whether p takes band_block: a window with a left bound, no mask tensor, no dropout, DV a multiple
// of the vector width, and every query block of kBandRows rows spanning at most kBandMaxSpan keys.
bool band_fits(const AttentionParams& p) {
  if (!p.windowed || p.window_left < 0 || p.mask_kind != kMaskNone || p.dropout_p > 0.0 || p.DV % kBandW != 0)
    return false;
  for (int64_t i0 = 0; i0 < p.Lq; i0 += kBandRows) {
    if (row_hi(p, std::min(i0 + kBandRows, p.Lq) - 1) - row_lo(p, i0) > kBandMaxSpan) return false;
  }
  return true;
}

// One query block's working set: rows [i0, i0 + rows) of one (batch, head).
struct BandBlock {
  const AttentionParams* p;
  const float *Q, *K, *V;
  float *O, *stat_m, *stat_inv_l;  // O's rows at p->out_stride[2]
  int64_t i0, rows;
  float scale, alibi;
};

// Per-thread scratch of the band path.
struct BandScratch {
  explicit BandScratch(int64_t D)
      : qt(D * kBandRows),
        st(kBandMaxSpan * kBandRows),
        m(kBandRows),
        l(kBandRows),
        rmin(kBandMaxSpan),
        rmax(kBandMaxSpan) {}
  AlignedBuf<float> qt, st, m, l;        // scale Q^T (D x rows), S^T then P^T (keys x rows), row max and scaled sum
  std::vector<int64_t> rmin, rmax;       // per key: the block's rows whose windows hold it, [rmin, rmax]
  int64_t lo[kBandRows], hi[kBandRows];  // per row: its keys [lo, hi) (lo = hi = Lk past the block)
  int64_t ja = 0;                        // st's first key
};

// S^T rows j .. j + R - 1 (R keys), query vectors v0 .. v0 + NV - 1: the scores with the softcap,
// ALiBi and the window applied (-inf outside); raises each query's max in w.m.
template <int R, int NV>
void band_score_tile(const BandBlock& bb, BandScratch& w, int64_t j, int64_t v0) {
  const AttentionParams& p = *bb.p;
  fVec acc[R][NV];
  for (int k = 0; k < R; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = fVec(0.f);
  const float* kr[R];
  for (int k = 0; k < R; ++k) kr[k] = bb.K + (j + k) * p.k_stride[2];
  const float* qt = w.qt.data() + v0 * kBandW;
  for (int64_t d = 0; d < p.D; ++d) {
    fVec qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = fVec::loadu(qt + d * kBandRows + v * kBandW);
    for (int k = 0; k < R; ++k) {
      const fVec kb(kr[k][d]);
      for (int v = 0; v < NV; ++v) acc[k][v] = at::vec::fmadd(kb, qv[v], acc[k][v]);
    }
  }
  const fVec neg(NEG_INF);
  fVec mx[NV];
  for (int v = 0; v < NV; ++v) mx[v] = fVec::loadu(w.m.data() + (v0 + v) * kBandW);
  for (int k = 0; k < R; ++k) {
    const int64_t jj = j + k, rlo = w.rmin[jj - w.ja], rhi = w.rmax[jj - w.ja];
    float* srow = w.st.data() + (jj - w.ja) * kBandRows;
    for (int v = 0; v < NV; ++v) {
      const int64_t r0 = (v0 + v) * kBandW;
      fVec s = acc[k][v];
      if (p.softcap > 0) {
        const float c = static_cast<float>(p.softcap);
        s = softcap_tanh<float>(s, c) * fVec(c);
      }
      if (p.alibi) {  // query r sits at position i0 + r + Lk - Lq
        const fVec dist = fVec::arange(static_cast<float>(bb.i0 + r0 + p.Lk - p.Lq - jj), 1.f).abs();
        s = s - fVec(bb.alibi) * dist;
      }
      if (rlo > r0 || rhi < r0 + kBandW - 1) {
        const fVec r = fVec::arange(static_cast<float>(r0), 1.f);
        s = fVec::blendv(neg, s, (r >= fVec(static_cast<float>(rlo))) & (r <= fVec(static_cast<float>(rhi))));
      }
      s.store(srow + r0);
      mx[v] = at::vec::maximum(mx[v], s);
    }
  }
  for (int v = 0; v < NV; ++v) mx[v].store(w.m.data() + (v0 + v) * kBandW);
}

// Rows r0 .. r0 + nrows - 1 (nrows <= kBandPVRows) of O, output columns [dc, dc + ND W): the sum
// over keys [klo, khi) of P^T[key, row] V[key], divided by the row's (scaled) sum l.
template <int ND>
void band_pv_tile(const BandBlock& bb, const BandScratch& w, int64_t r0, int64_t nrows, int64_t klo, int64_t khi,
                  int64_t dc) {
  const AttentionParams& p = *bb.p;
  fVec acc[kBandPVRows][ND];
  for (int q = 0; q < kBandPVRows; ++q)
    for (int n = 0; n < ND; ++n) acc[q][n] = fVec(0.f);
  const float* pt = w.st.data() + (klo - w.ja) * kBandRows + r0;
  const float* vr = bb.V + klo * p.v_stride[2] + dc;
  for (int64_t j = klo; j < khi; ++j, pt += kBandRows, vr += p.v_stride[2]) {
    fVec vv[ND];
    for (int n = 0; n < ND; ++n) vv[n] = fVec::loadu(vr + n * kBandW);
    for (int q = 0; q < kBandPVRows; ++q) {
      const fVec pb(pt[q]);
      for (int n = 0; n < ND; ++n) acc[q][n] = at::vec::fmadd(pb, vv[n], acc[q][n]);
    }
  }
  for (int64_t q = 0; q < nrows; ++q) {
    const float l = w.l.data()[r0 + q];
    const fVec inv(l > 0.f ? 1.f / l : 0.f);  // 0: a row that sees no key
    float* o = bb.O + (r0 + q) * p.out_stride[2] + dc;
    for (int n = 0; n < ND; ++n) (acc[q][n] * inv).store(o + n * kBandW);
  }
}

template <std::size_t... I>
constexpr auto band_score_table(std::index_sequence<I...>) {
  using Fn = void (*)(const BandBlock&, BandScratch&, int64_t, int64_t);
  return std::array<Fn, sizeof...(I)>{&band_score_tile<int(I / kBandQV) + 1, int(I % kBandQV) + 1>...};
}
template <std::size_t... I>
constexpr auto band_pv_table(std::index_sequence<I...>) {
  using Fn = void (*)(const BandBlock&, const BandScratch&, int64_t, int64_t, int64_t, int64_t, int64_t);
  return std::array<Fn, sizeof...(I)>{&band_pv_tile<int(I) + 1>...};
}

// One query block under a window (band_fits): out rows, the row max m and 1 / l into the stats.
void band_block(const BandBlock& bb, BandScratch& w) {
  static constexpr auto score_tiles = band_score_table(std::make_index_sequence<kBandKeys * kBandQV>{});
  static constexpr auto pv_tiles = band_pv_table(std::make_index_sequence<kBandPVD>{});
  const AttentionParams& p = *bb.p;
  const int64_t rows = bb.rows;
  int64_t ja = p.Lk, jb = 0;
  for (int64_t r = 0; r < kBandRows; ++r) {
    w.lo[r] = r < rows ? row_lo(p, bb.i0 + r) : p.Lk;
    w.hi[r] = r < rows ? row_hi(p, bb.i0 + r) : p.Lk;
    if (w.lo[r] < w.hi[r]) ja = std::min(ja, w.lo[r]), jb = std::max(jb, w.hi[r]);
  }
  if (ja >= jb) {  // no query of the block sees a key
    for (int64_t r = 0; r < rows; ++r) {
      std::fill(bb.O + r * p.out_stride[2], bb.O + r * p.out_stride[2] + p.DV, 0.f);
      bb.stat_m[r] = bb.stat_inv_l[r] = 0.f;
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(jb - ja <= kBandMaxSpan);
  w.ja = ja;
  // rows whose windows hold key j: hi > j (rising from rmin) and lo <= j (up to rmax)
  for (int64_t j = ja, rmin = 0, rmax = -1; j < jb; ++j) {
    while (rmin < kBandRows && w.hi[rmin] <= j) ++rmin;
    while (rmax + 1 < kBandRows && w.lo[rmax + 1] <= j) ++rmax;
    w.rmin[j - ja] = rmin, w.rmax[j - ja] = rmax;
  }
  // scale Q^T, zero past the block's rows
  float* qt = w.qt.data();
  at::vec::transpose_mxn<float>(bb.Q, p.q_stride[2], qt, kBandRows, static_cast<int>(rows), static_cast<int>(p.D));
  for (int64_t d = 0; d < p.D; ++d) {
    float* row = qt + d * kBandRows;
    for_each_vec(rows, [&](int64_t r, int64_t c) { (fVec::loadu(row + r, c) * fVec(bb.scale)).store(row + r, c); });
    std::fill(row + rows, row + kBandRows, 0.f);
  }
  std::fill(w.m.begin(), w.m.end(), NEG_INF);  // each row's max, raised by the score tiles
  for (int64_t j = ja; j < jb; j += kBandKeys) {
    const int64_t nk = std::min<int64_t>(kBandKeys, jb - j);
    const int64_t vlo = w.rmin[j - ja] / kBandW, vhi = w.rmax[j + nk - 1 - ja];
    for (int64_t v = vlo; vhi >= 0 && v <= vhi / kBandW; v += kBandQV) {
      const int64_t nv = std::min<int64_t>(kBandQV, vhi / kBandW - v + 1);
      score_tiles[(nk - 1) * kBandQV + nv - 1](bb, w, j, v);
    }
  }
  // softmax down the key axis. P is scaled by 2^-e with 2^e >= the block's keys: every P is at
  // most 1 (m is the row's max), so no sum of P v exceeds max |v| (an unnormalised sum of 67
  // values of 1.7e38 overflows float32 where the result does not), and powers of two round nothing
  int e;
  std::frexp(static_cast<float>(jb - ja), &e);
  const fVec pscale(std::ldexp(1.f, -e));
  for (int64_t v = 0; v * kBandW < rows; ++v) {
    const int64_t first = v * kBandW, last = std::min(first + kBandW, rows) - 1;
    const int64_t klo = std::max(w.lo[first], ja), khi = std::min(w.hi[last], jb);
    float* col = w.st.data() + first;
    const fVec mx = fVec::loadu(w.m.data() + first);
    fVec sum(0.f);
    // a row that sees no key keeps m = -inf: its P is exp(-inf - 0) = 0, not NaN
    const fVec m_safe = fVec::blendv(mx, fVec(0.f), mx == fVec(NEG_INF));
    for (int64_t j = klo; j < khi; ++j) {
      float* s = col + (j - ja) * kBandRows;
      const fVec pv = exp_no_subnormal<float>(fVec::loadu(s) - m_safe) * pscale;
      pv.store(s);
      sum = sum + pv;
    }
    sum.store(w.l.data() + first);
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kBandPVRows) {
    const int64_t nrows = std::min<int64_t>(kBandPVRows, rows - r0);
    const int64_t klo = std::max(w.lo[r0], ja), khi = std::min(w.hi[r0 + nrows - 1], jb);
    if (klo >= khi) {  // rows that see no key
      for (int64_t q = 0; q < nrows; ++q) {
        float* o = bb.O + (r0 + q) * p.out_stride[2];
        std::fill(o, o + p.DV, 0.f);
      }
      continue;
    }
    for (int64_t dc = 0; dc < p.DV; dc += kBandPVD * kBandW)
      pv_tiles[std::min<int64_t>(kBandPVD, (p.DV - dc) / kBandW) - 1](bb, w, r0, nrows, klo, khi, dc);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float l = w.l.data()[r];
    bb.stat_m[r] = l > 0.f ? w.m.data()[r] : 0.f;
    bb.stat_inv_l[r] = l > 0.f ? std::ldexp(1.f / l, -e) : 0.f;
  }
}

struct FwdPlan {
  int64_t BM, BN, nq;
  bool heads_inner;  // a full (Lq, Lk) mask shared by the heads: a query block's heads run back to back
  bool band;         // blocks of kBandRows through band_block
};

template <typename A>
FwdPlan fwd_plan(const AttentionParams& p) {
  if (std::is_same_v<A, float> && band_fits(p)) return {kBandRows, 0, ceil_div(p.Lq, kBandRows), false, true};
  // causal or windowed: smaller query blocks skip more of the masked keys
  const int64_t bm = p.causal || p.windowed ? std::clamp<int64_t>(round_up(p.Lq / 8, 32), 32, kFwd.m) : kFwd.m;
  const int64_t BM = std::max<int64_t>(1, std::min({bm, window_block_m(p, kFwd.m), p.Lq}));
  // with heads_inner, the mask tile of a query block is read from cache, not memory, by all
  // heads but the first
  const bool heads_inner = p.mask_kind != kMaskNone && p.mask_stride[1] == 0 && p.mask_stride[2] != 0 && p.H > 1;
  return {BM, key_tile(p, BM, kFwd.n), ceil_div(p.Lq, BM), heads_inner, false};
}

template <typename A>
void fwd(const AttentionParams& p0) {
  auto in = [](const void* t) { return static_cast<const A*>(t); };
  const std::vector<AttentionParams> probs = problems<A>(p0);
  std::vector<FwdPlan> plans;
  TaskRanges tasks;
  int64_t max_s = 1, max_bm = 1;
  bool any_band = false;
  for (const auto& p : probs) {
    plans.push_back(fwd_plan<A>(p));
    any_band = any_band || plans.back().band;
    tasks.add(p.B * p.H * plans.back().nq);
    max_s = std::max(max_s, plans.back().BM * plans.back().BN), max_bm = std::max(max_bm, plans.back().BM);
  }
  const bool dropout = p0.dropout_p > 0.0;
  const A scale = static_cast<A>(p0.scale);
  run_tasks(tasks.total(), p0.n_seq > 0, [&](auto&& next_task) {
    AlignedBuf<A> S(max_s), acc(max_bm * p0.DV);
    std::vector<A> m(max_bm), l(max_bm), mask_row_buf;
    std::vector<int> e(max_bm);  // acc's scale: 2^-e
    std::unique_ptr<BandScratch> band_scratch(any_band ? new BandScratch(p0.D) : nullptr);
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t pi = tasks.problem_of(task), t = task - tasks.first[pi];
      const AttentionParams& p = probs[pi];
      const auto [BM, BN, nq, heads_inner, band] = plans[pi];
      const int64_t group = p.H / p.HK;
      A* out = static_cast<A*>(p.out);
      A* stats = static_cast<A*>(p.stats);
      const int64_t qb = heads_inner ? (t / p.H) % nq : t % nq;
      const int64_t bh = heads_inner ? t / (p.H * nq) * p.H + t % p.H : t / nq;
      const int64_t b = bh / p.H, h = bh % p.H, hk = h / group;
      const int64_t i0 = qb * BM, rows = std::min(BM, p.Lq - i0);
      const A* Q = in(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
      const A* K = in(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
      const A* V = in(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
      A* O = out + b * p.out_stride[0] + h * p.out_stride[1] + i0 * p.out_stride[2];
      A* stat_m = stats + bh * p.rows_q + i0;
      A* stat_inv_l = stats + p.B * p.H * p.rows_q + bh * p.rows_q + i0;
      const A alibi = alibi_slope<A>(p, b, h);
      if constexpr (std::is_same_v<A, float>) {
        if (band) {
          band_block({&p, Q, K, V, O, stat_m, stat_inv_l, i0, rows, scale, alibi}, *band_scratch);
          continue;
        }
      }
      std::fill(m.begin(), m.end(), kNegInf<A>);
      std::fill(l.begin(), l.end(), A(0));
      std::fill(acc.begin(), acc.begin() + rows * p.DV, A(0));
      std::fill(e.begin(), e.end(), 0);
      const int64_t hi = mask_key_limit(p, b, h, key_limit(p, i0 + rows));
      const MaskView mv = as_float_row(mask_view(p, b, h), hi, mask_row_buf);
      for (int64_t j0 = key_start(p, i0); j0 < hi; j0 += BN) {
        const int64_t nb = std::min(BN, hi - j0);
        gemm<A>(false, true, rows, nb, p.D, scale, Q, p.q_stride[2], K + j0 * p.k_stride[2], p.k_stride[2], A(0),
                S.data(), BN);
        for (int64_t r = 0; r < rows; ++r) {
          A* s = S.data() + r * BN;
          if (p.softcap > 0) softcap_row<A>(s, nb, static_cast<A>(p.softcap), nullptr);
          if (p.alibi) alibi_row<A>(s, nb, alibi, i0 + r + p.Lk - p.Lq - j0);
          A m_new = m[r];
          A added = 0;
          with_masked_row(p, mv, s, i0 + r, j0, nb, [&](auto&& load, int64_t valid) {
            // ALiBi's scores climb toward the diagonal: starting from the row's max
            // saves exp_row_lazy a rescale of the row every ~kLazy / slope keys
            if (p.alibi) m_new = std::max(m_new, masked_row_max<A>(valid, load));
            added = exp_row_lazy(s, valid, nb, m_new, load);
          });
          if (m_new == kNegInf<A>) continue;  // nothing allowed yet in this row (its P row is 0)
          // acc holds sum(P V) * 2^-e with l in [2^(e-1), 2^e): P * 2^-e <= 1, so acc never
          // exceeds max |v| (an unnormalised sum overflows float32 long before the result
          // does: 64 keys with |v| = 1e37), and scaling by powers of two rounds nothing
          const A alpha = std::exp(m[r] - m_new);  // 0 when m was -inf
          const A l_new = l[r] * alpha + added;
          int e_new;
          std::frexp(l_new, &e_new);
          const Vec<A> vp(std::ldexp(A(1), -e_new)), va(std::ldexp(alpha, e[r] - e_new));
          for_each_vec<A>(nb, [&](int64_t n, int64_t c) { (Vec<A>::loadu(s + n, c) * vp).store(s + n, c); });
          A* a = acc.data() + r * p.DV;
          for_each_vec<A>(p.DV, [&](int64_t d, int64_t c) { (Vec<A>::loadu(a + d, c) * va).store(a + d, c); });
          l[r] = l_new;
          m[r] = m_new;
          e[r] = e_new;
        }
        if (dropout) apply_dropout<A>(p, bh, S.data(), nullptr, BN, rows, i0, nb, j0);
        gemm<A>(false, false, rows, p.DV, nb, A(1), S.data(), BN, V + j0 * p.v_stride[2], p.v_stride[2], A(1),
                acc.data(), p.DV);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const bool fully_masked = l[r] == A(0);
        const A inv = fully_masked ? A(0) : A(1) / l[r];
        const A* a = acc.data() + r * p.DV;
        A* o = O + r * p.out_stride[2];
        if (fully_masked) {
          std::fill(o, o + p.DV, A(0));
        } else {
          const Vec<A> vl(std::ldexp(l[r], -e[r]));  // l * 2^-e, in [0.5, 1)
          for_each_vec<A>(p.DV, [&](int64_t d, int64_t c) { (Vec<A>::loadu(a + d, c) / vl).store(o + d, c); });
        }
        stat_m[r] = fully_masked ? A(0) : m[r];
        stat_inv_l[r] = inv;
      }
    }
  });
}

}  // namespace

int64_t attention_bwd_chunks(const AttentionParams& p) {
  // enough tasks to keep a many-core machine busy, decided by the problem size alone
  int64_t nq = 0, tasks = p.B * p.HK;
  if (p.n_seq == 0) {
    nq = ceil_div(p.Lq, bwd_block_m(p));
  } else {
    tasks = p.n_seq * p.HK;
    for (int64_t s = 0; s < p.n_seq; ++s) {
      AttentionParams ps = p;
      select_sequence<float, float>(ps, s);  // its lengths
      if (ps.Lq > 0) nq = std::max(nq, ceil_div(ps.Lq, bwd_block_m(ps)));
    }
  }
  return std::clamp<int64_t>(ceil_div(16, std::max<int64_t>(tasks, 1)), 1, std::max<int64_t>(nq, 1));
}

namespace {

template <typename A>
void bwd(const AttentionParams& p0, A* dk_partial, A* dv_partial) {
  using Vc = Vec<A>;
  auto in = [](const void* t) { return static_cast<const A*>(t); };
  const A scale = static_cast<A>(p0.scale);
  const int64_t chunks = attention_bwd_chunks(p0);
  // each problem's tasks: (batch, kv head, chunk of its query blocks); a packed sequence's dK/dV
  // rows are its own, so tasks of different sequences never write the same rows
  const std::vector<AttentionParams> probs = problems<A>(p0);
  TaskRanges tasks;
  int64_t max_bm = 1, max_bn = 1;
  for (const auto& p : probs) {
    tasks.add(p.B * p.HK * chunks);
    const int64_t BM = bwd_block_m(p);
    max_bm = std::max(max_bm, BM), max_bn = std::max(max_bn, key_tile(p, BM, kBwd.n));
  }
  const bool dropout = p0.dropout_p > 0.0;
  const int64_t kv_elems_k = p0.B * p0.HK * p0.rows_k * p0.D, kv_elems_v = p0.B * p0.HK * p0.rows_k * p0.DV;
  run_tasks(tasks.total(), p0.n_seq > 0, [&](auto&& next_task) {
    const int64_t tile = max_bm * max_bn;
    AlignedBuf<A> S(tile), dP(tile), Pd(dropout ? tile : 0), dq(max_bm * p0.D);
    AlignedBuf<A> slope(p0.softcap > 0 ? tile : 0);  // the softcap's derivative at each score
    std::vector<A> delta(max_bm), mask_row_buf;
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t pi = tasks.problem_of(task), t = task - tasks.first[pi];
      const AttentionParams& p = probs[pi];
      const A* stats = static_cast<const A*>(p.stats);
      const A* dlse = static_cast<const A*>(p.dlse);
      const int64_t BM = bwd_block_m(p), BN = key_tile(p, BM, kBwd.n);
      const int64_t nq = ceil_div(p.Lq, BM), group = p.H / p.HK, per_chunk = ceil_div(nq, chunks);
      A* dq_out = static_cast<A*>(p.dq);
      A* dmask = static_cast<A*>(p.dmask);
      const int64_t chunk = t % chunks, bhk = t / chunks, b = bhk / p.HK, hk = bhk % p.HK;
      // this task's dK/dV: the outputs themselves, or its chunk's partial buffer (a packed
      // sequence's pointers already sit at its first key row, in the partials as in the outputs)
      const int64_t dk_off = static_cast<A*>(p.dk) - static_cast<A*>(p0.dk);
      const int64_t dv_off = static_cast<A*>(p.dv) - static_cast<A*>(p0.dv);
      A* dK = (chunks == 1 ? static_cast<A*>(p.dk) : dk_partial + chunk * kv_elems_k + dk_off) + b * p.dk_stride[0] +
              hk * p.dk_stride[1];
      A* dV = (chunks == 1 ? static_cast<A*>(p.dv) : dv_partial + chunk * kv_elems_v + dv_off) + b * p.dv_stride[0] +
              hk * p.dv_stride[1];
      const int64_t ldk = p.dk_stride[2], ldv = p.dv_stride[2];
      for (int64_t j = 0; j < p.Lk; ++j) {
        std::fill(dK + j * ldk, dK + j * ldk + p.D, A(0));
        std::fill(dV + j * ldv, dV + j * ldv + p.DV, A(0));
      }
      const A* K = in(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
      const A* V = in(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g, bh = b * p.H + h;
        for (int64_t qb = chunk * per_chunk; qb < std::min(nq, (chunk + 1) * per_chunk); ++qb) {
          const int64_t i0 = qb * BM, rows = std::min(BM, p.Lq - i0);
          const A* Q = in(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
          const A* dO = in(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + i0 * p.do_stride[2];
          const A* O = in(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i0 * p.out_stride[2];
          const A* stat_m = stats + bh * p.rows_q + i0;
          const A* stat_inv_l = stats + p.B * p.H * p.rows_q + bh * p.rows_q + i0;
          for (int64_t r = 0; r < rows; ++r) {  // delta = rowsum(dO * O)
            const A* a = dO + r * p.do_stride[2];
            const A* o = O + r * p.out_stride[2];
            delta[r] =
                sum_vec<A>(p.DV, [&](int64_t d, int64_t c) { return Vc::loadu(a + d, c) * Vc::loadu(o + d, c); });
            if (dlse) delta[r] -= dlse[bh * p.rows_q + i0 + r];
          }
          std::fill(dq.begin(), dq.begin() + rows * p.D, A(0));
          const int64_t hi = mask_key_limit(p, b, h, key_limit(p, i0 + rows));
          const MaskView mv = as_float_row(mask_view(p, b, h), hi, mask_row_buf);
          const A alibi = alibi_slope<A>(p, b, h);
          for (int64_t j0 = key_start(p, i0); j0 < hi; j0 += BN) {
            const int64_t nb = std::min(BN, hi - j0);
            gemm<A>(false, true, rows, nb, p.D, scale, Q, p.q_stride[2], K + j0 * p.k_stride[2], p.k_stride[2], A(0),
                    S.data(), BN);
            for (int64_t r = 0; r < rows; ++r) {  // P = exp(S - m) / l, exactly 0 where masked
              A* s = S.data() + r * BN;
              if (p.softcap > 0) softcap_row<A>(s, nb, static_cast<A>(p.softcap), slope.data() + r * BN);
              if (p.alibi) alibi_row<A>(s, nb, alibi, i0 + r + p.Lk - p.Lq - j0);
              with_masked_row(p, mv, s, i0 + r, j0, nb, [&](auto&& load, int64_t valid) {
                exp_row_stats(s, valid, nb, stat_m[r], stat_inv_l[r], load);
              });
            }
            gemm<A>(false, true, rows, nb, p.DV, A(1), dO, p.do_stride[2], V + j0 * p.v_stride[2], p.v_stride[2], A(0),
                    dP.data(), BN);
            const A* P_used = S.data();
            if (dropout) {
              std::copy_n(S.data(), rows * BN, Pd.data());
              apply_dropout(p, bh, Pd.data(), dP.data(), BN, rows, i0, nb, j0);
              P_used = Pd.data();
            }
            gemm<A>(true, false, nb, p.DV, rows, A(1), P_used, BN, dO, p.do_stride[2], A(1), dV + j0 * ldv, ldv);
            for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), in place of dP
              const Vc vd(delta[r]);
              A* dp = dP.data() + r * BN;
              const A* pr = S.data() + r * BN;
              for_each_vec<A>(nb, [&](int64_t n, int64_t c) {
                (Vc::loadu(pr + n, c) * (Vc::loadu(dp + n, c) - vd)).store(dp + n, c);
              });
              if (dmask) std::copy(dp, dp + nb, dmask + (bh * p.Lq + i0 + r) * p.Lk + j0);
              if (p.softcap > 0) {  // masks and ALiBi were added after the cap: q and k get dS times its slope
                const A* sl = slope.data() + r * BN;
                for_each_vec<A>(
                    nb, [&](int64_t n, int64_t c) { (Vc::loadu(dp + n, c) * Vc::loadu(sl + n, c)).store(dp + n, c); });
              }
            }
            gemm<A>(true, false, nb, p.D, rows, scale, dP.data(), BN, Q, p.q_stride[2], A(1), dK + j0 * ldk, ldk);
            gemm<A>(false, false, rows, p.D, nb, A(1), dP.data(), BN, K + j0 * p.k_stride[2], p.k_stride[2], A(1),
                    dq.data(), p.D);
          }
          A* dQ = dq_out + b * p.dq_stride[0] + h * p.dq_stride[1] + i0 * p.dq_stride[2];
          const Vc vs(scale);
          for (int64_t r = 0; r < rows; ++r)
            for_each_vec<A>(p.D, [&](int64_t d, int64_t c) {
              (Vc::loadu(dq.data() + r * p.D + d, c) * vs).store(dQ + r * p.dq_stride[2] + d, c);
            });
        }
      }
    }
  });
  if (chunks == 1) return;
  // chunk sums, added in chunk order
  A* dk_out = static_cast<A*>(p0.dk);
  A* dv_out = static_cast<A*>(p0.dv);
  for (auto [out, part, n] : {std::tuple{dk_out, dk_partial, kv_elems_k}, std::tuple{dv_out, dv_partial, kv_elems_v}}) {
    at::parallel_for(0, n, 16384, [&, out = out, part = part, n = n](int64_t a, int64_t z) {
      for_each_vec<A>(z - a, [&](int64_t i, int64_t c) {
        Vc acc = Vc::loadu(part + a + i, c);
        for (int64_t ch = 1; ch < chunks; ++ch) acc = acc + Vc::loadu(part + ch * n + a + i, c);
        acc.store(out + a + i, c);
      });
    });
  }
}

}  // namespace

// q, k, v, dout and the outputs in float32, or all in float64 (DType::F64); a float mask
// in the inputs' dtype
void attention_fwd(const AttentionParams& p) {
  if (p.dtype == DType::F64) return fwd<double>(p);
  fwd<float>(p);
}

void attention_bwd(const AttentionParams& p, void* dk_partial, void* dv_partial) {
  if (p.dtype == DType::F64) return bwd<double>(p, static_cast<double*>(dk_partial), static_cast<double*>(dv_partial));
  bwd<float>(p, static_cast<float*>(dk_partial), static_cast<float*>(dv_partial));
}

}  // namespace fused_attn::cpu
