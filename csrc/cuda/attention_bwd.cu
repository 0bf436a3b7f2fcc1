// Masked scaled-dot-product attention backward on tensor cores (sm_80+), FlashAttention-2
// style, deterministic (no atomics):
//   1. delta = rowsum(dO * O)                                   (one thread per row)
//   2. dK, dV: one block per (block of keys, batch * kv head); each warp owns 16 keys and
//      walks every query tile that can see them (and, for GQA, every query head of the
//      group), recomputing P^T = exp2(S^T - m) / l from the forward's statistics:
//      dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q. Head dim 256 runs dV and dK
//      in two passes to stay within the register file.
//   3. dQ: one block per (block of queries, batch * head): dQ += dS K over the key tiles;
//      with a float mask that needs its gradient, dS is also written out.
// Tiles move global -> shared with cp.async, double-buffered; products use mma.sync.
#include "attention_common.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS {
namespace {
using namespace attn;

template <typename T>
__global__ void delta_kernel(const AttentionParams p, float* delta) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // bh * rows_q + q (every packed row)
  if (row >= p.B * p.H * p.rows_q) return;
  const int64_t bh = row / p.rows_q, q = row % p.rows_q, b = bh / p.H, h = bh % p.H;
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + q * p.out_stride[2];
  const T* d = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + q * p.do_stride[2];
  float acc = 0.f;
  for (int64_t i = 0; i < p.D; ++i) acc += to_float(o[i]) * to_float(d[i]);
  delta[row] = p.dlse ? acc - static_cast<const float*>(p.dlse)[row] : acc;  // see AttentionParams::dlse
}

// ---------------------------------------------------------------- dK, dV

template <typename T, int HEAD, int BK, int BQ>
struct DkdvCfg {
  static constexpr int kWarps = BK / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPitch = HEAD + 8;
  // K, V tiles; Q and dO tiles double-buffered; m, 1/l, delta for each query tile
  static constexpr int kSmem = (2 * BK + 4 * BQ) * kPitch * int(sizeof(T)) + 2 * 3 * BQ * int(sizeof(float));
};

// WHICH: 0 dK and dV, 1 dV only, 2 dK only; PACKED: params holds packed sequences (a separate
// instantiation: the batched kernels keep their registers)
template <typename T, int HEAD, int BK, int BQ, int WHICH, bool PACKED>
__global__ void __launch_bounds__(BK / 16 * 32)
    attention_dkdv_kernel(const AttentionParams params, const float* all_delta) {
  using Cfg = DkdvCfg<T, HEAD, BK, BQ>;
  constexpr int P = Cfg::kPitch, NQ = BQ / 8, ND = HEAD / 8;
  constexpr bool kDV = WHICH != 2, kDK = WHICH != 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static_assert(Cfg::kSmem <= 163 * 1024, "shared memory over sm_80's 163 KB");
#else
  static_assert(Cfg::kSmem <= 227 * 1024, "shared memory over sm_90's 227 KB");
#endif
  FUSED_ATTN_DYNAMIC_SMEM(smem_raw);
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BK * P;
  T* Qs = Vs + BK * P;                                       // 2 buffers
  T* Ds = Qs + 2 * BQ * P;                                   // dO, 2 buffers
  float* stats = reinterpret_cast<float*>(Ds + 2 * BQ * P);  // [buffer][m | 1/l | delta][BQ]

  const int64_t num_k = (params.Lk + BK - 1) / BK;  // packed: the longest sequence's
  const int64_t k_block = blockIdx.x % num_k, hk = blockIdx.x / num_k % params.HK, group = params.H / params.HK;
  // packed sequences: problem b is sequence b, a batch of one; its blocks past its keys exit, and
  // so do those of a sequence without queries (its dK, dV: zeroed by the caller)
  const int64_t problem = blockIdx.x / num_k / params.HK;
  AttentionParams p = params;
  int64_t first_row = 0;  // of the sequence, in delta
  if constexpr (PACKED) first_row = select_sequence<T, float>(p, problem);
  const float* delta = all_delta + first_row;
  const int64_t b = PACKED ? 0 : problem;
  const int64_t k0 = k_block * BK;
  if (k0 >= p.Lk || p.Lq == 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = warp * 16;
  const int krows = static_cast<int>(imin(BK, p.Lk - k0));
  load_tile<T, HEAD, BK, Cfg::kThreads>(
      Ks, static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + k0 * p.k_stride[2], p.k_stride[2],
      krows);
  load_tile<T, HEAD, BK, Cfg::kThreads>(
      Vs, static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + k0 * p.v_stride[2], p.v_stride[2],
      krows);

  // the (head, query tile) pairs this block visits, in one flat sequence
  const MaskRef any_head = mask_of(p, b, hk * group, sizeof(T));
  // the query tiles that may see a key of the block; the queries each of this thread's keys may see
  const TileRange q_range = tiles_covering(queries_of_key(any_head, k0), queries_of_key(any_head, k0 + krows - 1), BQ);
  const int64_t q_first = q_range.first * BQ, q_tiles = q_range.count;
  const Span queries[2] = {queries_of_key(any_head, k0 + row0 + g), queries_of_key(any_head, k0 + row0 + g + 8)};
  const int64_t iters = q_tiles * group;
  auto load_q = [&](int64_t it, int buf) {
    const int64_t h = hk * group + it / q_tiles, qs = q_first + (it % q_tiles) * BQ;
    const int rows = static_cast<int>(imin(BQ, p.Lq - qs));
    load_tile<T, HEAD, BQ, Cfg::kThreads>(
        Qs + buf * BQ * P, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + qs * p.q_stride[2],
        p.q_stride[2], rows);
    load_tile<T, HEAD, BQ, Cfg::kThreads>(
        Ds + buf * BQ * P,
        static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + qs * p.do_stride[2], p.do_stride[2],
        rows);
    const int64_t bh = b * p.H + h;
    for (int i = threadIdx.x; i < BQ; i += Cfg::kThreads) {
      const bool ok = i < rows;
      float* st = stats + buf * 3 * BQ;
      st[i] = ok ? static_cast<const float*>(p.stats)[bh * p.rows_q + qs + i] : 0.f;
      st[BQ + i] = ok ? static_cast<const float*>(p.stats)[p.B * p.H * p.rows_q + bh * p.rows_q + qs + i]
                      : 0.f;  // 1/l = 0: P = 0 past Lq
      st[2 * BQ + i] = ok ? delta[bh * p.rows_q + qs + i] : 0.f;
    }
  };

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d) {
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[d][i] = dv[d][i] = 0.f;
  }
  const Scorer score(p);

  double_buffered(iters, load_q, [&](int64_t it, int buf) {
    const T* Qt = Qs + buf * BQ * P;
    const T* Dt = Ds + buf * BQ * P;
    const float* st = stats + buf * 3 * BQ;
    const int64_t h = hk * group + it / q_tiles, qs = q_first + (it % q_tiles) * BQ;
    const int64_t bh = b * p.H + h;
    const MaskRef mask = mask_of(p, b, h, sizeof(T));

    // S^T (16 keys x BQ queries) and dP^T = V dO^T
    float s[NQ][4], dp[NQ][4];
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nb][i] = dp[nb][i] = 0.f;
    }
    gemm_abt<T, HEAD, NQ, P, P>(s, Ks, row0, Qt, 0);
    gemm_abt<T, HEAD, NQ, P, P>(dp, Vs, row0, Dt, 0);
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qc = nb * 8 + 2 * t + (i & 1);  // query column in the tile
        const int64_t ki = k0 + row0 + g + (i >> 1) * 8, qi = qs + qc;
        const ProbAndGrad r =
            recompute_p_ds<T>(p, mask, score, p.seed + uint64_t(bh), s[nb][i], queries[i >> 1].contains(qi), st[qc],
                              st[BQ + qc], dp[nb][i], st[2 * BQ + qc], qi, ki);
        s[nb][i] = r.p;        // P^T after dropout, for dV
        dp[nb][i] = r.ds_dot;  // dS^T
      }
    }
    if (kDV) gemm_pb<T, BQ, ND, P>(dv, s, Dt, 0, 0);
    if (kDK) gemm_pb<T, BQ, ND, P>(dk, dp, Qt, 0, 0);
  });

  // rows k0 + row0 + g (+8) of dK (scaled) and dV
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t ki = k0 + row0 + g + r * 8;
    if (ki >= p.Lk) continue;
    T* dk_row = static_cast<T*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1] + ki * p.dk_stride[2];
    T* dv_row = static_cast<T*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1] + ki * p.dv_stride[2];
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      if (kDK) {
        float pair[2] = {dk[d][2 * r] * static_cast<float>(p.scale), dk[d][2 * r + 1] * static_cast<float>(p.scale)};
        store_float<T, 2>(dk_row + d * 8 + 2 * t, pair);
      }
      if (kDV) {
        float pair[2] = {dv[d][2 * r], dv[d][2 * r + 1]};
        store_float<T, 2>(dv_row + d * 8 + 2 * t, pair);
      }
    }
  }
}

// ---------------------------------------------------------------- dQ (and dS for a float mask)

template <typename T, int HEAD, int BQ, int BK>
struct DqCfg {
  static constexpr int kWarps = BQ / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPitch = HEAD + 8;
  static constexpr int kSmem = (2 * BQ + 4 * BK) * kPitch * int(sizeof(T));
};

// PACKED: as attention_dkdv_kernel; the per-sequence lengths take registers, so the packed
// instantiations may use the whole register file (a minimum of one block per SM; the batched
// ones keep ptxas' own choice: at head 128, 168 registers)
template <typename T, int HEAD, int BQ, int BK, bool PACKED>
__global__ void __launch_bounds__(BQ / 16 * 32, PACKED ? 1 : 0)
    attention_dq_kernel(const AttentionParams params, const float* all_delta) {
  using Cfg = DqCfg<T, HEAD, BQ, BK>;
  constexpr int P = Cfg::kPitch, NK = BK / 8, ND = HEAD / 8;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static_assert(Cfg::kSmem <= 163 * 1024, "shared memory over sm_80's 163 KB");
#else
  static_assert(Cfg::kSmem <= 227 * 1024, "shared memory over sm_90's 227 KB");
#endif
  FUSED_ATTN_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ds = Qs + BQ * P;
  T* Ks = Ds + BQ * P;      // 2 buffers
  T* Vs = Ks + 2 * BK * P;  // 2 buffers

  const int64_t num_m = (params.Lq + BQ - 1) / BQ;  // packed: the longest sequence's
  const int64_t m_block = num_m - 1 - blockIdx.x % num_m, h = blockIdx.x / num_m % params.H;
  // packed sequences: problem b is sequence b, a batch of one; its blocks past its queries exit
  const int64_t problem = blockIdx.x / num_m / params.H;
  AttentionParams p = params;
  int64_t first_row = 0;  // of the sequence, in delta
  if constexpr (PACKED) first_row = select_sequence<T, float>(p, problem);
  const float* delta = all_delta + first_row;
  const int64_t b = PACKED ? 0 : problem, bh = b * p.H + h, hk = h / (p.H / p.HK);
  const int64_t q0 = m_block * BQ;
  if (q0 >= p.Lq) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = warp * 16;
  const int qrows = static_cast<int>(imin(BQ, p.Lq - q0));
  load_tile<T, HEAD, BQ, Cfg::kThreads>(
      Qs, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + q0 * p.q_stride[2], p.q_stride[2],
      qrows);
  load_tile<T, HEAD, BQ, Cfg::kThreads>(
      Ds, static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + q0 * p.do_stride[2], p.do_stride[2],
      qrows);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const MaskRef mask = mask_of(p, b, h, sizeof(T));
  // the forward's key tiles and row spans
  const TileRange tiles = tiles_covering(keys_of_query(mask, q0), keys_of_query(mask, imin(q0 + BQ, p.Lq) - 1), BK);
  const Span keys[2] = {keys_of_query(mask, q0 + row0 + g), keys_of_query(mask, q0 + row0 + g + 8)};
  auto load_kv = [&](int64_t j, int buf) {
    const int64_t kk = (tiles.first + j) * BK;
    const int rows = static_cast<int>(imin(BK, p.Lk - kk));
    load_tile<T, HEAD, BK, Cfg::kThreads>(Ks + buf * BK * P, k + kk * p.k_stride[2], p.k_stride[2], rows);
    load_tile<T, HEAD, BK, Cfg::kThreads>(Vs + buf * BK * P, v + kk * p.v_stride[2], p.v_stride[2], rows);
  };
  float m_row[2], inv_l[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t qi = q0 + row0 + g + r * 8;
    const bool ok = qi < p.Lq;
    m_row[r] = ok ? static_cast<const float*>(p.stats)[bh * p.rows_q + qi] : 0.f;
    inv_l[r] = ok ? static_cast<const float*>(p.stats)[p.B * p.H * p.rows_q + bh * p.rows_q + qi] : 0.f;
    dl[r] = ok ? delta[bh * p.rows_q + qi] : 0.f;
  }
  float dq[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
  const Scorer score(p);
  float* dmask = static_cast<float*>(p.dmask);

  double_buffered(tiles.count, load_kv, [&](int64_t j, int buf) {
    const T* Kt = Ks + buf * BK * P;
    const T* Vt = Vs + buf * BK * P;
    float s[NK][4], dp[NK][4];
#pragma unroll
    for (int nb = 0; nb < NK; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nb][i] = dp[nb][i] = 0.f;
    }
    gemm_abt<T, HEAD, NK, P, P>(s, Qs, row0, Kt, 0);
    gemm_abt<T, HEAD, NK, P, P>(dp, Ds, row0, Vt, 0);
#pragma unroll
    for (int nb = 0; nb < NK; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;
        const int64_t qi = q0 + row0 + g + r * 8, ki = (tiles.first + j) * BK + nb * 8 + 2 * t + (i & 1);
        const ProbAndGrad grad = recompute_p_ds<T>(p, mask, score, p.seed + uint64_t(bh), s[nb][i],
                                                   keys[r].contains(ki), m_row[r], inv_l[r], dp[nb][i], dl[r], qi, ki);
        s[nb][i] = grad.ds_dot;
        if (dmask != nullptr && qi < p.Lq && ki < p.Lk) dmask[(bh * p.Lq + qi) * p.Lk + ki] = grad.ds;
      }
    }
    gemm_pb<T, BK, ND, P>(dq, s, Kt, 0, 0);
  });
  T* out = static_cast<T*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1] + q0 * p.dq_stride[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = row0 + g + r * 8;
    if (q0 + rr >= p.Lq) continue;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      float pair[2] = {dq[d][2 * r] * static_cast<float>(p.scale), dq[d][2 * r + 1] * static_cast<float>(p.scale)};
      store_float<T, 2>(out + rr * p.dq_stride[2] + d * 8 + 2 * t, pair);
    }
  }
}

