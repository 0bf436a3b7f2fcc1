// Tensor-core tile helpers of the CUDA kernels (sm_80+; attention and feed-forward):
// mma.sync m16n8k16 with float32 accumulation, ldmatrix loads of 8x8 half/bfloat16 sub-tiles
// from shared memory, cp.async copies global -> shared, and the tile GEMMs built on them.
//
// Register fragments (PTX ISA, mma.m16n8k16, 16-bit inputs): lane = 4 * g + t,
//   A 16x16 (row-major):  a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B 16x8  (k x n):      b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]
//   C 16x8  (float):      c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// A C fragment pair (two n-blocks) converted to 16 bits is an A fragment for the next
// product over k = those 16 columns: P = softmax(S) feeds P V without leaving registers.
#pragma once
#include "common.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS::mma {

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef FUSED_ATTN_EMU
    emu::mma_m16n8k16<false>(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef FUSED_ATTN_EMU
    emu::mma_m16n8k16<true>(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

#ifdef FUSED_ATTN_EMU
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix(r, 4, false, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix(r, 4, true, p); }
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  emu::cp_async_16(smem, gmem, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Streams tiles 0..n-1 through two shared-memory buffers: load(j, buf) issues tile j's
// cp.async copies into buffer buf; use(j, buf) runs once tile j has landed, while tile j + 1
// is in flight into the other buffer. The block synchronises before and after each use: use
// may read the whole buffer, and the next load overwrites only what every warp has read.
// Copies issued before the call (a tile every iteration reads) land with tile 0.
template <typename Load, typename Use>
__device__ __forceinline__ void double_buffered(int64_t n, Load&& load, Use&& use) {
  if (n > 0) load(int64_t(0), 0);
  cp_async_commit();
  for (int64_t j = 0; j < n; ++j) {
    if (j + 1 < n) {
      load(j + 1, static_cast<int>((j + 1) & 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    use(j, static_cast<int>(j & 1));
    __syncthreads();
  }
}

// Copies a (rows x HEAD) tile of a (L, HEAD) row-strided matrix into shared memory with
// row pitch HEAD + 8 (the 16-byte pad keeps ldmatrix rows on distinct banks). Rows at or
// past `valid_rows` are zero-filled. All threads of the block take part.
template <typename T, int HEAD, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
  constexpr int kChunks = HEAD / 8;  // 16-byte chunks per row
  constexpr int kPitch = HEAD + 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool ok = r < valid_rows;
    cp_async_16(smem + r * kPitch + c, gmem + (ok ? r * row_stride + c : 0), ok);
  }
}

// A fragment of the 16x16 block at (row0, col0) of a shared tile with pitch PITCH.
template <int PITCH, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * PITCH + col0 + (lane >> 4) * 8);
}

// B fragments for two n-blocks (rows n0..n0+7 and n0+8..n0+15 of the tile) over k = col0..col0+15,
// where the tile stores B transposed (one tile row per n, k contiguous): b0 for n0, b1 for n0+8.
template <int PITCH, typename T>
__device__ __forceinline__ void load_b_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int n0, int col0) {
  const int lane = threadIdx.x & 31;
  uint32_t r[4];
  ldmatrix_x4(r, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * PITCH + col0 + ((lane >> 3) & 1) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// B fragments for two n-blocks (columns n0..n0+7 and n0+8..n0+15) over k = rows k0..k0+15 of a
// tile stored (k rows, n contiguous): transposing loads. b0 for n0, b1 for n0+8.
template <int PITCH, typename T>
__device__ __forceinline__ void load_b_pair_trans(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + n0 + (lane >> 4) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// acc[NB][4] (16 rows x 8*NB cols) += A (16 x K, rows row0.. of tile a) @ B^T (B tile rows n0..n0+8*NB-1)
template <typename T, int K, int NB, int PA, int PB>
__device__ __forceinline__ void gemm_abt(float (&acc)[NB][4], const T* a, int row0, const T* b, int n0) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs");
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    uint32_t af[4];
    load_a<PA>(af, a, row0, k);
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b0[2], b1[2];
      load_b_pair<PB>(b0, b1, b, n0 + nb * 8, k);
      Mma<T>::run(acc[nb], af, b0);
      Mma<T>::run(acc[nb + 1], af, b1);
    }
  }
}

// acc[NB][4] (16 rows x 8*NB cols) += P (16 x KK, register C fragments pk[KK/8][4]) @ B (tile rows
// k0..k0+KK-1, columns n0..n0+8*NB-1), B stored (k rows, n contiguous).
template <typename T, int KK, int NB, int PB>
__device__ __forceinline__ void gemm_pb(float (&acc)[NB][4], const float (&p)[KK / 8][4], const T* b, int k0, int n0) {
#pragma unroll
  for (int kk = 0; kk < KK; kk += 16) {
    uint32_t af[4];
    af[0] = Mma<T>::pack(p[kk / 8][0], p[kk / 8][1]);
    af[1] = Mma<T>::pack(p[kk / 8][2], p[kk / 8][3]);
    af[2] = Mma<T>::pack(p[kk / 8 + 1][0], p[kk / 8 + 1][1]);
    af[3] = Mma<T>::pack(p[kk / 8 + 1][2], p[kk / 8 + 1][3]);
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b0[2], b1[2];
      load_b_pair_trans<PB>(b0, b1, b, k0 + kk, n0 + nb * 8);
      Mma<T>::run(acc[nb], af, b0);
      Mma<T>::run(acc[nb + 1], af, b1);
    }
  }
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS::mma
