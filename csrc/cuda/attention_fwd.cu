// Masked scaled-dot-product attention forward on tensor cores (sm_80+): FlashAttention-2.
//
// One thread block per (block of BM queries, batch*head); each warp owns 16 query rows.
// Packed sequences: one per (block of the longest sequence's queries, sequence*head).
// The Q tile sits in shared memory; K/V tiles of BN keys stream through two shared-memory
// buffers filled by cp.async while the previous tile is in use. S = Q K^T and O += P V run
// on mma.sync m16n8k16 with float32 accumulation; P never leaves registers. The softmax is
// online, in float32 and the log2 domain (scale * log2(e) folded into one multiply, exp2).
// Masks are read through their broadcast strides; a row with nothing allowed ends with
// l = 0 and is written as 0 (stats: m = 0, 1/l = 0), never NaN.
#include "attention_common.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS {
namespace {
using namespace attn;

template <typename T, int HEAD, int BM, int BN>
struct FwdCfg {
  static constexpr int kWarps = BM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPitch = HEAD + 8;
  static constexpr int kSmem = (BM + 4 * BN) * kPitch * int(sizeof(T));
};

// PACKED: params holds packed sequences (a separate instantiation: the batched kernels keep
// their registers)
template <typename T, int HEAD, int BM, int BN, bool PACKED>
__global__ void __launch_bounds__(BM / 16 * 32) attention_fwd_kernel(const AttentionParams params) {
  using Cfg = FwdCfg<T, HEAD, BM, BN>;
  constexpr int P = Cfg::kPitch, NB = BN / 8, ND = HEAD / 8;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static_assert(Cfg::kSmem <= 163 * 1024, "shared memory over sm_80's 163 KB");
#else
  static_assert(Cfg::kSmem <= 227 * 1024, "shared memory over sm_90's 227 KB");
#endif
  FUSED_ATTN_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * P;
  T* Vs = Ks + 2 * BN * P;

  const int64_t num_m = (params.Lq + BM - 1) / BM;         // packed: the longest sequence's
  const int64_t m_block = num_m - 1 - blockIdx.x % num_m;  // the longest causal blocks first
  const int64_t h = blockIdx.x / num_m % params.H;
  // packed sequences: problem b is sequence b, a batch of one; its blocks past its queries exit
  const int64_t problem = blockIdx.x / num_m / params.H;
  AttentionParams p = params;
  if constexpr (PACKED) select_sequence<T, float>(p, problem);
  const int64_t b = PACKED ? 0 : problem, bh = b * p.H + h, hk = h / (p.H / p.HK);
  const int64_t q0 = m_block * BM;
  if (q0 >= p.Lq) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = warp * 16;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + q0 * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const MaskRef mask = mask_of(p, b, h, sizeof(T));

  load_tile<T, HEAD, BM, Cfg::kThreads>(Qs, q, p.q_stride[2], static_cast<int>(imin(BM, p.Lq - q0)));
  // the key tiles some row of the block may see; the keys each of this thread's rows may see
  const TileRange tiles = tiles_covering(keys_of_query(mask, q0), keys_of_query(mask, imin(q0 + BM, p.Lq) - 1), BN);
  const Span keys[2] = {keys_of_query(mask, q0 + row0 + g), keys_of_query(mask, q0 + row0 + g + 8)};
  auto load_kv = [&](int64_t j, int buf) {
    const int64_t k0 = (tiles.first + j) * BN;
    const int rows = static_cast<int>(imin(BN, p.Lk - k0));
    load_tile<T, HEAD, BN, Cfg::kThreads>(Ks + buf * BN * P, k + k0 * p.k_stride[2], p.k_stride[2], rows);
    load_tile<T, HEAD, BN, Cfg::kThreads>(Vs + buf * BN * P, v + k0 * p.v_stride[2], p.v_stride[2], rows);
  };
  float o[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_i[2] = {kNegInf, kNegInf}, l_i[2] = {0.f, 0.f};
  int e_i[2] = {0, 0};  // O's scale: 2^-e
  const Scorer score(p);
  const bool dropout = p.dropout_p > 0.0;
  const uint64_t drop_key = p.seed + static_cast<uint64_t>(bh);

  double_buffered(tiles.count, load_kv, [&](int64_t j, int buf) {
    const int64_t k0 = (tiles.first + j) * BN;
    const T* Kt = Ks + buf * BN * P;
    const T* Vt = Vs + buf * BN * P;
    float s[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    gemm_abt<T, HEAD, NB, P, P>(s, Qs, row0, Kt, 0);
    score.apply(s);

    float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t qi = q0 + row0 + g + (i >> 1) * 8;
        const int64_t ki = k0 + nb * 8 + 2 * t + (i & 1);
        s[nb][i] = masked_score<T>(s[nb][i], mask, keys[i >> 1].contains(ki), qi, ki);
        mx[i >> 1] = fmaxf(mx[i >> 1], s[nb][i]);
      }
    }
    float alpha[2], sum[2] = {0.f, 0.f}, m_safe[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a group share a row
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      m_safe[r] = mx[r] == kNegInf ? 0.f : mx[r];  // nothing allowed yet: exponentiate against 0
      alpha[r] = exp2f(m_i[r] - m_safe[r]);        // 0 while m_i is -inf
      m_i[r] = mx[r];
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float e = exp2f(s[nb][i] - m_safe[i >> 1]);
        sum[i >> 1] += e;
        s[nb][i] =
            dropout ? e * dropout_factor(p, drop_key, q0 + row0 + g + (i >> 1) * 8, k0 + nb * 8 + 2 * t + (i & 1)) : e;
      }
    }
    // O holds sum(P V) * 2^-e with l in [2^(e-1), 2^e): P * 2^-e <= 1, so O never exceeds
    // max |v| (an unnormalised sum overflows float32 long before the result does: 64 keys
    // with |v| = 1e37), and scaling by powers of two rounds nothing
    float c_new[2], rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
      const float l_new = l_i[r] * alpha[r] + sum[r];
      int e_new;
      frexpf(l_new, &e_new);  // 0 for l = 0
      c_new[r] = ldexpf(1.f, -e_new);
      rescale[r] = ldexpf(alpha[r], e_i[r] - e_new);
      l_i[r] = l_new;
      e_i[r] = e_new;
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nb][i] *= c_new[i >> 1];
    }
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      o[d][0] *= rescale[0], o[d][1] *= rescale[0], o[d][2] *= rescale[1], o[d][3] *= rescale[1];
    }
    gemm_pb<T, BN, ND, P>(o, s, Vt, 0, 0);
  });

  // out = O / (l 2^-e) (0 on fully masked rows); stats: m (log2 units) and 1/l
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + q0 * p.out_stride[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = row0 + g + r * 8;
    if (q0 + rr >= p.Lq) continue;
    const bool fully_masked = l_i[r] == 0.f;
    const float inv = fully_masked ? 0.f : 1.f / l_i[r];
    const float scaled_l = fully_masked ? 1.f : ldexpf(l_i[r], -e_i[r]);  // in [0.5, 1)
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      float pair[2] = {fully_masked ? 0.f : o[d][2 * r] / scaled_l, fully_masked ? 0.f : o[d][2 * r + 1] / scaled_l};
      store_float<T, 2>(out + rr * p.out_stride[2] + d * 8 + 2 * t, pair);
    }
    if (t == 0) {
      static_cast<float*>(p.stats)[bh * p.rows_q + q0 + rr] = fully_masked ? 0.f : m_i[r];
      static_cast<float*>(p.stats)[p.B * p.H * p.rows_q + bh * p.rows_q + q0 + rr] = inv;
    }
  }
}

template <typename T, int HEAD, int BM, int BN, bool PACKED>
const char* launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<T, HEAD, BM, BN>;
  auto kernel = attention_fwd_kernel<T, HEAD, BM, BN, PACKED>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem) != cudaSuccess)
    return launch_error();
  const int64_t blocks = (p.Lq + BM - 1) / BM * problem_count(p) * p.H;
  launch_kernel(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream, p);
  return launch_error();
}

template <typename T>
const char* fwd_for_head(const AttentionParams& p, cudaStream_t stream) {
  // 64-query tiles; 64-key tiles, 32 at head dim 256 (shared memory)
  return CudaHeadDims::dispatch(
      p.D, "head dim not supported by the cuda attention kernels (kCudaHeadDims)", [&](auto head) {
        constexpr int D = decltype(head)::value;
        constexpr int BN = D == 256 ? 32 : 64;
        return p.n_seq > 0 ? launch_fwd<T, D, 64, BN, true>(p, stream) : launch_fwd<T, D, 64, BN, false>(p, stream);
      });
}

}  // namespace

const char* attention_fwd(const AttentionParams& p, void* stream) {
  if (const char* e = dtype_error(p.dtype, false, "the cuda attention kernels take float16 or bfloat16")) return e;
  if (p.B * p.H * p.Lq == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::BF16 ? fwd_for_head<__nv_bfloat16>(p, s) : fwd_for_head<__half>(p, s);
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS
