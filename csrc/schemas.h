// The schemas of the kernel operators, defined by every library that implements them:
// fused_attn_C (ops.cpp; the CPU and CUDA kernels registered by ops_cpu.cpp and ops_cuda.cpp)
// and fused_attn_emu (the emulated CUDA kernels, ops_emu.cpp).
#pragma once
#include <torch/library.h>

namespace fused_attn {

inline void define_kernel_schemas(torch::Library& m) {
  // x, residual: (rows, cols); weight, bias: (cols,). Returns y, x + residual (empty unless
  // store_sum and a residual), mean and rstd (rows,) in float32.
  m.def(
      "layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool store_sum) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Returns dx (rows, cols) and float32 dweight, dbias (cols,) (empty when not asked for).
  m.def(
      "layer_norm_bwd(Tensor grad_output, Tensor? grad_sum, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, "
      "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), mask a (B, Hq, Lq, Lk) view or None;
  // mask_kind 0 none / 1 bool / 2 float; causal 0 none / 1 upper-left / 2 lower-right.
  // Returns out (B, Hq, Lq, Dv) and stats (2, B, Hq, Lq) float32 for backward.
  // window_left/right: the sliding window (-1 unbounded); softcap > 0: c * tanh(s / c); alibi: None or (B, Hq)
  // float32 ALiBi slopes (a view; batch stride 0 when shared), -slope * |i + Lk - Lq - j| added to the scores.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, int mask_kind, int causal, float scale, "
      "float dropout_p, int seed, int window_left=-1, int window_right=-1, float softcap=0., Tensor? alibi=None) -> "
      "(Tensor, Tensor)");
  // grad_lse: None or (B, Hq, Lq) in the stats' dtype, the gradient of each row's log-sum-exp.
  // Returns dq, dk, dv and, with mask_grad, dS (B, Hq, Lq, Lk) (the float mask's gradient) else empty.
  m.def(
      "attention_bwd(Tensor grad_output, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor? grad_lse, "
      "Tensor? mask, "
      "int mask_kind, int causal, float scale, float dropout_p, int seed, bool mask_grad, int window_left=-1, "
      "int window_right=-1, float softcap=0., Tensor? alibi=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Packed sequences (CPU and CUDA; Triton has its own, ops/varlen.py): q (Tq, Hq, D),
  // k (Tk, Hk, D), v (Tk, Hk, Dv); sequence s has queries seq_q[s] .. seq_q[s + 1] and keys seq_k[s] = (start,
  // count), attends within itself (window and ALiBi aligned at its own lengths; alibi (N, Hq)).
  // Returns out (Tq, Hq, Dv) and stats (2, 1, Hq, Tq) (rows of no sequence: 0); the backward
  // returns dq, dk, dv in the packed layouts (0 where no sequence reads). grad_lse: None or
  // (1, Hq, Tq).
  m.def(
      "attention_packed_fwd(Tensor q, Tensor k, Tensor v, Tensor seq_q, Tensor seq_k, float scale, int window_left, "
      "int window_right, float softcap, Tensor? alibi) -> (Tensor, Tensor)");
  m.def(
      "attention_packed_bwd(Tensor grad_output, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, "
      "Tensor? grad_lse, Tensor seq_q, Tensor seq_k, float scale, int window_left, int window_right, float softcap, "
      "Tensor? alibi) -> (Tensor, Tensor, Tensor)");
  // x (M, d_model), w1 (d_ff, d_model), w2 (d_model, d_ff); activation 0 relu / 1 gelu /
  // 2 gelu_tanh / 3 silu. Returns out (M, d_model), an empty tensor where the GPU kernels
  // return hidden = dropout(act(pre)) (this one keeps it in per-block scratch), and
  // pre = x W1^T + b1 (M, d_ff) when save_pre, else empty.
  m.def(
      "feed_forward_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, int activation, "
      "float dropout_p, int seed, bool save_pre) -> (Tensor, Tensor, Tensor)");
  // hidden is ignored (recomputed from pre). Returns dx, dw1, db1 (float32, empty unless
  // need_b1), dw2, db2 (float32, empty unless need_b2).
  m.def(
      "feed_forward_bwd(Tensor grad_output, Tensor x, Tensor w1, Tensor w2, Tensor pre, Tensor hidden, int activation, "
      "float dropout_p, int seed, bool need_b1, bool need_b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The instruction probe (cuda/probe.cu): a float16 and a bfloat16 16x16 tile as 512
  // int16 words -> every register the probe's warp read, as int32 words.
  m.def("instruction_probe(Tensor tiles) -> Tensor");
}

}  // namespace fused_attn
