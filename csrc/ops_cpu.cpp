// The CPU implementations of the fused_attn_C operators (schemas: ops.cpp, schemas.h):
// argument checks (ops_common.h), output allocation, then the kernels of cpu/*.cpp.
#include <torch/extension.h>

#include "cpu/decode.h"
#include "ops_common.h"

namespace fused_attn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                              const c10::optional<at::Tensor>& residual,
                                                                              const c10::optional<at::Tensor>& weight,
                                                                              const c10::optional<at::Tensor>& bias,
                                                                              double eps, bool store_sum) {
  auto r = prepare_layer_norm_fwd(x, residual, weight, bias, eps, store_sum);
  if (r.params.rows > 0) cpu::layer_norm_fwd(r.params);
  return {r.y, r.sum, r.mean, r.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy,
                                                                  const c10::optional<at::Tensor>& dsum,
                                                                  const at::Tensor& x,
                                                                  const c10::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  bool weight_grad, bool bias_grad) {
  auto r = prepare_layer_norm_bwd(
      dy, dsum, x, weight, mean, rstd, weight_grad, bias_grad,
      [](int64_t rows, int64_t cols) { return cpu::layer_norm_bwd_partial_rows(rows, cols); },
      /*zero_partials=*/false);
  if (r.params.rows > 0) cpu::layer_norm_bwd(r.params);
  return {r.dx, r.dw, r.db};
}

// The CPU kernels' compute type: float64 for float64 inputs, float32 for the others.
at::ScalarType compute_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The compute type with a contiguous last dim and rows that do not overlap: the CPU kernels
// hand the row stride to the BLAS as the leading dimension, which must be at least the row
// length (an expanded or overlapping view is copied)
at::Tensor as_compute(const at::Tensor& t) {
  const auto ct = compute_type(t);
  at::Tensor f = t.scalar_type() == ct ? t : t.to(ct);
  const bool rows_ok = f.dim() < 2 || f.size(-2) <= 1 || f.stride(-2) >= std::max<int64_t>(1, f.size(-1));
  return f.stride(-1) == 1 && rows_ok ? f : f.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& mask, int64_t mask_kind,
                                                      int64_t causal, double scale, double dropout_p, int64_t seed,
                                                      int64_t window_left, int64_t window_right, double softcap,
                                                      const c10::optional<at::Tensor>& alibi, const Packing* packed) {
  auto p = check_attention(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap,
                           packed ? c10::nullopt : alibi);
  const auto rows = packed ? set_packed(p, *packed, alibi, q) : PackedRows{};
  const auto qf = as_compute(q), kf = as_compute(k), vf = as_compute(v);
  const auto ct = q.options().dtype(compute_type(q));
  auto out = kernel_output({p.B, p.H, p.rows_q, p.DV}, ct, packed, p.out_stride);
  auto stats = alloc({2, p.B, p.H, p.rows_q}, ct);
  if (packed) zero_outside(out, 2, rows.queries), zero_outside(stats, 3, rows.queries);
  p.q = qf.data_ptr(), p.k = kf.data_ptr(), p.v = vf.data_ptr();
  set_strides(qf, p.q_stride), set_strides(kf, p.k_stride), set_strides(vf, p.v_stride);
  p.out = out.data_ptr();
  p.stats = stats.data_ptr();
  if (out.numel() > 0) cpu::attention_fwd(p);
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& mask, int64_t mask_kind,
                                                     int64_t causal, double scale, double dropout_p, int64_t seed,
                                                     int64_t window_left, int64_t window_right, double softcap,
                                                     const c10::optional<at::Tensor>& alibi) {
  return attention_fwd_impl(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right,
                            softcap, alibi, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& grad_lse, const c10::optional<at::Tensor>& mask,
    int64_t mask_kind, int64_t causal, double scale, double dropout_p, int64_t seed, bool mask_grad,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi,
    const Packing* packed) {
  auto p = check_attention(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap,
                           packed ? c10::nullopt : alibi);
  check_attention_bwd(dout, out, stats, grad_lse, q, mask_kind, mask_grad, p);
  const auto rows = packed ? set_packed(p, *packed, alibi, q) : PackedRows{};
  const auto qf = as_compute(q), kf = as_compute(k), vf = as_compute(v), dof = as_compute(dout);
  const auto of = as_compute(out);
  set_strides(of, p.out_stride);
  const auto ct = q.options().dtype(compute_type(q));
  auto dq = kernel_output({p.B, p.H, p.rows_q, p.D}, ct, packed, p.dq_stride);
  auto dk = kernel_output({p.B, p.HK, p.rows_k, p.D}, ct, packed, p.dk_stride);
  auto dv = kernel_output({p.B, p.HK, p.rows_k, p.DV}, ct, packed, p.dv_stride);
  if (packed) zero_outside(dq, 2, rows.queries), zero_outside(dk, 2, rows.keys), zero_outside(dv, 2, rows.keys);
  auto dmask = mask_grad ? at::zeros({p.B, p.H, p.Lq, p.Lk}, ct) : at::empty({0}, ct);
  p.q = qf.data_ptr(), p.k = kf.data_ptr(), p.v = vf.data_ptr(), p.dout = dof.data_ptr();
  set_strides(qf, p.q_stride), set_strides(kf, p.k_stride), set_strides(vf, p.v_stride);
  set_strides(dof, p.do_stride);
  p.out = const_cast<void*>(of.data_ptr());
  p.stats = const_cast<void*>(stats.data_ptr());
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  p.dlse = grad_lse ? grad_lse->data_ptr() : nullptr;
  const int64_t chunks = cpu::attention_bwd_chunks(p);
  at::Tensor dk_part, dv_part;
  if (chunks > 1) {  // chunk copies of dk's and dv's layouts, each row written (or zeroed here)
    dk_part = at::empty({chunks, dk.numel()}, ct);
    dv_part = at::empty({chunks, dv.numel()}, ct);
    for (int64_t c = 0; c < chunks && packed; ++c) {
      zero_outside(dk_part[c].view({dk.size(2), dk.size(1), dk.size(3)}), 0, rows.keys);
      zero_outside(dv_part[c].view({dv.size(2), dv.size(1), dv.size(3)}), 0, rows.keys);
    }
  }
  if (p.Lq > 0 && p.Lk > 0) {
    cpu::attention_bwd(p, chunks > 1 ? dk_part.data_ptr() : nullptr, chunks > 1 ? dv_part.data_ptr() : nullptr);
  } else {
    dq.zero_(), dk.zero_(), dv.zero_();
  }
  const auto dt = q.scalar_type();
  auto cast = [dt](const at::Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt); };
  return {cast(dq), cast(dk), cast(dv), mask_grad ? dmask.to(mask->scalar_type()) : dmask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& grad_lse, const c10::optional<at::Tensor>& mask,
    int64_t mask_kind, int64_t causal, double scale, double dropout_p, int64_t seed, bool mask_grad,
    int64_t window_left, int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi) {
  return attention_bwd_impl(dout, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p, seed,
                            mask_grad, window_left, window_right, softcap, alibi, nullptr);
}

// Packed sequences (schema in schemas.h): q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv).
std::tuple<at::Tensor, at::Tensor> attention_packed_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& seq_q,
                                                            const at::Tensor& seq_k, double scale, int64_t window_left,
                                                            int64_t window_right, double softcap,
                                                            const c10::optional<at::Tensor>& alibi) {
  return packed_fwd(attention_fwd_impl, q, k, v, seq_q, seq_k, scale, window_left, window_right, softcap, alibi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_packed_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& seq_q,
    const at::Tensor& seq_k, double scale, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi) {
  return packed_bwd(attention_bwd_impl, dout, q, k, v, out, stats, grad_lse, seq_q, seq_k, scale, window_left,
                    window_right, softcap, alibi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feed_forward_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& residual, int64_t activation,
    double dropout_p, int64_t seed, bool save_pre) {
  auto p = check_feed_forward(x, w1, b1, w2, b2, residual, activation, dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  const auto ct = x.options().dtype(compute_type(x));
  auto f = [&ct](const at::Tensor& t) { return t.to(ct).contiguous(); };
  const auto xf = f(x), w1f = f(w1), w2f = f(w2);
  at::Tensor b1f, b2f, rf;
  if (b1) b1f = f(*b1);
  if (b2) b2f = f(*b2);
  if (residual) rf = f(*residual);
  auto out = alloc({p.M, p.d_model}, ct);
  auto pre = save_pre ? alloc({p.M, p.d_ff}, ct) : at::empty({0}, ct);
  p.x = xf.data_ptr(), p.w1 = w1f.data_ptr(), p.w2 = w2f.data_ptr();
  p.b1 = b1 ? b1f.data_ptr() : nullptr, p.b2 = b2 ? b2f.data_ptr() : nullptr;
  p.residual = residual ? rf.data_ptr() : nullptr;
  p.out = out.data_ptr(), p.pre = save_pre ? pre.data_ptr() : nullptr;
  if (p.M > 0) cpu::feed_forward_fwd(p);
  const auto dt = x.scalar_type();
  auto cast = [dt](const at::Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt); };
  // the hidden activation never exists whole here: backward recomputes it from pre
  return {cast(out), at::empty({0}, x.options()), save_pre ? cast(pre) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    const at::Tensor& hidden, int64_t activation, double dropout_p, int64_t seed, bool need_b1, bool need_b2) {
  auto p = check_feed_forward(x, w1, c10::nullopt, w2, c10::nullopt, c10::nullopt, activation, dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  check_matrix(dout, "grad_output", p.M, p.d_model, x);
  check_matrix(pre, "pre", p.M, p.d_ff, x);
  const auto ct = x.options().dtype(compute_type(x));
  auto f = [&ct](const at::Tensor& t) { return t.to(ct).contiguous(); };
  const auto dof = f(dout), xf = f(x), w1f = f(w1), w2f = f(w2), pref = f(pre);
  auto dx = alloc({p.M, p.d_model}, ct);
  auto dw1 = alloc({p.d_ff, p.d_model}, ct), dw2 = alloc({p.d_model, p.d_ff}, ct);
  // bias gradients in the compute type (float32 for 16-bit inputs)
  auto db1 = need_b1 ? alloc({p.d_ff}, ct) : at::empty({0}, ct);
  auto db2 = need_b2 ? alloc({p.d_model}, ct) : at::empty({0}, ct);
  p.dout = dof.data_ptr(), p.x = xf.data_ptr(), p.w1 = w1f.data_ptr(), p.w2 = w2f.data_ptr();
  p.pre = pref.data_ptr();
  p.dx = dx.data_ptr(), p.dw1 = dw1.data_ptr(), p.dw2 = dw2.data_ptr();
  p.db1 = need_b1 ? db1.data_ptr() : nullptr, p.db2 = need_b2 ? db2.data_ptr() : nullptr;
  if (p.M > 0) {
    cpu::feed_forward_bwd(p);
  } else {
    dw1.zero_(), dw2.zero_(), db1.zero_(), db2.zero_();
  }
  const auto dt = x.scalar_type();
  auto cast = [dt](const at::Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt); };
  return {cast(dx), cast(dw1), db1, cast(dw2), db2};
}

at::Tensor attention_dropout_mask(int64_t seed, int64_t B, int64_t H, int64_t Lq, int64_t Lk, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  const auto threshold = static_cast<uint32_t>(std::min(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  auto out = at::empty({B, H, Lq, Lk}, at::kBool);
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, B * H, 1, [&](int64_t a, int64_t z) {
    for (int64_t bh = a; bh < z; ++bh)
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t j = 0; j < Lk; ++j)
          o[(bh * Lq + i) * Lk + j] =
              philox_draw(static_cast<uint64_t>(seed) + bh, static_cast<uint32_t>(i * Lk + j)) >= threshold;
  });
  return out;
}

// Decode attention against a paged KV cache (cpu/decode.h); see the schema below.
std::tuple<at::Tensor, at::Tensor> attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const at::Tensor& seqlens,
                                                        const at::Tensor& block_table, double scale, bool causal,
                                                        int64_t window_left, int64_t window_right, double softcap,
                                                        int64_t splits, const c10::optional<at::Tensor>& alibi) {
  const auto dtype = to_dtype(q, "query");
  TORCH_CHECK_VALUE(q.dim() == 4, "query must be (B, Lq, Hq, D), got ", describe(q));
  TORCH_CHECK_VALUE(
      k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3),
      "k_cache and v_cache must be pages (P, page, Hk, D) and (P, page, Hk, Dv), got ", describe(k_cache), " and ",
      describe(v_cache));
  for (const auto* t : {&k_cache, &v_cache})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "the caches must have query's dtype (", q.scalar_type(),
                     "), got ", describe(*t));
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3), Hk = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache's head dim must be query's (", D, "), got ", describe(k_cache));
  TORCH_CHECK_VALUE(Hk >= 1 && Hq % Hk == 0, "query heads (", Hq, ") must be a multiple of the cache's heads (", Hk,
                    ")");
  TORCH_CHECK_VALUE(seqlens.dim() == 1 && seqlens.size(0) == B && seqlens.scalar_type() == at::kInt,
                    "cache_seqlens must be (", B, ",) int32, got ", describe(seqlens));
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == B && block_table.scalar_type() == at::kInt,
                    "block_table must be (", B, ", pages) int32, got ", describe(block_table));
  TORCH_CHECK_VALUE(splits >= 1, "splits must be >= 1, got ", splits);
  const auto qc = q.stride(3) == 1 ? q : q.contiguous();
  const auto kc = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const auto vc = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  const auto lens = seqlens.contiguous();
  const auto table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const int64_t P = k_cache.size(0), page = k_cache.size(1), max_pages = block_table.size(1);
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // a bad length or page number would read outside the pool
    TORCH_CHECK_VALUE(len_ptr[b] >= 0 && len_ptr[b] <= max_pages * page, "cache_seqlens[", b, "] = ", len_ptr[b],
                      " is outside [0, ", max_pages * page, "] (block_table holds ", max_pages, " pages of ", page,
                      " keys)");
    for (int64_t j = 0; j < (len_ptr[b] + page - 1) / page; ++j) {
      const int32_t pg = table.data_ptr<int32_t>()[b * table.stride(0) + j];
      TORCH_CHECK_VALUE(pg >= 0 && pg < P, "block_table[", b, ", ", j, "] = ", pg, " is not a page of the cache (", P,
                        " pages)");
    }
  }
  const int64_t DV = v_cache.size(3), G = Hq / Hk;
  const auto ct = q.options().dtype(compute_type(q));
  auto out = alloc({B, Lq, Hq, DV}, q.options());
  auto lse = alloc({B, Hq, Lq}, ct);
  auto part_out = at::empty({B, Hk, splits, G * Lq, DV}, ct);
  auto part_lse = at::empty({B, Hk, splits, G * Lq}, ct);
  cpu::DecodeParams p{};
  p.dtype = dtype;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.seqlens = len_ptr;
  p.table = table.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.part_out = part_out.data_ptr();
  p.part_lse = part_lse.data_ptr();
  p.B = B, p.Lq = Lq, p.Hq = Hq, p.Hk = Hk, p.D = D, p.DV = DV, p.page = page, p.max_pages = max_pages;
  p.splits = splits;
  p.q_sb = qc.stride(0), p.q_si = qc.stride(1), p.q_sh = qc.stride(2);
  p.k_sp = kc.stride(0), p.k_ss = kc.stride(1), p.k_sh = kc.stride(2);
  p.v_sp = vc.stride(0), p.v_ss = vc.stride(1), p.v_sh = vc.stride(2);
  p.table_sb = table.stride(0);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.window_left = window_left, p.window_right = window_right;
  if (alibi.has_value()) std::tie(p.alibi, p.alibi_stride) = check_alibi(*alibi, B, Hq, q);
  if (out.numel() > 0) cpu::attention_decode(p);
  return {out, lse};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &fused_attn::layer_norm_bwd_cpu);
  m.impl("attention_fwd", &fused_attn::attention_fwd_cpu);
  m.impl("attention_bwd", &fused_attn::attention_bwd_cpu);
  m.impl("attention_packed_fwd", &fused_attn::attention_packed_fwd_cpu);
  m.impl("attention_packed_bwd", &fused_attn::attention_packed_bwd_cpu);
  m.impl("attention_decode", &fused_attn::attention_decode_cpu);
  m.impl("feed_forward_fwd", &fused_attn::feed_forward_fwd_cpu);
  m.impl("feed_forward_bwd", &fused_attn::feed_forward_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fused_attn_C, CompositeExplicitAutograd, m) {
  m.impl("attention_dropout_mask", &fused_attn::attention_dropout_mask);
}
