// CUDA implementations of the fused_attn_C operators: checks (ops_common.h), device
// guard, the current stream, launch and launch-error reporting. Compiled by the host
// compiler; the kernels live in cuda/*.cu behind plain launch functions.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "ops_common.h"

namespace fused_attn {
namespace {

void check_cuda(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "input must be a CUDA tensor for the cuda kernels, got ", describe(t));
}

void raise_if(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "fused_attn CUDA kernel ", op, " failed to launch: ", err ? err : "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool store_sum) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto r = prepare_layer_norm_fwd(x, residual, weight, bias, eps, store_sum);
  raise_if(cuda::layer_norm_fwd(r.params, c10::cuda::getCurrentCUDAStream().stream()), "layer_norm_fwd");
  return {r.y, r.sum, r.mean, r.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dsum, const at::Tensor& x,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool weight_grad,
    bool bias_grad) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  auto r = prepare_layer_norm_bwd(dy, dsum, x, weight, mean, rstd, weight_grad, bias_grad,
                                  [device](int64_t rows, int64_t cols) {
                                    return cuda::layer_norm_bwd_partial_rows(rows, cols, device);
                                  },
                                  /*zero_partials=*/true);
  raise_if(cuda::layer_norm_bwd(r.params, c10::cuda::getCurrentCUDAStream().stream()), "layer_norm_bwd");
  return {r.dx, r.dw, r.db};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fused_attn::layer_norm_bwd_cuda);
}
