// Decode attention on the CPU: a few new queries per sequence against a (paged) KV cache.
// CPU-only parameters (the GPU decode kernel is the Triton one), so they live here and not in
// kernel_params.h.
#pragma once
#include <cstdint>

#include "../kernel_params.h"

namespace fused_attn::cpu {

struct DecodeParams {
  DType dtype;             // of q, the caches and out
  const void* q;           // (B, Lq, Hq, D), unit stride on D
  const void* k;           // pages (P, page, Hk, D), unit stride on D
  const void* v;           // pages (P, page, Hk, DV), unit stride on DV
  const int32_t* seqlens;  // (B,) keys cached per sequence (the new ones included)
  const int32_t* table;    // (B, max_pages) page of each sequence's j // page-th key block
  void* out;               // (B, Lq, Hq, DV) contiguous
  void* lse;               // (B, Hq, Lq) contiguous, compute type (natural log, -inf: no key)
  void* part_out;          // (B, Hk, splits, G * Lq, DV) compute type, scratch
  void* part_lse;          // (B, Hk, splits, G * Lq) compute type, scratch
  int64_t B, Lq, Hq, Hk, D, DV, page, max_pages, splits;
  int64_t q_sb, q_si, q_sh;  // q strides (batch, query, head)
  int64_t k_sp, k_ss, k_sh;  // k strides (page, slot, head)
  int64_t v_sp, v_ss, v_sh;
  int64_t table_sb;  // block table row stride
  float scale;
  float softcap;                      // > 0: c * tanh(s / c)
  bool causal;                        // query i of Lq sits at position seqlen - Lq + i and sees keys <= it
  int64_t window_left, window_right;  // bottom-right aligned like causal; -1 unbounded
  const float* alibi;                 // nullptr, or (B, Hq) slopes: -slope * |position - j| after the softcap
  int64_t alibi_stride;               // batch stride of alibi (0: shared)
};

// Fills out and lse. Tasks are (sequence, split of its keys), each for every kv head and the
// query heads of its GQA group; splits merge by their log-sum-exp. The result depends on
// `splits`, never on the thread count.
void attention_decode(const DecodeParams& p);

}  // namespace fused_attn::cpu
