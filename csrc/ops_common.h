// Torch-facing helpers shared by ops_cpu.cpp (CPU) and ops_cuda.cpp (CUDA): argument checks
// with the messages of fused_attn/_checks.py, allocation, and filling the kernel params.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernel_params.h"

namespace fused_attn {

// When set, outputs are NaN-filled before the kernels run, so an element a kernel
// forgets to write shows up in the tests.
bool& poison_outputs();

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

inline at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  if (poison_outputs() && at::isFloatingType(opts.dtype().toScalarType())) t.fill_(NAN);
  return t;
}

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;  // the CPU kernels; the CUDA launchers reject it
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(
          false, name, " must be float32, float16, bfloat16 or (CPU) float64 for the fused kernels, got ", describe(t));
  }
  return DType::F32;
}

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ",
                    cols, "), got ", describe(t));
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the same device as input (", like.device(),
                    "), got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have the same dtype as input (",
                   like.scalar_type(), "), got ", describe(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

inline void check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t cols, const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == cols, name, " must have shape (", cols, ",), got ", describe(*t));
  TORCH_CHECK_VALUE(t->device() == like.device(), name, " must be on the same device as input (", like.device(),
                    "), got ", describe(*t));
  // float32 parameters with 16-bit inputs (mixed precision); float64 inputs take float64 only, as in torch
  TORCH_CHECK_TYPE(
      t->scalar_type() == like.scalar_type() || (t->scalar_type() == at::kFloat && like.scalar_type() != at::kDouble),
      name, " must have input's dtype (", like.scalar_type(), ")",
      like.scalar_type() == at::kDouble ? "" : " or float32", ", got ", describe(*t));
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
}

// The dtype of the kernels' statistics and parameter-gradient sums: float32, or float64
// for float64 inputs (CPU).
inline at::ScalarType stats_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

struct LayerNormFwdResult {
  at::Tensor y, sum, mean, rstd;
  LayerNormFwdParams params;
};

// Checks the arguments of fused_attn_C::layer_norm_fwd, allocates its outputs and fills the params.
inline LayerNormFwdResult prepare_layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                 const c10::optional<at::Tensor>& weight,
                                                 const c10::optional<at::Tensor>& bias, double eps, bool store_sum) {
  TORCH_CHECK_VALUE(x.dim() == 2, "input must be a (rows, cols) matrix, got ", describe(x));
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK_VALUE(cols >= 1, "input must have at least one column, got ", describe(x));
  check_matrix(x, "input", rows, cols, x);
  if (residual.has_value()) check_matrix(*residual, "residual", rows, cols, x);
  check_vector(weight, "weight", cols, x);
  check_vector(bias, "bias", cols, x);
  TORCH_CHECK_VALUE(!(weight.has_value() && bias.has_value()) || weight->scalar_type() == bias->scalar_type(),
                    "weight and bias must have the same dtype, got ", describe(*weight), " and ", describe(*bias));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
  LayerNormFwdResult r;
  r.y = alloc({rows, cols}, x.options());
  r.sum = (store_sum && residual.has_value()) ? alloc({rows, cols}, x.options()) : at::empty({0}, x.options());
  r.mean = alloc({rows}, x.options().dtype(stats_type(x)));
  r.rstd = alloc({rows}, x.options().dtype(stats_type(x)));
  auto& p = r.params;
  p.x = x.data_ptr();
  p.residual = ptr_or_null(residual);
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = r.y.data_ptr();
  p.sum_out = r.sum.numel() ? r.sum.data_ptr() : nullptr;
  p.mean = r.mean.data_ptr();
  p.rstd = r.rstd.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.dtype = to_dtype(x, "input");
  p.wdtype = weight.has_value() ? to_dtype(*weight, "weight") : bias.has_value() ? to_dtype(*bias, "bias") : p.dtype;
  return r;
}

struct LayerNormBwdResult {
  at::Tensor dx, dw, db, dw_partial, db_partial;
  LayerNormBwdParams params;
};

// Checks the arguments of fused_attn_C::layer_norm_bwd and allocates its outputs;
// partial_rows(rows, cols) says how many rows of fp32 partial dW/dB sums the kernel wants,
// zero_partials whether it accumulates into them from zero (else it initialises them).
template <typename PartialRows>
LayerNormBwdResult prepare_layer_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dsum,
                                          const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& mean, const at::Tensor& rstd, bool weight_grad,
                                          bool bias_grad, PartialRows partial_rows, bool zero_partials) {
  TORCH_CHECK_VALUE(x.dim() == 2, "input must be a (rows, cols) matrix, got ", describe(x));
  const int64_t rows = x.size(0), cols = x.size(1);
  check_matrix(x, "input", rows, cols, x);
  check_matrix(dy, "grad_output", rows, cols, x);
  if (dsum.has_value()) check_matrix(*dsum, "grad_sum", rows, cols, x);
  check_vector(weight, "weight", cols, x);
  for (auto* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == stats_type(x) && t->is_contiguous() &&
                          t->device() == x.device(),
                      "mean and rstd must be contiguous ", stats_type(x), " (", rows, ",) tensors on ", x.device(),
                      ", got ", describe(*t));
  }
  LayerNormBwdResult r;
  r.dx = alloc({rows, cols}, x.options());
  const auto sums = x.options().dtype(stats_type(x));
  const bool any_param_grad = (weight_grad || bias_grad) && rows > 0;
  const int64_t prow = any_param_grad ? partial_rows(rows, cols) : 0;
  r.dw = weight_grad ? alloc({cols}, sums) : at::empty({0}, sums);
  r.db = bias_grad ? alloc({cols}, sums) : at::empty({0}, sums);
  auto partial = [&](bool wanted) {
    if (!wanted || !prow) return at::empty({0}, sums);
    return zero_partials ? at::zeros({prow, cols}, sums) : alloc({prow, cols}, sums);
  };
  r.dw_partial = partial(weight_grad);
  r.db_partial = partial(bias_grad);
  if (rows == 0) {  // no rows: the parameter gradients are sums over nothing
    if (weight_grad) r.dw.zero_();
    if (bias_grad) r.db.zero_();
  }
  auto& p = r.params;
  p.dy = dy.data_ptr();
  p.dsum = ptr_or_null(dsum);
  p.x = x.data_ptr();
  p.weight = ptr_or_null(weight);
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.dx = r.dx.data_ptr();
  p.dw_partial = r.dw_partial.numel() ? r.dw_partial.data_ptr() : nullptr;
  p.db_partial = r.db_partial.numel() ? r.db_partial.data_ptr() : nullptr;
  p.dw = r.dw.numel() ? r.dw.data_ptr() : nullptr;
  p.db = r.db.numel() ? r.db.data_ptr() : nullptr;
  p.rows = rows;
  p.cols = cols;
  p.partial_rows = prow;
  p.dtype = to_dtype(x, "input");
  p.wdtype = weight.has_value() ? to_dtype(*weight, "weight") : p.dtype;
  return r;
}

}  // namespace fused_attn

namespace fused_attn {

// ALiBi slopes as the kernels take them: a (B, H) float32 view with unit head stride on query's
// device -> (data, batch stride).
inline std::pair<const float*, int64_t> check_alibi(const at::Tensor& a, int64_t B, int64_t H, const at::Tensor& q) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == B && a.size(1) == H && a.stride(1) == 1, "alibi must be a (B, H) = (",
                    B, ", ", H, ") view with unit head stride, got ", describe(a));
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi must be float32, got ", describe(a));
  TORCH_CHECK_VALUE(a.device() == q.device(), "alibi must be on the same device as query (", q.device(), "), got ",
                    describe(a));
  return {a.data_ptr<float>(), a.stride(0)};
}

// Checks the arguments of fused_attn_C::attention_fwd/bwd (the messages of _checks.py)
// and fills everything of AttentionParams but the data pointers of dtype-converted copies.
inline AttentionParams check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const c10::optional<at::Tensor>& mask, int64_t mask_kind, int64_t causal,
                                       double scale, double dropout_p, int64_t seed, int64_t window_left = -1,
                                       int64_t window_right = -1, double softcap = 0.0,
                                       const c10::optional<at::Tensor>& alibi = c10::nullopt) {
  for (auto [t, name] : {std::pair{&q, "query"}, std::pair{&k, "key"}, std::pair{&v, "value"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, name, " must be a (B, H, L, D) tensor, got ", describe(*t));
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " must be on the same device as query (", q.device(), "), got ",
                      describe(*t));
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have the same dtype as query (", q.scalar_type(),
                     "), got ", describe(*t));
  }
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t HK = k.size(1), Lk = k.size(2), DV = v.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B, "query, key and value must have the same batch size, got ",
                    describe(q), ", ", describe(k), ", ", describe(v));
  TORCH_CHECK_VALUE(k.size(3) == D, "key's head dim must equal query's (", D, "), got key ", describe(k));
  TORCH_CHECK_VALUE(v.size(1) == HK && v.size(2) == Lk, "value must have key's heads and length, got value ",
                    describe(v), " and key ", describe(k));
  TORCH_CHECK_VALUE(HK >= 1 && H % HK == 0, "query's heads (", H, ") must be a multiple of key/value's (", HK, ")");
  TORCH_CHECK_VALUE(causal >= 0 && causal <= 2, "causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ",
                    causal);
  TORCH_CHECK_VALUE(mask_kind >= 0 && mask_kind <= 2, "mask_kind must be 0 (none), 1 (bool) or 2 (float), got ",
                    mask_kind);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "window_size must be (left, right), each >= 0 or -1, got (", window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0, got ", softcap);
  AttentionParams p{};
  p.rows_q = Lq, p.rows_k = Lk;
  p.softcap = softcap;
  p.windowed = window_left >= 0 || window_right >= 0;
  p.window_left = window_left, p.window_right = window_right;
  if (alibi.has_value()) std::tie(p.alibi, p.alibi_stride) = check_alibi(*alibi, B, H, q);
  if (mask_kind != kMaskNone) {
    TORCH_CHECK_VALUE(mask.has_value(), "mask_kind ", mask_kind, " needs a mask tensor");
    const auto& m = *mask;
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == B && m.size(1) == H && m.size(2) == Lq && m.size(3) == Lk,
                      "attn_mask must be a (B, H, Lq, Lk) = (", B, ", ", H, ", ", Lq, ", ", Lk,
                      ") view (broadcast dims with stride 0), got ", describe(m));
    TORCH_CHECK_VALUE(m.device() == q.device(), "attn_mask must be on the same device as query (", q.device(),
                      "), got ", describe(m));
    if (mask_kind == kMaskBool) {
      TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "a bool mask (mask_kind 1) must be bool, got ", describe(m));
    } else {
      TORCH_CHECK_TYPE(m.scalar_type() == q.scalar_type(), "attn_mask must be bool or have query's dtype (",
                       q.scalar_type(), "), got ", describe(m));
      p.mask_dtype = to_dtype(m, "attn_mask");
    }
    p.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = m.stride(i);
  }
  p.mask_kind = static_cast<int32_t>(mask_kind);
  p.causal = static_cast<int32_t>(causal);
  p.dtype = to_dtype(q, "query");
  p.B = B, p.H = H, p.HK = HK, p.Lq = Lq, p.Lk = Lk, p.D = D, p.DV = DV;
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.threshold = dropout_threshold(dropout_p);
  return p;
}

// The arguments attention_bwd adds to the forward's (every implementation checks them here):
// grad_output and out (B, H, Lq, DV); stats the contiguous (2, B, H, Lq) tensor attention_fwd
// returned (stats_type(q), on q's device); mask_grad only with a float mask; grad_lse None or a
// contiguous (B, H, Lq) tensor of the statistics' dtype and device.
inline void check_attention_bwd(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& stats,
                                const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, int64_t mask_kind,
                                bool mask_grad, const AttentionParams& p) {
  TORCH_CHECK_VALUE(dout.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == p.B && out.size(1) == p.H &&
                        out.size(2) == p.Lq && out.size(3) == p.DV,
                    "grad_output and out must be (B, H, Lq, DV) = (", p.B, ", ", p.H, ", ", p.Lq, ", ", p.DV, "), got ",
                    describe(dout), " and ", describe(out));
  TORCH_CHECK_VALUE(stats.dim() == 4 && stats.size(0) == 2 && stats.scalar_type() == stats_type(q) &&
                        stats.is_contiguous() && stats.device() == q.device(),
                    "stats must be the contiguous ", stats_type(q),
                    " (2, B, H, Lq) tensor attention_fwd returned, got ", describe(stats));
  TORCH_CHECK_VALUE(!mask_grad || mask_kind == kMaskFloat, "mask_grad needs a float mask (mask_kind 2)");
  if (!grad_lse) return;
  const auto& g = *grad_lse;
  TORCH_CHECK_VALUE(g.dim() == 3 && g.size(0) == p.B && g.size(1) == p.H && g.size(2) == p.Lq && g.is_contiguous() &&
                        g.scalar_type() == stats.scalar_type() && g.device() == stats.device(),
                    "grad_lse must be a contiguous (B, H, Lq) = (", p.B, ", ", p.H, ", ", p.Lq,
                    ") tensor of stats' dtype ", stats.scalar_type(), " on ", stats.device(), ", got ", describe(g));
}

inline void set_strides(const at::Tensor& t, int64_t* s) { s[0] = t.stride(0), s[1] = t.stride(1), s[2] = t.stride(2); }

// Packed sequences (the attention_packed_* operators): seq_q (N + 1,) query offsets and seq_k
// (N, 2) key (start, count), int32 on query's device.
struct Packing {
  const at::Tensor& seq_q;
  const at::Tensor& seq_k;
};

// The packed operators' q, k, v (and out, grad_output) are (T, H, D).
inline void check_packed_rows(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (auto [t, name] : tensors)
    TORCH_CHECK_VALUE(t->dim() == 3, name, " must be packed (T, H, D), got ", describe(*t));
}

// Row ranges [begin, end) the kernels write: the queries, and the keys of each sequence with
// queries.
struct PackedRows {
  std::vector<std::pair<int64_t, int64_t>> queries, keys;
};

// Checks the packing against the packed lengths Tq = p.rows_q and Tk = p.rows_k (the offsets
// read on the host: a copy from a GPU) and sets p's packed fields: the offsets, Lq and Lk the
// longest sequence's (of those with queries), ALiBi with a row per sequence (N, H).
inline PackedRows set_packed(AttentionParams& p, const Packing& pk, const c10::optional<at::Tensor>& alibi,
                             const at::Tensor& q) {
  const auto& sq = pk.seq_q;
  const auto& sk = pk.seq_k;
  TORCH_CHECK_VALUE(sq.dim() == 1 && sq.size(0) >= 1 && sq.scalar_type() == at::kInt && sq.is_contiguous() &&
                        sq.device() == q.device(),
                    "seq_q must be a contiguous (N + 1,) int32 tensor on query's device (", q.device(), "), got ",
                    describe(sq));
  const int64_t N = sq.size(0) - 1;
  TORCH_CHECK_VALUE(sk.dim() == 2 && sk.size(0) == N && sk.size(1) == 2 && sk.scalar_type() == at::kInt &&
                        sk.is_contiguous() && sk.device() == q.device(),
                    "seq_k must be a contiguous (N, 2) = (", N,
                    ", 2) int32 tensor of (start, count) on query's device (", q.device(), "), got ", describe(sk));
  const at::Tensor host_q = sq.cpu(), host_k = sk.cpu();
  const int32_t* q_off = host_q.data_ptr<int32_t>();
  const int32_t* k_run = host_k.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(q_off[0] >= 0 && q_off[N] <= p.rows_q, "seq_q must lie in [0, ", p.rows_q, "], got ", q_off[0],
                    " .. ", q_off[N]);
  PackedRows rows{{{q_off[0], q_off[N]}}, {}};
  int64_t key_end = 0, max_q = 0, max_k = 0;
  for (int64_t s = 0; s < N; ++s) {  // a sequence outside the tensors, or two writing the same dK rows, is an error
    TORCH_CHECK_VALUE(q_off[s] <= q_off[s + 1], "seq_q must not decrease, got seq_q[", s, "] = ", q_off[s], " > seq_q[",
                      s + 1, "] = ", q_off[s + 1]);
    const int64_t start = k_run[2 * s], count = k_run[2 * s + 1];
    TORCH_CHECK_VALUE(start >= key_end && count >= 0 && start + count <= p.rows_k, "seq_k[", s, "] = (", start, ", ",
                      count, ") must be a run of keys in [", key_end, ", ", p.rows_k,
                      "] (runs in order, never overlapping)");
    key_end = start + count;
    if (q_off[s + 1] > q_off[s]) {
      rows.keys.emplace_back(start, key_end);  // keys no query reads get dK = 0
      max_q = std::max<int64_t>(max_q, q_off[s + 1] - q_off[s]), max_k = std::max(max_k, count);
    }
  }
  if (alibi.has_value()) std::tie(p.alibi, p.alibi_stride) = check_alibi(*alibi, N, p.H, q);
  p.seq_q = sq.data_ptr<int32_t>(), p.seq_k = sk.data_ptr<int32_t>(), p.n_seq = N;
  p.Lq = max_q, p.Lk = max_k;
  return rows;
}

// Zeroes t's rows (along dim) outside the sorted, disjoint ranges: rows of no packed sequence,
// which the kernels never write.
inline void zero_outside(const at::Tensor& t, int64_t dim, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  int64_t pos = 0;
  for (auto [begin, end] : ranges) {
    if (begin > pos) t.narrow(dim, pos, begin - pos).zero_();
    pos = std::max(pos, end);
  }
  if (t.size(dim) > pos) t.narrow(dim, pos, t.size(dim) - pos).zero_();
}

// (T, H, D) packed rows <-> the (1, H, T, D) view the kernels take.
inline at::Tensor as_batch_of_one(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }
// (contiguous already for the kernels' own outputs: no copy)
inline at::Tensor as_packed_rows(const at::Tensor& t) { return t[0].transpose(0, 1).contiguous(); }

// attention_packed_fwd / attention_packed_bwd (schemas.h) through a backend's attention_fwd_impl /
// attention_bwd_impl, which take the (1, H, T, D) views of the packed rows and the Packing.
template <typename FwdImpl>
std::tuple<at::Tensor, at::Tensor> packed_fwd(FwdImpl&& impl, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& seq_q, const at::Tensor& seq_k,
                                              double scale, int64_t window_left, int64_t window_right, double softcap,
                                              const c10::optional<at::Tensor>& alibi) {
  check_packed_rows({{&q, "query"}, {&k, "key"}, {&v, "value"}});
  const Packing packing{seq_q, seq_k};
  auto [out, stats] = impl(as_batch_of_one(q), as_batch_of_one(k), as_batch_of_one(v), c10::nullopt, kMaskNone,
                           kCausalNone, scale, 0.0, 0, window_left, window_right, softcap, alibi, &packing);
  return {as_packed_rows(out), stats};
}

template <typename BwdImpl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_bwd(BwdImpl&& impl, const at::Tensor& dout, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& out, const at::Tensor& stats,
                                                          const c10::optional<at::Tensor>& grad_lse,
                                                          const at::Tensor& seq_q, const at::Tensor& seq_k,
                                                          double scale, int64_t window_left, int64_t window_right,
                                                          double softcap, const c10::optional<at::Tensor>& alibi) {
  check_packed_rows({{&q, "query"}, {&k, "key"}, {&v, "value"}, {&dout, "grad_output"}, {&out, "out"}});
  const Packing packing{seq_q, seq_k};
  auto [dq, dk, dv, unused] = impl(as_batch_of_one(dout), as_batch_of_one(q), as_batch_of_one(k), as_batch_of_one(v),
                                   as_batch_of_one(out), stats, grad_lse, c10::nullopt, kMaskNone, kCausalNone, scale,
                                   0.0, 0, false, window_left, window_right, softcap, alibi, &packing);
  return {as_packed_rows(dq), as_packed_rows(dk), as_packed_rows(dv)};
}

// A kernel output (B, H, L, D): contiguous, or for packed sequences the (1, H, T, D) view of
// contiguous (T, H, D) rows; its (batch, head, row) strides go to `strides`.
inline at::Tensor kernel_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool packed, int64_t* strides) {
  auto t = packed ? as_batch_of_one(alloc({sizes[2], sizes[1], sizes[3]}, opts)) : alloc(sizes, opts);
  set_strides(t, strides);
  return t;
}

}  // namespace fused_attn

namespace fused_attn {

// Checks the arguments of fused_attn_C::feed_forward_fwd (the messages of _checks.py) and fills the sizes.
inline FeedForwardParams check_feed_forward(const at::Tensor& x, const at::Tensor& w1,
                                            const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                            const c10::optional<at::Tensor>& b2,
                                            const c10::optional<at::Tensor>& residual, int64_t activation,
                                            double dropout_p) {
  TORCH_CHECK_VALUE(x.dim() == 2, "input must be a (tokens, d_model) matrix, got ", describe(x));
  const int64_t M = x.size(0), dm = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == dm, "w1 must have shape (d_ff, d_model) with d_model = ", dm,
                    ", got ", describe(w1));
  const int64_t dff = w1.size(0);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == dm && w2.size(1) == dff, "w2 must have shape (d_model, d_ff) = (",
                    dm, ", ", dff, "), got ", describe(w2));
  for (auto [t, name, n] : {std::tuple{&b1, "b1", dff}, std::tuple{&b2, "b2", dm}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == n, name, " must have shape (", n, ",), got ", describe(**t));
  }
  if (residual.has_value()) check_matrix(*residual, "residual", M, dm, x);
  for (const at::Tensor* t : {&w1, &w2}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "weights must have the same dtype as input (",
                     x.scalar_type(), "), got ", describe(*t));
    TORCH_CHECK_VALUE(t->device() == x.device(), "weights must be on input's device (", x.device(), "), got ",
                      describe(*t));
  }
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 3,
                    "activation must be 0 (relu), 1 (gelu), 2 (gelu_tanh) or 3 (silu), got ", activation);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  FeedForwardParams p{};
  p.M = M, p.d_model = dm, p.d_ff = dff;
  p.activation = static_cast<int32_t>(activation);
  p.dropout_p = static_cast<float>(dropout_p);
  p.threshold = dropout_threshold(dropout_p);
  p.dtype = to_dtype(x, "input");
  return p;
}

}  // namespace fused_attn