template <typename Kernel>
const char* set_smem(Kernel kernel, int bytes) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    return launch_error();
  return nullptr;
}

template <typename T, int HEAD, int BK, int BQ, int WHICH, bool PACKED>
const char* launch_dkdv(const AttentionParams& p, const float* delta, cudaStream_t stream) {
  using Cfg = DkdvCfg<T, HEAD, BK, BQ>;
  auto kernel = attention_dkdv_kernel<T, HEAD, BK, BQ, WHICH, PACKED>;
  if (const char* e = set_smem(kernel, Cfg::kSmem)) return e;
  const int64_t blocks = (p.Lk + BK - 1) / BK * problem_count(p) * p.HK;
  launch_kernel(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream, p, delta);
  return launch_error();
}

template <typename T, int HEAD, int BQ, int BK, bool PACKED>
const char* launch_dq(const AttentionParams& p, const float* delta, cudaStream_t stream) {
  using Cfg = DqCfg<T, HEAD, BQ, BK>;
  auto kernel = attention_dq_kernel<T, HEAD, BQ, BK, PACKED>;
  if (const char* e = set_smem(kernel, Cfg::kSmem)) return e;
  const int64_t blocks = (p.Lq + BQ - 1) / BQ * problem_count(p) * p.H;
  launch_kernel(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream, p, delta);
  return launch_error();
}

template <typename T, int HEAD, int BQ_KV, int BK_Q, bool PACKED>
const char* bwd_head(const AttentionParams& p, const float* delta, cudaStream_t stream) {
  const char* e = nullptr;
  if constexpr (HEAD == 256) {  // dV and dK in two passes: one accumulator set fits the register file
    e = launch_dkdv<T, HEAD, 64, BQ_KV, 1, PACKED>(p, delta, stream);
    if (!e) e = launch_dkdv<T, HEAD, 64, BQ_KV, 2, PACKED>(p, delta, stream);
  } else {
    // packed sequences at head dim 128: query tiles of 16 (their per-sequence lengths take the
    // registers that 32 would need)
    e = launch_dkdv < T, HEAD, 64, PACKED && HEAD == 128 ? 16 : BQ_KV, 0, PACKED > (p, delta, stream);
  }
  if (!e) e = launch_dq<T, HEAD, 64, BK_Q, PACKED>(p, delta, stream);
  return e;
}

template <typename T>
const char* bwd_typed(const AttentionParams& p, float* delta, cudaStream_t stream) {
  const int threads = 256;
  launch_kernel(delta_kernel<T>, static_cast<unsigned>((p.B * p.H * p.rows_q + threads - 1) / threads), threads, 0,
                stream, p, delta);
  if (const char* e = launch_error()) return e;
  // (query, key) tiles: 64 x 64 at head dim 64, 32 x 64 at 32, 32 x 32 above (registers)
  return CudaHeadDims::dispatch(p.D, "head dim not supported by the cuda attention kernels (kCudaHeadDims)",
                                [&](auto head) {
                                  constexpr int D = decltype(head)::value;
                                  constexpr int BQ_KV = D == 64 ? 64 : 32, BK_Q = D <= 64 ? 64 : 32;
                                  return p.n_seq > 0 ? bwd_head<T, D, BQ_KV, BK_Q, true>(p, delta, stream)
                                                     : bwd_head<T, D, BQ_KV, BK_Q, false>(p, delta, stream);
                                });
}

}  // namespace

const char* attention_bwd(const AttentionParams& p, float* delta, void* stream) {
  if (const char* e = dtype_error(p.dtype, false, "the cuda attention kernels take float16 or bfloat16")) return e;
  if (p.B * p.H * p.Lq == 0 || p.Lk == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::BF16 ? bwd_typed<__nv_bfloat16>(p, delta, s) : bwd_typed<__half>(p, delta, s);
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS
