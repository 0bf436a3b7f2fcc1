// fused_attn._C: operator schemas (torch.ops.fused_attn_C.*), their CPU implementations,
// and a small Python module with build information. The CUDA implementations are
// registered from ops_cuda.cpp when the extension is built with CUDA.
#include <torch/extension.h>

#include "ops_common.h"

namespace fused_attn {

bool& poison_outputs() {
  static bool enabled = false;
  return enabled;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool store_sum) {
  auto r = prepare_layer_norm_fwd(x, residual, weight, bias, eps, store_sum);
  if (r.params.rows > 0) cpu::layer_norm_fwd(r.params);
  return {r.y, r.sum, r.mean, r.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dsum, const at::Tensor& x,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool weight_grad,
    bool bias_grad) {
  auto r = prepare_layer_norm_bwd(dy, dsum, x, weight, mean, rstd, weight_grad, bias_grad,
                                  [](int64_t rows, int64_t cols) { return cpu::layer_norm_bwd_partial_rows(rows, cols); },
                                  /*zero_partials=*/false);
  if (r.params.rows > 0) cpu::layer_norm_bwd(r.params);
  return {r.dx, r.dw, r.db};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY(fused_attn_C, m) {
  // x, residual: (rows, cols); weight, bias: (cols,). Returns y, x + residual (empty unless
  // store_sum and a residual), mean and rstd (rows,) in float32.
  m.def(
      "layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool store_sum) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Returns dx (rows, cols) and float32 dweight, dbias (cols,) (empty when not asked for).
  m.def(
      "layer_norm_bwd(Tensor grad_output, Tensor? grad_sum, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, "
      "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &fused_attn::layer_norm_bwd_cpu);
}

namespace {
bool has_cuda() {
#ifdef FUSED_ATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn compiled kernels; the operators live in torch.ops.fused_attn_C";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("set_poison", [](bool on) { fused_attn::poison_outputs() = on; },
        "NaN-fill kernel outputs before the kernels run (tests)");
  m.def("build_info", []() {
    pybind11::dict d;
    d["cpu_capability"] = FUSED_ATTN_CPU_CAPABILITY;
    d["cuda"] = has_cuda();
    return d;
  });
}
