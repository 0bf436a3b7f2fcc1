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
  int kind;          // 0 none, 1 bool, 2 float
  int causal;        // 0 none, 1 upper-left, 2 lower-right
  int64_t Lq, Lk;
};

// The mask of batch b, head h (elt: a float mask's element size).
__device__ __forceinline__ MaskRef mask_of(const AttentionParams& p, int64_t b, int64_t h, int elt) {
  MaskRef m{nullptr, 0, 0, p.mask_kind, p.causal, p.Lq, p.Lk};
  if (p.mask_kind) {
    const int64_t off = (b * p.mask_stride[0] + h * p.mask_stride[1]) * (p.mask_kind == kMaskBool ? 1 : elt);
    m.data = static_cast<const char*>(p.mask) + off;
    m.stride_q = p.mask_stride[2], m.stride_k = p.mask_stride[3];
  }
  return m;
}

// Score (log2 units) of query q, key k after masking: -inf when not allowed.
template <typename T>
__device__ __forceinline__ float masked_score(float s, const MaskRef& m, int64_t q, int64_t k) {
  if (k >= m.Lk || q >= m.Lq) return kNegInf;  // rows past Lq are never stored; keep them inert
  if (m.causal == kCausalUpperLeft && k > q) return kNegInf;
  if (m.causal == kCausalLowerRight && k > q + (m.Lk - m.Lq)) return kNegInf;
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

// One past the last key a query in [q0, q1) may see.
__device__ __forceinline__ int64_t key_limit(const MaskRef& m, int64_t q1) {
  if (m.causal == kCausalUpperLeft) return imin(m.Lk, q1);
  if (m.causal == kCausalLowerRight) return imax(0, imin(m.Lk, q1 + m.Lk - m.Lq));
  return m.Lk;
}

// The first query that may see key k0 (causal), rounded down to a multiple of `block`.
__device__ __forceinline__ int64_t query_start(const MaskRef& m, int64_t k0, int block) {
  if (m.causal == kCausalUpperLeft) return k0 / block * block;
  if (m.causal == kCausalLowerRight) return imax(0, k0 - (m.Lk - m.Lq)) / block * block;
  return 0;
}

// dropout: keep * 1/(1-p), from the Philox draw every backend makes for (query, key)
__device__ __forceinline__ float dropout_factor(const AttentionParams& p, uint64_t key, int64_t q, int64_t k) {
  const uint32_t counter = static_cast<uint32_t>(q * p.Lk + k);
  return philox_draw(key, counter) >= p.threshold ? 1.f / (1.f - static_cast<float>(p.dropout_p)) : 0.f;
}

// The backward's P (after dropout) and dS = P (dP - delta) for the score of query q and key k
// (log2 units, before masking), recomputed from the forward's row statistics m and 1/l through
// the forward's own masked_score and exp2: P is exactly 0 wherever the forward's was (1/l = 0
// on fully masked rows), and dropout keeps the same (query, key) draws.
struct ProbAndGrad {
  float p, ds;
};
template <typename T>
__device__ __forceinline__ ProbAndGrad recompute_p_ds(const AttentionParams& p, const MaskRef& mask, uint64_t drop_key,
                                                      float score_log2, float m, float inv_l, float dp, float delta,
                                                      int64_t q, int64_t k) {
  const float pr = exp2f(masked_score<T>(score_log2, mask, q, k) - m) * inv_l;
  const float f = p.dropout_p > 0.0 && pr != 0.f ? dropout_factor(p, drop_key, q, k) : 1.f;
  return {pr * f, pr * (dp * f - delta)};
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS::attn
