// Helpers shared by the CUDA kernels: element types and conversions, vector packs,
// warp and block reductions, launching and launch-error reporting. No torch headers.
//
// FUSED_ATTN_EMU is the one switch between the two builds of these sources: undefined,
// nvcc compiles them for the GPU; defined, the host compiler compiles the same kernels
// against the warp emulator (csrc/emu/cuda_emu.h) to run on the CPU. Every difference
// between the two is in this header and in attention_common.cuh's instruction wrappers,
// each as an #if/#else pair; the kernels themselves have no #ifdef.
#pragma once
#ifdef FUSED_ATTN_EMU
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <utility>

#include "../kernel_params.h"

// A kernel's dynamic shared memory, as a byte array `name` aligned to 16 bytes.
#ifdef FUSED_ATTN_EMU
#define FUSED_ATTN_DYNAMIC_SMEM(name) unsigned char* name = ::fused_attn::emu::dynamic_smem()
#else
#define FUSED_ATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// A static __shared__ array `TYPE name DIMS` aligned to 16 bytes, e.g. (float, scratch, [32]).
#ifdef FUSED_ATTN_EMU
#define FUSED_ATTN_STATIC_SMEM(TYPE, name, DIMS) \
  static char name##_key;                        \
  using name##_array = TYPE DIMS;                \
  name##_array& name = ::fused_attn::emu::static_smem<name##_array>(&name##_key)
#else
#define FUSED_ATTN_STATIC_SMEM(TYPE, name, DIMS) __shared__ __align__(16) TYPE name DIMS
#endif

namespace fused_attn::FUSED_ATTN_CUDA_NS {

// clang-format off: a .cuh is not parsed as CUDA, and one-line specialisations read best
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// clang-format on

// VEC elements of T loaded or stored in one access (16 bytes for the widest packs).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_float(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. `scratch` holds 32 floats; the block
// size is a multiple of 32. Safe to call repeatedly (it syncs before reusing scratch).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

inline bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// kernel<<<grid, block, smem_bytes, stream>>>(args...), or its emulation on the CPU.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args&&... args) {
#ifdef FUSED_ATTN_EMU
  (void)stream;
  emu::launch(kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
#else
  // clang-format off: a .cuh is not parsed as CUDA (it would split <<< >>>)
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
#endif
}

inline const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

inline int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 108;
  return n;
}

// Calls f(T{}) for the storage type of a DType.
template <typename F>
inline void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    case DType::F64: break;  // the launchers reject it first (dtype_error)
  }
}

// The launchers' own dtype check (the Python capability records say the same, but a
// launcher never runs a kernel for a type it was not written for): nullptr when `t` is
// one of the 16-bit types, or float32 with `float32_ok`.
inline const char* dtype_error(DType t, bool float32_ok, const char* what) {
  if (t == DType::F16 || t == DType::BF16 || (float32_ok && t == DType::F32)) return nullptr;
  return what;
}

// The deterministic second pass of a column sum (bias and LayerNorm weight gradients), whose
// first pass leaves one float32 partial row per block of rows: out[col] = the partial rows'
// values at col added in row order, in Acc (float64 by default). (Templates: compiled only
// into the .cu files that use them.)
template <typename Acc>
__global__ void ordered_column_sum_kernel(const float* __restrict__ partial, int64_t rows, int64_t cols,
                                          float* __restrict__ out) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  Acc s = 0;
  for (int64_t r = 0; r < rows; ++r) s += partial[r * cols + col];
  out[col] = static_cast<float>(s);
}

template <typename Acc = double>
void ordered_column_sum(const float* partial, int64_t rows, int64_t cols, float* out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  launch_kernel(ordered_column_sum_kernel<Acc>, static_cast<unsigned>((cols + kThreads - 1) / kThreads), kThreads, 0,
                stream, partial, rows, cols, out);
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS
