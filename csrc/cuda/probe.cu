// The instruction probe: one warp runs every instruction the warp emulator implements
// (cp.async with and without zero-fill, commit/wait, __syncthreads, ldmatrix .x4 and
// .x4.trans, mma.sync m16n8k16 f16 and bf16, a xor shuffle) on small integers, where all
// arithmetic is exact, and writes every register it got. benchmarks/gpu_suite.sh runs it
// on the GPU and in the emulator and compares the two bit for bit: the fragment layouts on
// real hardware. Output: 32 lanes x kProbeWords 32-bit words.
#include "mma.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS {
namespace {
using namespace mma;

constexpr int kPitch = 16 + 8;  // a 16 x 16 tile with the kernels' 16-byte row padding

template <typename T>
__device__ __forceinline__ void probe_mma(const T* tile, uint32_t* out) {
  const int lane = threadIdx.x & 31;
  uint32_t a[4], b0[2], b1[2];
  load_a<kPitch>(a, tile, 0, 0);
  load_b_pair<kPitch>(b0, b1, tile, 0, 0);
  float c0[4] = {1.f, 2.f, 3.f, float(lane)}, c1[4] = {0.f, 0.f, 0.f, 0.f};
  Mma<T>::run(c0, a, b0);  // A A^T blocks: every product and sum an exact small integer
  Mma<T>::run(c1, a, b1);
  for (int i = 0; i < 4; ++i) {
    out[i] = __float_as_uint(c0[i]);
    out[4 + i] = __float_as_uint(c1[i]);
  }
}

// in: two 16 x 16 tiles (float16, then bfloat16), row-major, 16-byte aligned
__global__ void __launch_bounds__(32) probe_kernel(const uint16_t* in, uint32_t* out) {
  FUSED_ATTN_DYNAMIC_SMEM(smem_raw);
  auto* h = reinterpret_cast<__half*>(smem_raw);                // 17 rows: the tile and a zero-filled row
  auto* b = reinterpret_cast<__nv_bfloat16*>(h + 17 * kPitch);  // 16 rows
  const int lane = threadIdx.x;
  // 32 16-byte chunks per tile: lane l copies row l / 2, half l % 2 of each
  cp_async_16(h + (lane >> 1) * kPitch + (lane & 1) * 8, in + lane * 8, true);
  cp_async_commit();
  cp_async_16(b + (lane >> 1) * kPitch + (lane & 1) * 8, in + 256 + lane * 8, true);
  if (lane < 2) cp_async_16(h + 16 * kPitch + lane * 8, in, false);  // zero-fill
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t* o = out + lane * 30;
  uint32_t r[4];
  ldmatrix_x4(r, h + (lane & 15) * kPitch + (lane >> 4) * 8);
  for (int i = 0; i < 4; ++i) o[i] = r[i];
  ldmatrix_x4_trans(r, h + (lane & 15) * kPitch + (lane >> 4) * 8);
  for (int i = 0; i < 4; ++i) o[4 + i] = r[i];
  probe_mma(h, o + 8);
  probe_mma(b, o + 16);
  o[24] = __float_as_uint(__shfl_xor_sync(0xffffffffu, float(lane * 3 + 1), 5));
  o[25] = __float_as_uint(warp_sum(float(lane)));
  const uint32_t* zero_row = reinterpret_cast<const uint32_t*>(h + 16 * kPitch);
  for (int i = 0; i < 4; ++i) o[26 + i] = zero_row[(lane & 1) * 4 + i];
}

}  // namespace

int64_t probe_words() { return 32 * 30; }

const char* instruction_probe(const void* in, void* out, void* stream) {
  constexpr int kSmem = 33 * kPitch * 2;
  launch_kernel(probe_kernel, 1, 32, kSmem, static_cast<cudaStream_t>(stream), static_cast<const uint16_t*>(in),
                static_cast<uint32_t*>(out));
  return launch_error();
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS
