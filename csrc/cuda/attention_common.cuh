// The score masking and dropout of the CUDA attention kernels, shared by forward and
// backward; the tensor-core tile helpers they use are in mma.cuh.
#pragma once
#include "mma.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS::attn {

using namespace mma;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kMaskFloor = -2.3e38f;  // the most negative float-mask value finite in log2 units

// The mask of one (batch, head) pair: everything the score masking reads.
struct MaskRef {
  const void* data;  // nullptr, uint8 (bool) or T (float mask)
  int64_t stride_q, stride_k;
  int kind;    // 0 none, 1 bool, 2 float
  int causal;  // 0 none, 1 upper-left, 2 lower-right
  int64_t Lq, Lk;
  // sliding window: query q (at position q + Lk - Lq) sees keys q + Lk - Lq - left .. + right;
  // -1: unbounded on that side
  int64_t left, right;
  float alibi_log2;  // ALiBi: slope * log2(e), 0 without
};

// The mask of batch b, head h (elt: a float mask's element size).
__device__ __forceinline__ MaskRef mask_of(const AttentionParams& p, int64_t b, int64_t h, int elt) {
  MaskRef m{};
  m.kind = p.mask_kind, m.causal = p.causal, m.Lq = p.Lq, m.Lk = p.Lk;
  m.left = p.windowed ? p.window_left : -1, m.right = p.windowed ? p.window_right : -1;
  m.alibi_log2 = p.alibi ? p.alibi[b * p.alibi_stride + h] * kLog2e : 0.f;
  if (p.mask_kind) {
    const int64_t off = (b * p.mask_stride[0] + h * p.mask_stride[1]) * (p.mask_kind == kMaskBool ? 1 : elt);
    m.data = static_cast<const char*>(p.mask) + off;
    m.stride_q = p.mask_stride[2], m.stride_k = p.mask_stride[3];
  }
  return m;
}

// A half-open range [lo, hi) of key (or query) positions, each in [0, L] (L < 2^31: the
// wrappers check it; 32 bits keep two rows' spans in four registers).
struct Span {
  int32_t lo, hi;
  __device__ __forceinline__ bool contains(int64_t x) const { return x >= lo && x < hi; }
};

// The keys query q may see: below Lk, within the causal limit and the window (bottom-right
// aligned at position q + Lk - Lq); none for a row past Lq (never stored: kept inert). lo and
// hi never decrease with q, so a block of rows sees keys within [first row's lo, last row's hi).
__device__ __forceinline__ Span keys_of_query(const MaskRef& m, int64_t q) {
  if (q >= m.Lq) return {0, 0};
  const int64_t pos = q + m.Lk - m.Lq;
  int64_t lo = 0, hi = m.Lk;
  if (m.causal == kCausalUpperLeft) hi = imin(hi, q + 1);
  if (m.causal == kCausalLowerRight) hi = imin(hi, pos + 1);
  if (m.left >= 0) lo = imax(lo, pos - m.left);
  if (m.right >= 0) hi = imin(hi, pos + m.right + 1);
  return {static_cast<int32_t>(imin(lo, m.Lk)), static_cast<int32_t>(imax(hi, 0))};
}

// The queries that may see key k: the same region as keys_of_query, by key (none past Lk).
__device__ __forceinline__ Span queries_of_key(const MaskRef& m, int64_t k) {
  if (k >= m.Lk) return {0, 0};
  const int64_t off = m.Lk - m.Lq;
  int64_t lo = 0, hi = m.Lq;
  if (m.causal == kCausalUpperLeft) lo = imax(lo, k);
  if (m.causal == kCausalLowerRight) lo = imax(lo, k - off);
  if (m.right >= 0) lo = imax(lo, k - off - m.right);
  if (m.left >= 0) hi = imin(hi, k - off + m.left + 1);
  return {static_cast<int32_t>(imin(lo, m.Lq)), static_cast<int32_t>(imax(hi, 0))};
}

// Tiles [first, first + count) of `block` positions covering every key of rows [q0, q1), or
// every query of keys [k0, k1) (spans of their first and last positions, q1 > q0, k1 > k0).
struct TileRange {
  int64_t first, count;
};
__device__ __forceinline__ TileRange tiles_covering(Span first, Span last, int block) {
  const int64_t lo = first.lo / block, hi = (int64_t(last.hi) + block - 1) / block;
  return {lo, imax(0, hi - lo)};
}

// Score (log2 units) of query q, key k after masking: -inf outside the causal/window region
// (`inside`, from a Span) or where a bool mask says no; ALiBi's -slope * |q + Lk - Lq - k| and
// a float mask are added.
template <typename T>
__device__ __forceinline__ float masked_score(float s, const MaskRef& m, bool inside, int64_t q, int64_t k) {
  if (!inside) return kNegInf;
  if (m.alibi_log2 != 0.f) s -= m.alibi_log2 * fabsf(static_cast<float>(q + m.Lk - m.Lq - k));
  if (m.kind == 1) {
    if (!static_cast<const uint8_t*>(m.data)[q * m.stride_q + k * m.stride_k]) return kNegInf;
  } else if (m.kind == 2) {
    // finite values below -FLT_MAX / log2(e) (torch.finfo(float32).min) would overflow to
    // -inf in log2 units: clamp them, keep -inf as it is
    const float bias = to_float(static_cast<const T*>(m.data)[q * m.stride_q + k * m.stride_k]);
    s += (bias == kNegInf ? bias : fmaxf(bias, kMaskFloor)) * kLog2e;
  }
  return s;
}

// A query-key dot product as a score in log2 units, before masking: scale * dot, or with a
// softcap c > 0 (Gemma-2) c * tanh(scale * dot / c). Forward and backward both score here.
struct Scorer {
  float scale_log2;      // scale * log2(e)
  float scale_over_cap;  // scale / c
  float cap_log2;        // c * log2(e); 0: no softcap
  __device__ __forceinline__ explicit Scorer(const AttentionParams& p)
      : scale_log2(static_cast<float>(p.scale) * kLog2e),
        scale_over_cap(p.softcap > 0 ? static_cast<float>(p.scale / p.softcap) : 0.f),
        cap_log2(static_cast<float>(p.softcap) * kLog2e) {}
  __device__ __forceinline__ float capped(float dot) const { return cap_log2 * tanhf(dot * scale_over_cap); }
  __device__ __forceinline__ float plain(float dot) const { return dot * scale_log2; }
  __device__ __forceinline__ float operator()(float dot) const { return cap_log2 != 0.f ? capped(dot) : plain(dot); }
  // a tile of dot products scored in place (the test hoisted out of the loops)
  template <int N>
  __device__ __forceinline__ void apply(float (&s)[N][4]) const {
    if (cap_log2 != 0.f) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[n][i] = capped(s[n][i]);
      }
    } else {
#pragma unroll
      for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[n][i] = plain(s[n][i]);
      }
    }
  }
};

// dropout: keep * 1/(1-p), from the Philox draw every backend makes for (query, key)
__device__ __forceinline__ float dropout_factor(const AttentionParams& p, uint64_t key, int64_t q, int64_t k) {
  const uint32_t counter = static_cast<uint32_t>(q * p.Lk + k);
  return philox_draw(key, counter) >= p.threshold ? 1.f / (1.f - static_cast<float>(p.dropout_p)) : 0.f;
}

// The backward's P (after dropout) and dS for query q, key k and their dot product,
// recomputed from the forward's row statistics m and 1/l through the forward's own Scorer,
// masked_score and exp2: P is exactly 0 wherever the forward's was (1/l = 0 on fully masked
// rows), and dropout keeps the same (query, key) draws. ds = P (dP - delta) is the gradient of
// the masked score (a float mask's gradient); ds_dot that of scale * dot, which with a softcap
// carries d(c tanh(x / c)) / dx = 1 - tanh^2.
struct ProbAndGrad {
  float p, ds, ds_dot;
};
template <typename T>
__device__ __forceinline__ ProbAndGrad recompute_p_ds(const AttentionParams& p, const MaskRef& mask,
                                                      const Scorer& score, uint64_t drop_key, float dot, bool inside,
                                                      float m, float inv_l, float dp, float delta, int64_t q,
                                                      int64_t k) {
  const float pr = exp2f(masked_score<T>(score(dot), mask, inside, q, k) - m) * inv_l;
  const float f = p.dropout_p > 0.0 && pr != 0.f ? dropout_factor(p, drop_key, q, k) : 1.f;
  const float ds = pr * (dp * f - delta);
  float slope = 1.f;
  if (score.cap_log2 != 0.f) {
    const float th = tanhf(dot * score.scale_over_cap);
    slope = 1.f - th * th;
  }
  return {pr * f, ds, ds * slope};
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS::attn
