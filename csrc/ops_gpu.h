// Torch-facing wrappers of the CUDA kernels' launch functions (csrc/cuda/*.cu): checks
// (ops_common.h), allocation, layouts, launch and launch-error reporting. Shared by the two
// builds of those kernels, through a Device policy:
//   ops_cuda.cpp  the nvcc build on CUDA tensors (device guard, current stream)
//   ops_emu.cpp   the warp-emulator build (csrc/emu) on CPU tensors
// A Device has kName (for launch errors), kBackend (the backend name in messages),
// check(t) (the tensor is on its device), guard(t) (an RAII device guard) and stream().
// The launch functions are FUSED_ATTN_CUDA_NS's: cuda or cuda_emu, by the including build.
#pragma once
#include "ops_common.h"

namespace fused_attn::gpu {

template <class Device>
void raise_if(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, Device::kName, " kernel ", op, " failed to launch: ", err ? err : "");
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& residual,
                                                                          const c10::optional<at::Tensor>& weight,
                                                                          const c10::optional<at::Tensor>& bias,
                                                                          double eps, bool store_sum) {
  Device::check(x);
  [[maybe_unused]] const auto guard = Device::guard(x);
  auto r = prepare_layer_norm_fwd(x, residual, weight, bias, eps, store_sum);
  raise_if<Device>(FUSED_ATTN_CUDA_NS::layer_norm_fwd(r.params, Device::stream()), "layer_norm_fwd");
  return {r.y, r.sum, r.mean, r.rstd};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy,
                                                              const c10::optional<at::Tensor>& dsum,
                                                              const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool weight_grad, bool bias_grad) {
  Device::check(x);
  [[maybe_unused]] const auto guard = Device::guard(x);
  const int device = x.get_device();
  auto r = prepare_layer_norm_bwd(
      dy, dsum, x, weight, mean, rstd, weight_grad, bias_grad,
      [device](int64_t rows, int64_t cols) {
        return FUSED_ATTN_CUDA_NS::layer_norm_bwd_partial_rows(rows, cols, device);
      },
      /*zero_partials=*/true);
  raise_if<Device>(FUSED_ATTN_CUDA_NS::layer_norm_bwd(r.params, Device::stream()), "layer_norm_bwd");
  return {r.dx, r.dw, r.db};
}

// "32, 64, 96, 128 or 256": kCudaHeadDims in words
inline std::string cuda_head_dims_text() {
  std::string out;
  const size_t n = std::size(kCudaHeadDims);
  for (size_t i = 0; i < n; ++i) out += (i == 0 ? "" : i + 1 == n ? " or " : ", ") + std::to_string(kCudaHeadDims[i]);
  return out;
}

template <class Device>
void check_attention_kernels(const at::Tensor& q, const AttentionParams& p) {
  TORCH_CHECK_NOT_IMPLEMENTED(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "the ",
                              Device::kBackend, " attention kernels take float16 or bfloat16, got ", describe(q),
                              "; float32 runs on the triton, cpu and torch backends");
  TORCH_CHECK_NOT_IMPLEMENTED(attention_head_supported(p.D) && p.DV == p.D, "the ", Device::kBackend,
                              " attention kernels take head dims ", cuda_head_dims_text(),
                              " with the value head dim equal to the query's, got ", p.D, " and ", p.DV);
  // the kernels' row spans are 32-bit (attention_common.cuh Span)
  TORCH_CHECK_NOT_IMPLEMENTED(p.Lq < (int64_t(1) << 31) && p.Lk < (int64_t(1) << 31), "the ", Device::kBackend,
                              " attention kernels take sequences shorter than 2**31, got Lq = ", p.Lq, ", Lk = ", p.Lk);
}

