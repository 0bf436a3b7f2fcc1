// The feed-forward block on tensor cores (sm_80+): one tiled GEMM kernel, C = A B, whose
// epilogue finishes each output element while it is still in registers:
//   HIDDEN  pre = acc + b1 (stored when training); C = act(pre) * keep   (first GEMM)
//   OUT     C = acc + b2 + residual                                     (second GEMM)
//   DGRAD   C = acc * keep * act'(pre)                 (dh = dOut W2, backward)
//   PLAIN   C = acc                                    (dW1, dW2, dx)
// Operands are read through strides, either K-contiguous or contiguous along M (A) / N (B),
// so x, the weights, dOut and their transposes are all used in place: K-contiguous tiles
// are read with ldmatrix, the others with ldmatrix.trans. Tiles of BM x BN outputs, 8 warps
// of 32 x 64 each, mma.sync m16n8k16 with float32 accumulation, BK-deep operand tiles
// double-buffered in shared memory by cp.async (rows padded by 16 bytes: no bank
// conflicts), thread blocks visited in groups of GROUP_M row tiles so that the column
// tiles they share stay in L2. Bias gradients are column sums in two passes (fixed row
// chunks, then the chunks in order): deterministic, no atomics.
//
// The hidden activation is stored (the second GEMM and dW2 read it), and so is pre when
// training, like the Triton kernels. Requirements (checked by the wrapper): float16 or
// bfloat16, d_model and d_ff multiples of 8, 16-byte aligned contiguous tensors.
#include <type_traits>

#include "mma.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS {
namespace {
using namespace mma;

constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, GROUP_M = 8;
constexpr int COLSUM_ROWS = 256;  // rows per partial column sum
enum Epilogue { PLAIN = 0, HIDDEN = 1, OUT = 2, DGRAD = 3 };

// C (M x N, contiguous rows) = A (M x K) B (K x N), A[m][k] at a + m * sam + k * sak,
// B[k][n] at b + k * sbk + n * sbn.
struct Gemm {
  const void* a;
  int64_t sam, sak;
  const void* b;
  int64_t sbk, sbn;
  void* c;
  int64_t M, N, K;
  const void* bias;    // (N,) HIDDEN, OUT
  void* pre_out;       // (M, N) HIDDEN, or nullptr
  const void* pre_in;  // (M, N) DGRAD
  const void* res;     // (M, N) OUT, or nullptr
  int32_t act;
  float dropout_p;
  uint64_t seed;
  uint32_t threshold;
};

__device__ __forceinline__ float activation(float v, int a) {
  switch (a) {
    case kRelu: return fmaxf(v, 0.f);
    case kGelu: return 0.5f * v * (1.f + erff(v * kSqrtHalfF));
    case kGeluTanh: return 0.5f * v * (1.f + tanhf(kSqrt2OverPiF * (v + kGeluTanhCubicF * v * v * v)));
    default: return v / (1.f + __expf(-v));
  }
}

__device__ __forceinline__ float activation_grad(float v, int a) {
  switch (a) {
    case kRelu: return v > 0.f ? 1.f : 0.f;
    case kGelu: return 0.5f * (1.f + erff(v * kSqrtHalfF)) + v * kInvSqrt2PiF * __expf(-0.5f * v * v);
    case kGeluTanh: {
      const float th = tanhf(kSqrt2OverPiF * (v + kGeluTanhCubicF * v * v * v));
      const float du = kSqrt2OverPiF * (1.f + (3.f * kGeluTanhCubicF) * v * v);
      return 0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * du;
    }
    default: {
      const float s = 1.f / (1.f + __expf(-v));
      return s * (1.f + v * (1.f - s));
    }
  }
}

// One operand's BK-deep tile: OUTER rows (m of A, n of B) starting at o0, k from k0.
// K-contiguous: stored [OUTER][BK + 8]; else stored [BK][OUTER + 8]. Out of range -> 0.
template <typename T, bool KMAJOR, int OUTER>
__device__ __forceinline__ void load_operand(T* smem, const T* x, int64_t s_outer, int64_t s_k, int64_t o0,
                                             int64_t outer_size, int64_t k0, int64_t K) {
  if constexpr (KMAJOR) {
    constexpr int kChunks = BK / 8, kPitch = BK + 8;
    for (int i = threadIdx.x; i < OUTER * kChunks; i += THREADS) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      const int64_t o = o0 + r, k = k0 + c;
      const bool ok = o < outer_size && k < K;
      cp_async_16(smem + r * kPitch + c, x + (ok ? o * s_outer + k : 0), ok);
    }
  } else {
    constexpr int kChunks = OUTER / 8, kPitch = OUTER + 8;
    for (int i = threadIdx.x; i < BK * kChunks; i += THREADS) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      const int64_t k = k0 + r, o = o0 + c;
      const bool ok = k < K && o < outer_size;
      cp_async_16(smem + r * kPitch + c, x + (ok ? k * s_k + o : 0), ok);
    }
  }
}

