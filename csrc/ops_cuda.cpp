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

void check_attention_cuda(const at::Tensor& q, const AttentionParams& p) {
  TORCH_CHECK_NOT_IMPLEMENTED(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                              "the cuda attention kernels take float16 or bfloat16, got ", describe(q),
                              "; float32 runs on the triton, cpu and torch backends");
  TORCH_CHECK_NOT_IMPLEMENTED(cuda::attention_head_supported(p.D) && p.DV == p.D,
                              "the cuda attention kernels take head dims 32, 64, 96, 128 or 256 with the value head "
                              "dim equal to the query's, got ", p.D, " and ", p.DV);
}

// q/k/v/dout as the kernels read them: contiguous head dim, 16-byte aligned rows (a copy
// only for unusual layouts)
at::Tensor kernel_layout(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(2) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& mask, int64_t mask_kind,
                                                      int64_t causal, double scale, double dropout_p, int64_t seed) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = check_attention(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed);
  check_attention_cuda(q, p);
  const auto qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  auto out = alloc({p.B, p.H, p.Lq, p.DV}, q.options());
  auto stats = alloc({2, p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr();
  set_strides(qc, p.q_stride), set_strides(kc, p.k_stride), set_strides(vc, p.v_stride);
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  raise_if(cuda::attention_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), "attention_fwd");
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& mask, int64_t mask_kind, int64_t causal, double scale,
    double dropout_p, int64_t seed, bool mask_grad) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = check_attention(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed);
  check_attention_cuda(q, p);
  TORCH_CHECK_VALUE(dout.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == p.B && out.size(1) == p.H &&
                        out.size(2) == p.Lq && out.size(3) == p.DV,
                    "grad_output and out must be (B, H, Lq, DV) = (", p.B, ", ", p.H, ", ", p.Lq, ", ", p.DV,
                    "), got ", describe(dout), " and ", describe(out));
  TORCH_CHECK_VALUE(stats.dim() == 4 && stats.size(0) == 2 && stats.scalar_type() == at::kFloat &&
                        stats.is_contiguous() && stats.device() == q.device(),
                    "stats must be the contiguous float32 (2, B, H, Lq) tensor attention_fwd returned, got ",
                    describe(stats));
  TORCH_CHECK_VALUE(!mask_grad || mask_kind == 2, "mask_grad needs a float mask (mask_kind 2)");
  const auto qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v), dc = kernel_layout(dout);
  const auto oc = out.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = alloc({p.B, p.H, p.Lq, p.D}, q.options());
  auto dk = alloc({p.B, p.HK, p.Lk, p.D}, q.options());
  auto dv = alloc({p.B, p.HK, p.Lk, p.DV}, q.options());
  auto dmask = mask_grad ? at::zeros({p.B, p.H, p.Lq, p.Lk}, f32) : at::empty({0}, f32);
  auto delta = at::empty({p.B * p.H * p.Lq}, f32);
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr(), p.dout = dc.data_ptr();
  set_strides(qc, p.q_stride), set_strides(kc, p.k_stride), set_strides(vc, p.v_stride);
  set_strides(dc, p.do_stride);
  p.out = const_cast<void*>(oc.data_ptr());
  p.stats = const_cast<float*>(stats.data_ptr<float>());
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  raise_if(cuda::attention_bwd(p, delta.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
           "attention_bwd");
  return {dq, dk, dv, mask_grad ? dmask.to(mask->scalar_type()) : dmask};
}

void check_ffn_cuda(const at::Tensor& x, const FfnParams& p) {
  TORCH_CHECK_NOT_IMPLEMENTED(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                              "the cuda feed-forward kernels take float16 or bfloat16, got ", describe(x),
                              "; float32 runs on the triton, cpu and torch backends");
  TORCH_CHECK_NOT_IMPLEMENTED(p.d_model % 8 == 0 && p.d_ff % 8 == 0,
                              "the cuda feed-forward kernels need d_model and d_ff to be multiples of 8, got d_model=",
                              p.d_model, ", d_ff=", p.d_ff);
}

// contiguous, in x's dtype and 16-byte aligned (cp.async reads 16-byte chunks)
at::Tensor ffn_layout(const at::Tensor& t, const at::Tensor& x) {
  auto c = t.to(x.scalar_type()).contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                            const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                            const c10::optional<at::Tensor>& b2,
                                                            const c10::optional<at::Tensor>& residual,
                                                            int64_t activation, double dropout_p, int64_t seed,
                                                            bool save_pre) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto p = check_ffn(x, w1, b1, w2, b2, residual, activation, dropout_p);
  check_ffn_cuda(x, p);
  p.seed = static_cast<uint64_t>(seed);
  const auto xc = ffn_layout(x, x), w1c = ffn_layout(w1, x), w2c = ffn_layout(w2, x);
  at::Tensor b1c, b2c, rc;
  if (b1) b1c = ffn_layout(*b1, x);
  if (b2) b2c = ffn_layout(*b2, x);
  if (residual) rc = ffn_layout(*residual, x);
  auto out = alloc({p.M, p.d_model}, x.options()), hidden = alloc({p.M, p.d_ff}, x.options());
  auto pre = save_pre ? alloc({p.M, p.d_ff}, x.options()) : at::empty({0}, x.options());
  p.x = xc.data_ptr(), p.w1 = w1c.data_ptr(), p.w2 = w2c.data_ptr();
  p.b1 = b1 ? b1c.data_ptr() : nullptr, p.b2 = b2 ? b2c.data_ptr() : nullptr;
  p.residual = residual ? rc.data_ptr() : nullptr;
  p.out = out.data_ptr(), p.pre = save_pre ? pre.data_ptr() : nullptr;
  if (p.M > 0) raise_if(cuda::ffn_fwd(p, hidden.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()), "ffn_fwd");
  return {out, hidden, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    const at::Tensor& hidden, int64_t activation, double dropout_p, int64_t seed, bool need_b1, bool need_b2) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto p = check_ffn(x, w1, c10::nullopt, w2, c10::nullopt, c10::nullopt, activation, dropout_p);
  check_ffn_cuda(x, p);
  p.seed = static_cast<uint64_t>(seed);
  check_matrix(dout, "grad_output", p.M, p.d_model, x);
  check_matrix(pre, "pre", p.M, p.d_ff, x);
  check_matrix(hidden, "hidden", p.M, p.d_ff, x);
  const auto dc = ffn_layout(dout, x), xc = ffn_layout(x, x), w1c = ffn_layout(w1, x), w2c = ffn_layout(w2, x);
  const auto prec = ffn_layout(pre, x), hc = ffn_layout(hidden, x);
  const auto f32 = x.options().dtype(at::kFloat);
  auto dx = alloc({p.M, p.d_model}, x.options());
  auto dw1 = alloc({p.d_ff, p.d_model}, x.options()), dw2 = alloc({p.d_model, p.d_ff}, x.options());
  auto db1 = need_b1 ? alloc({p.d_ff}, f32) : at::empty({0}, f32);
  auto db2 = need_b2 ? alloc({p.d_model}, f32) : at::empty({0}, f32);
  auto dh = at::empty({p.M, p.d_ff}, x.options());
  auto partial = at::empty({cuda::ffn_column_partial_chunks(p.M) * std::max(p.d_model, p.d_ff)}, f32);
  p.dout = dc.data_ptr(), p.x = xc.data_ptr(), p.w1 = w1c.data_ptr(), p.w2 = w2c.data_ptr();
  p.pre = const_cast<void*>(prec.data_ptr());
  p.dx = dx.data_ptr(), p.dw1 = dw1.data_ptr(), p.dw2 = dw2.data_ptr();
  p.db1 = need_b1 ? db1.data_ptr<float>() : nullptr, p.db2 = need_b2 ? db2.data_ptr<float>() : nullptr;
  if (p.M > 0) {
    raise_if(cuda::ffn_bwd(p, hc.data_ptr(), dh.data_ptr(), partial.data_ptr<float>(),
                           c10::cuda::getCurrentCUDAStream().stream()),
             "ffn_bwd");
  } else {
    dw1.zero_(), dw2.zero_(), db1.zero_(), db2.zero_();
  }
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fused_attn::layer_norm_bwd_cuda);
  m.impl("attention_fwd", &fused_attn::attention_fwd_cuda);
  m.impl("attention_bwd", &fused_attn::attention_bwd_cuda);
  m.impl("ffn_fwd", &fused_attn::ffn_fwd_cuda);
  m.impl("ffn_bwd", &fused_attn::ffn_bwd_cuda);
}