// q/k/v/dout as the kernels read them: contiguous head dim, 16-byte aligned rows (a copy
// only for unusual layouts)
inline at::Tensor kernel_layout(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(2) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

// attention_fwd, or attention_packed_fwd with `packed` (q, k, v the (1, H, T, D) views of the
// packed rows; alibi then has a row per sequence).
template <class Device>
std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& mask, int64_t mask_kind,
                                                      int64_t causal, double scale, double dropout_p, int64_t seed,
                                                      int64_t window_left, int64_t window_right, double softcap,
                                                      const c10::optional<at::Tensor>& alibi, const Packing* packed) {
  Device::check(q);
  [[maybe_unused]] const auto guard = Device::guard(q);
  auto p = check_attention(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap,
                           packed ? c10::nullopt : alibi);
  const auto rows = packed ? set_packed(p, *packed, alibi, q) : PackedRows{};
  check_attention_kernels<Device>(q, p);
  const auto qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  auto out = kernel_output({p.B, p.H, p.rows_q, p.DV}, q.options(), packed, p.out_stride);
  auto stats = alloc({2, p.B, p.H, p.rows_q}, q.options().dtype(at::kFloat));
  if (packed) zero_outside(out, 2, rows.queries), zero_outside(stats, 3, rows.queries);
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr();
  set_strides(qc, p.q_stride), set_strides(kc, p.k_stride), set_strides(vc, p.v_stride);
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  raise_if<Device>(FUSED_ATTN_CUDA_NS::attention_fwd(p, Device::stream()), "attention_fwd");
  return {out, stats};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask, int64_t mask_kind,
                                                 int64_t causal, double scale, double dropout_p, int64_t seed,
                                                 int64_t window_left, int64_t window_right, double softcap,
                                                 const c10::optional<at::Tensor>& alibi) {
  return attention_fwd_impl<Device>(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right,
                                    softcap, alibi, nullptr);
}

// attention_bwd, or attention_packed_bwd with `packed` (as attention_fwd_impl).
template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& grad_lse, const c10::optional<at::Tensor>& mask,
    int64_t mask_kind, int64_t causal, double scale, double dropout_p, int64_t seed, bool mask_grad,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi,
    const Packing* packed) {
  Device::check(q);
  [[maybe_unused]] const auto guard = Device::guard(q);
  auto p = check_attention(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap,
                           packed ? c10::nullopt : alibi);
  check_attention_bwd(dout, out, stats, grad_lse, q, mask_kind, mask_grad, p);
  const auto rows = packed ? set_packed(p, *packed, alibi, q) : PackedRows{};
  check_attention_kernels<Device>(q, p);
  const auto qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v), dc = kernel_layout(dout);
  const auto oc = kernel_layout(out);
  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = kernel_output({p.B, p.H, p.rows_q, p.D}, q.options(), packed, p.dq_stride);
  auto dk = kernel_output({p.B, p.HK, p.rows_k, p.D}, q.options(), packed, p.dk_stride);
  auto dv = kernel_output({p.B, p.HK, p.rows_k, p.DV}, q.options(), packed, p.dv_stride);
  if (packed) zero_outside(dq, 2, rows.queries), zero_outside(dk, 2, rows.keys), zero_outside(dv, 2, rows.keys);
  auto dmask = mask_grad ? at::zeros({p.B, p.H, p.Lq, p.Lk}, f32) : at::empty({0}, f32);
  auto delta = at::empty({p.B * p.H * p.rows_q}, f32);
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr(), p.dout = dc.data_ptr();
  set_strides(qc, p.q_stride), set_strides(kc, p.k_stride), set_strides(vc, p.v_stride);
  set_strides(dc, p.do_stride), set_strides(oc, p.out_stride);
  p.out = const_cast<void*>(oc.data_ptr());
  p.stats = const_cast<float*>(stats.data_ptr<float>());
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  p.dlse = grad_lse ? grad_lse->data_ptr() : nullptr;
  if (p.Lq > 0 && p.Lk > 0) {
    raise_if<Device>(FUSED_ATTN_CUDA_NS::attention_bwd(p, delta.data_ptr<float>(), Device::stream()), "attention_bwd");
  } else {  // no query sees a key: every gradient is 0
    dq.zero_(), dk.zero_(), dv.zero_();
  }
  return {dq, dk, dv, mask_grad ? dmask.to(mask->scalar_type()) : dmask};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& grad_lse, const c10::optional<at::Tensor>& mask,
    int64_t mask_kind, int64_t causal, double scale, double dropout_p, int64_t seed, bool mask_grad,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi) {
  return attention_bwd_impl<Device>(dout, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p,
                                    seed, mask_grad, window_left, window_right, softcap, alibi, nullptr);
}