// A fragment (16 x 16 at rows m0, k0) from either layout of the A tile.
template <typename T, bool KMAJOR>
__device__ __forceinline__ void fragment_a(uint32_t (&a)[4], const T* tile, int m0, int k0) {
  if constexpr (KMAJOR) {
    load_a<BK + 8>(a, tile, m0, k0);
  } else {
    // the tile holds A^T: transposing loads of the four 8x8 blocks, in a[0..3]'s order
    const int lane = threadIdx.x & 31;
    ldmatrix_x4_trans(a, tile + (k0 + (lane & 7) + ((lane >> 4) << 3)) * (BM + 8) + m0 + ((lane >> 3) & 1) * 8);
  }
}

// B fragments for n-blocks n0 and n0 + 8 over k0..k0+15 from either layout of the B tile.
template <typename T, bool KMAJOR>
__device__ __forceinline__ void fragment_b_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int n0, int k0) {
  if constexpr (KMAJOR) {
    load_b_pair<BK + 8>(b0, b1, tile, n0, k0);
  } else {
    load_b_pair_trans<BN + 8>(b0, b1, tile, k0, n0);
  }
}

__device__ __forceinline__ float keep_factor(const Gemm& p, int64_t row, int64_t col) {
  // the Philox draw every backend makes for hidden element (row, col)
  return philox_draw(p.seed, static_cast<uint32_t>(row * p.N + col)) >= p.threshold ? 1.f / (1.f - p.dropout_p) : 0.f;
}

// Finishes outputs (row, col) and (row, col + 1) (col even, N even: both in range).
template <typename T, int EPI>
__device__ __forceinline__ void finish_pair(const Gemm& p, int64_t row, int64_t col, float (&v)[2]) {
  const int64_t idx = row * p.N + col;
  if constexpr (EPI == HIDDEN || EPI == OUT) {
    if (p.bias) {
      float b[2];
      load_float<T, 2>(static_cast<const T*>(p.bias) + col, b);
      v[0] += b[0], v[1] += b[1];
    }
  }
  if constexpr (EPI == OUT) {
    if (p.res) {
      float r[2];
      load_float<T, 2>(static_cast<const T*>(p.res) + idx, r);
      v[0] += r[0], v[1] += r[1];
    }
  }
  if constexpr (EPI == HIDDEN) {
    if (p.pre_out) store_float<T, 2>(static_cast<T*>(p.pre_out) + idx, v);
    v[0] = activation(v[0], p.act), v[1] = activation(v[1], p.act);
  }
  if constexpr (EPI == HIDDEN || EPI == DGRAD) {
    if (p.dropout_p > 0.f) v[0] *= keep_factor(p, row, col), v[1] *= keep_factor(p, row, col + 1);
  }
  if constexpr (EPI == DGRAD) {
    float pre[2];
    load_float<T, 2>(static_cast<const T*>(p.pre_in) + idx, pre);
    v[0] *= activation_grad(pre[0], p.act), v[1] *= activation_grad(pre[1], p.act);
  }
  store_float<T, 2>(static_cast<T*>(p.c) + idx, v);
}

template <typename T, bool A_K, bool B_K, int EPI>
__global__ void __launch_bounds__(THREADS) feed_forward_gemm_kernel(const Gemm p) {
  constexpr int kTileA = A_K ? BM * (BK + 8) : BK * (BM + 8);
  constexpr int kTileB = B_K ? BN * (BK + 8) : BK * (BN + 8);
  static_assert(2 * (kTileA + kTileB) * sizeof(T) <= 48 * 1024, "static shared memory over 48 KB");
  FUSED_ATTN_STATIC_SMEM(T, As, [2][kTileA]);
  FUSED_ATTN_STATIC_SMEM(T, Bs, [2][kTileB]);

  // grouped tile order: GROUP_M row tiles run next to each other over the column tiles
  const int64_t tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  const int64_t per_group = int64_t(GROUP_M) * tiles_n, pid = blockIdx.x;
  const int64_t first_m = (pid / per_group) * GROUP_M;
  const int64_t group_rows = imin(tiles_m - first_m, GROUP_M);
  const int64_t m0 = (first_m + (pid % per_group) % group_rows) * BM;
  const int64_t n0 = ((pid % per_group) / group_rows) * BN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 64;  // this warp's 32 x 64 outputs
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  auto load = [&](int64_t kt, int buf) {
    load_operand<T, A_K, BM>(As[buf], A, p.sam, p.sak, m0, p.M, kt * BK, p.K);
    load_operand<T, B_K, BN>(Bs[buf], B, p.sbn, p.sbk, n0, p.N, kt * BK, p.K);
  };

  float acc[2][8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int64_t k_tiles = (p.K + BK - 1) / BK;
  double_buffered(k_tiles, load, [&](int64_t, int buf) {
    const T* as = As[buf];
    const T* bs = Bs[buf];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[2][4];
      fragment_a<T, A_K>(af[0], as, wm, kk);
      fragment_a<T, A_K>(af[1], as, wm + 16, kk);
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        uint32_t b0[2], b1[2];
        fragment_b_pair<T, B_K>(b0, b1, bs, wn + j * 8, kk);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          Mma<T>::run(acc[i][j], af[i], b0);
          Mma<T>::run(acc[i][j + 1], af[i], b1);
        }
      }
    }
  });

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = m0 + wm + i * 16 + g + half * 8, col = n0 + wn + j * 8 + 2 * t;
        if (row < p.M && col < p.N) {
          float v[2] = {acc[i][j][2 * half], acc[i][j][2 * half + 1]};
          finish_pair<T, EPI>(p, row, col, v);
        }
      }
}

// partial[c][col] = sum of x[row][col] over rows [c * COLSUM_ROWS, (c + 1) * COLSUM_ROWS)
template <typename T>
__global__ void column_partial_kernel(const T* x, int64_t rows, int64_t cols, float* partial) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, chunk = blockIdx.y;
  if (col >= cols) return;
  const int64_t r1 = imin(rows, (chunk + 1) * COLSUM_ROWS);
  double s = 0.0;  // bias gradients sum millions of rows: float64 sums, like torch's cascade
  for (int64_t r = chunk * COLSUM_ROWS; r < r1; ++r) s += to_float(x[r * cols + col]);
  partial[chunk * cols + col] = static_cast<float>(s);
}

template <typename T>
void column_sums(const void* x, int64_t rows, int64_t cols, float* partial, float* out, cudaStream_t s) {
  const int64_t chunks = (rows + COLSUM_ROWS - 1) / COLSUM_ROWS;
  const dim3 grid(static_cast<unsigned>((cols + 127) / 128), static_cast<unsigned>(chunks));
  launch_kernel(column_partial_kernel<T>, grid, 128, 0, s, static_cast<const T*>(x), rows, cols, partial);
  ordered_column_sum(partial, chunks, cols, out, s);
}

template <typename T, bool A_K, bool B_K, int EPI>
void launch(const Gemm& g, cudaStream_t s) {
  const int64_t tiles = ((g.M + BM - 1) / BM) * ((g.N + BN - 1) / BN);
  if (tiles > 0)
    launch_kernel(feed_forward_gemm_kernel<T, A_K, B_K, EPI>, static_cast<unsigned>(tiles), THREADS, 0, s, g);
}

Gemm base(const FeedForwardParams& p) {
  Gemm g{};
  g.act = p.activation;
  g.dropout_p = static_cast<float>(p.dropout_p);
  g.seed = p.seed;
  g.threshold = p.threshold;
  return g;
}

}  // namespace

int64_t feed_forward_column_partial_chunks(int64_t rows) { return (rows + COLSUM_ROWS - 1) / COLSUM_ROWS; }

const char* feed_forward_fwd(const FeedForwardParams& p, void* hidden, void* stream) {
  if (const char* e = dtype_error(p.dtype, false, "the cuda feed-forward kernels take float16 or bfloat16")) return e;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t M = p.M, dm = p.d_model, dff = p.d_ff;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      Gemm g1 = base(p);  // hidden = dropout(act(x W1^T + b1))
      g1.a = p.x, g1.sam = dm, g1.sak = 1, g1.b = p.w1, g1.sbk = 1, g1.sbn = dm;
      g1.c = hidden, g1.M = M, g1.N = dff, g1.K = dm, g1.bias = p.b1, g1.pre_out = p.pre;
      launch<T, true, true, HIDDEN>(g1, s);
      Gemm g2 = base(p);  // out = hidden W2^T + b2 + residual
      g2.a = hidden, g2.sam = dff, g2.sak = 1, g2.b = p.w2, g2.sbk = 1, g2.sbn = dff;
      g2.c = p.out, g2.M = M, g2.N = dm, g2.K = dff, g2.bias = p.b2, g2.res = p.residual;
      launch<T, true, true, OUT>(g2, s);
    }
  });
  return launch_error();
}

const char* feed_forward_bwd(const FeedForwardParams& p, const void* hidden, void* dh, float* partial, void* stream) {
  if (const char* e = dtype_error(p.dtype, false, "the cuda feed-forward kernels take float16 or bfloat16")) return e;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t M = p.M, dm = p.d_model, dff = p.d_ff;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      Gemm dg = base(p);  // dh = (dOut W2) * keep * act'(pre)
      dg.a = p.dout, dg.sam = dm, dg.sak = 1, dg.b = p.w2, dg.sbk = dff, dg.sbn = 1;
      dg.c = dh, dg.M = M, dg.N = dff, dg.K = dm, dg.pre_in = p.pre;
      launch<T, true, false, DGRAD>(dg, s);
      Gemm w2g = base(p);  // dW2 = dOut^T hidden
      w2g.a = p.dout, w2g.sam = 1, w2g.sak = dm, w2g.b = hidden, w2g.sbk = dff, w2g.sbn = 1;
      w2g.c = p.dw2, w2g.M = dm, w2g.N = dff, w2g.K = M;
      launch<T, false, false, PLAIN>(w2g, s);
      Gemm w1g = base(p);  // dW1 = dh^T x
      w1g.a = dh, w1g.sam = 1, w1g.sak = dff, w1g.b = p.x, w1g.sbk = dm, w1g.sbn = 1;
      w1g.c = p.dw1, w1g.M = dff, w1g.N = dm, w1g.K = M;
      launch<T, false, false, PLAIN>(w1g, s);
      Gemm xg = base(p);  // dx = dh W1
      xg.a = dh, xg.sam = dff, xg.sak = 1, xg.b = p.w1, xg.sbk = dm, xg.sbn = 1;
      xg.c = p.dx, xg.M = M, xg.N = dm, xg.K = dff;
      launch<T, true, false, PLAIN>(xg, s);
      // stream order: the second sum reuses the partial buffer after the first is done
      if (p.db2) column_sums<T>(p.dout, M, dm, partial, static_cast<float*>(p.db2), s);
      if (p.db1) column_sums<T>(dh, M, dff, partial, static_cast<float*>(p.db1), s);
    }
  });
  return launch_error();
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS
