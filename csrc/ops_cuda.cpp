// The CUDA implementations of the fused_attn_C operators: the shared wrappers (ops_gpu.h)
// on CUDA tensors, under a device guard, on the current stream. Compiled by the host
// compiler; the kernels live in cuda/*.cu behind plain launch functions.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "ops_gpu.h"

namespace {

struct CudaDevice {
  static constexpr const char* kName = "fused_attn CUDA";
  static constexpr const char* kBackend = "cuda";
  static void check(const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.is_cuda(), "input must be a CUDA tensor for the cuda kernels, got ", fused_attn::describe(t));
  }
  static c10::cuda::CUDAGuard guard(const at::Tensor& t) { return c10::cuda::CUDAGuard(t.device()); }
  static void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) { fused_attn::gpu::register_kernels<CudaDevice>(m); }