// Packed sequences (schema in schemas.h): q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv).
template <class Device>
std::tuple<at::Tensor, at::Tensor> attention_packed_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& seq_q, const at::Tensor& seq_k, double scale,
                                                        int64_t window_left, int64_t window_right, double softcap,
                                                        const c10::optional<at::Tensor>& alibi) {
  return packed_fwd(attention_fwd_impl<Device>, q, k, v, seq_q, seq_k, scale, window_left, window_right, softcap,
                    alibi);
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_packed_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& seq_q,
    const at::Tensor& seq_k, double scale, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi) {
  return packed_bwd(attention_bwd_impl<Device>, dout, q, k, v, out, stats, grad_lse, seq_q, seq_k, scale, window_left,
                    window_right, softcap, alibi);
}

template <class Device>
void check_feed_forward_kernels(const at::Tensor& x, const FeedForwardParams& p) {
  TORCH_CHECK_NOT_IMPLEMENTED(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "the ",
                              Device::kBackend, " feed-forward kernels take float16 or bfloat16, got ", describe(x),
                              "; float32 runs on the triton, cpu and torch backends");
  TORCH_CHECK_NOT_IMPLEMENTED(
      p.d_model % 8 == 0 && p.d_ff % 8 == 0, "the ", Device::kBackend,
      " feed-forward kernels need d_model and d_ff to be multiples of 8, got d_model=", p.d_model, ", d_ff=", p.d_ff);
}

// contiguous, in x's dtype and 16-byte aligned (cp.async reads 16-byte chunks)
inline at::Tensor feed_forward_layout(const at::Tensor& t, const at::Tensor& x) {
  auto c = t.to(x.scalar_type()).contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> feed_forward_fwd(
    const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& residual, int64_t activation,
    double dropout_p, int64_t seed, bool save_pre) {
  Device::check(x);
  [[maybe_unused]] const auto guard = Device::guard(x);
  auto p = check_feed_forward(x, w1, b1, w2, b2, residual, activation, dropout_p);
  check_feed_forward_kernels<Device>(x, p);
  p.seed = static_cast<uint64_t>(seed);
  const auto xc = feed_forward_layout(x, x), w1c = feed_forward_layout(w1, x), w2c = feed_forward_layout(w2, x);
  at::Tensor b1c, b2c, rc;
  if (b1) b1c = feed_forward_layout(*b1, x);
  if (b2) b2c = feed_forward_layout(*b2, x);
  if (residual) rc = feed_forward_layout(*residual, x);
  auto out = alloc({p.M, p.d_model}, x.options()), hidden = alloc({p.M, p.d_ff}, x.options());
  auto pre = save_pre ? alloc({p.M, p.d_ff}, x.options()) : at::empty({0}, x.options());
  p.x = xc.data_ptr(), p.w1 = w1c.data_ptr(), p.w2 = w2c.data_ptr();
  p.b1 = b1 ? b1c.data_ptr() : nullptr, p.b2 = b2 ? b2c.data_ptr() : nullptr;
  p.residual = residual ? rc.data_ptr() : nullptr;
  p.out = out.data_ptr(), p.pre = save_pre ? pre.data_ptr() : nullptr;
  if (p.M > 0)
    raise_if<Device>(FUSED_ATTN_CUDA_NS::feed_forward_fwd(p, hidden.data_ptr(), Device::stream()), "feed_forward_fwd");
  return {out, hidden, pre};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    const at::Tensor& hidden, int64_t activation, double dropout_p, int64_t seed, bool need_b1, bool need_b2) {
  Device::check(x);
  [[maybe_unused]] const auto guard = Device::guard(x);
  auto p = check_feed_forward(x, w1, c10::nullopt, w2, c10::nullopt, c10::nullopt, activation, dropout_p);
  check_feed_forward_kernels<Device>(x, p);
  p.seed = static_cast<uint64_t>(seed);
  check_matrix(dout, "grad_output", p.M, p.d_model, x);
  check_matrix(pre, "pre", p.M, p.d_ff, x);
  check_matrix(hidden, "hidden", p.M, p.d_ff, x);
  const auto dc = feed_forward_layout(dout, x), xc = feed_forward_layout(x, x), w1c = feed_forward_layout(w1, x),
             w2c = feed_forward_layout(w2, x);
  const auto prec = feed_forward_layout(pre, x), hc = feed_forward_layout(hidden, x);
  const auto f32 = x.options().dtype(at::kFloat);
  auto dx = alloc({p.M, p.d_model}, x.options());
  auto dw1 = alloc({p.d_ff, p.d_model}, x.options()), dw2 = alloc({p.d_model, p.d_ff}, x.options());
  auto db1 = need_b1 ? alloc({p.d_ff}, f32) : at::empty({0}, f32);
  auto db2 = need_b2 ? alloc({p.d_model}, f32) : at::empty({0}, f32);
  auto dh = at::empty({p.M, p.d_ff}, x.options());
  auto partial =
      at::empty({FUSED_ATTN_CUDA_NS::feed_forward_column_partial_chunks(p.M) * std::max(p.d_model, p.d_ff)}, f32);
  p.dout = dc.data_ptr(), p.x = xc.data_ptr(), p.w1 = w1c.data_ptr(), p.w2 = w2c.data_ptr();
  p.pre = const_cast<void*>(prec.data_ptr());
  p.dx = dx.data_ptr(), p.dw1 = dw1.data_ptr(), p.dw2 = dw2.data_ptr();
  p.db1 = need_b1 ? db1.data_ptr<float>() : nullptr, p.db2 = need_b2 ? db2.data_ptr<float>() : nullptr;
  if (p.M > 0) {
    raise_if<Device>(FUSED_ATTN_CUDA_NS::feed_forward_bwd(p, hc.data_ptr(), dh.data_ptr(), partial.data_ptr<float>(),
                                                          Device::stream()),
                     "feed_forward_bwd");
  } else {
    dw1.zero_(), dw2.zero_(), db1.zero_(), db2.zero_();
  }
  return {dx, dw1, db1, dw2, db2};
}

template <class Device>
at::Tensor instruction_probe(const at::Tensor& tiles) {
  Device::check(tiles);
  [[maybe_unused]] const auto guard = Device::guard(tiles);
  TORCH_CHECK_VALUE(tiles.scalar_type() == at::kShort && tiles.numel() == 512,
                    "tiles must be 512 int16 words (a float16 and a bfloat16 16x16 tile), got ", describe(tiles));
  const auto in = tiles.contiguous();
  auto out = at::zeros({FUSED_ATTN_CUDA_NS::probe_words()}, tiles.options().dtype(at::kInt));
  raise_if<Device>(FUSED_ATTN_CUDA_NS::instruction_probe(in.data_ptr(), out.data_ptr(), Device::stream()),
                   "instruction_probe");
  return out;
}

// Registers the kernel operators' implementations for one dispatch key.
template <class Device>
void register_kernels(torch::Library& m) {
  m.impl("instruction_probe", &instruction_probe<Device>);
  m.impl("layer_norm_fwd", &layer_norm_fwd<Device>);
  m.impl("layer_norm_bwd", &layer_norm_bwd<Device>);
  m.impl("attention_fwd", &attention_fwd<Device>);
  m.impl("attention_bwd", &attention_bwd<Device>);
  m.impl("attention_packed_fwd", &attention_packed_fwd<Device>);
  m.impl("attention_packed_bwd", &attention_packed_bwd<Device>);
  m.impl("feed_forward_fwd", &feed_forward_fwd<Device>);
  m.impl("feed_forward_bwd", &feed_forward_bwd<Device>);
}

}  // namespace fused_attn::gpu
