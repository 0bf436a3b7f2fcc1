// Plain parameter structs shared by the torch-facing wrappers (ops_cpu.cpp, ops_cuda.cpp)
// and the kernels (cpu/*.cpp, cuda/*.cu). No torch headers here: the .cu files include
// this and nothing of torch, which keeps nvcc builds fast and free of the toolkit's
// library headers.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <type_traits>

// The namespace of the CUDA kernels' launch functions: `cuda` in the nvcc build, `cuda_emu`
// when the same sources are compiled for the warp emulator (FUSED_ATTN_EMU, csrc/emu).
#ifdef FUSED_ATTN_EMU
#define FUSED_ATTN_CUDA_NS cuda_emu
#else
#define FUSED_ATTN_CUDA_NS cuda
#endif

// Functions both the CPU and the CUDA kernels call.
#if defined(__CUDACC__)
#define FUSED_ATTN_HD __host__ __device__ __forceinline__
#else
#define FUSED_ATTN_HD inline
#endif

namespace fused_attn {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };  // F64: the CPU kernels only

inline int dtype_size(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

// The codes of the params' int32 fields (Python: fused_attn/codes.py)
enum MaskKind : int32_t { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };  // float: added to the scores
enum CausalKind : int32_t { kCausalNone = 0, kCausalUpperLeft = 1, kCausalLowerRight = 2 };
enum Activation : int32_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };  // kGelu: erf form

// GELU: 0.5 h (1 + erf(h sqrt(1/2))), tanh form 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluTanhCubic = 0.044715;
// the float32 kernels' copies: a double in a float expression would promote it
constexpr float kSqrtHalfF = static_cast<float>(kSqrtHalf);
constexpr float kInvSqrt2PiF = static_cast<float>(kInvSqrt2Pi);
constexpr float kSqrt2OverPiF = static_cast<float>(kSqrt2OverPi);
constexpr float kGeluTanhCubicF = static_cast<float>(kGeluTanhCubic);

// Dropout keeps an element iff its 32-bit Philox draw >= floor(p * 2^32) (capped at
// 2^32 - 1), in every backend (Triton: fused_attn/triton/_common.py's dropout_args).
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
}

// LayerNorm over the last dimension of a row-major (rows, cols) matrix.
struct LayerNormFwdParams {
  const void* x;         // (rows, cols) dtype
  const void* residual;  // (rows, cols) dtype, or nullptr
  const void* weight;    // (cols,) wdtype, or nullptr
  const void* bias;      // (cols,) wdtype, or nullptr
  void* y;               // (rows, cols) dtype
  void* sum_out;         // (rows, cols) dtype: x + residual rounded to dtype, or nullptr
  void* mean;            // (rows,) float32 (float64 for F64)
  void* rstd;            // (rows,) float32 (float64 for F64)
  int64_t rows;
  int64_t cols;
  double eps;
  DType dtype;
  DType wdtype;
};

struct LayerNormBwdParams {
  const void* dy;      // (rows, cols) dtype
  const void* dsum;    // (rows, cols) dtype: gradient of the returned sum, or nullptr
  const void* x;       // (rows, cols) dtype: the normalised input (x + residual)
  const void* weight;  // (cols,) wdtype, or nullptr
  const void* mean;    // (rows,) float32 (float64 for F64)
  const void* rstd;    // (rows,) float32 (float64 for F64)
  void* dx;            // (rows, cols) dtype
  // float32 (float64 for F64) below
  void* dw_partial;  // (partial_rows, cols), zero-initialised, or nullptr when no dW/dB is wanted
  void* db_partial;  // (partial_rows, cols), zero-initialised, or nullptr
  void* dw;          // (cols,) result, or nullptr
  void* db;          // (cols,) result, or nullptr
  int64_t rows;
  int64_t cols;
  int64_t partial_rows;
  DType dtype;
  DType wdtype;
};

// Attention over (B, H, L, D) tensors addressed by strides (batch, head, row; the head
// dimension is contiguous). Masks are (B, Hq, Lq, Lk) views with broadcast (0) strides.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, row
  const void* mask;                               // nullptr, uint8 (bool) or dtype/mask_dtype (float)
  int64_t mask_stride[4];                         // batch, head, query, key
  int32_t mask_kind;                              // 0 none, 1 bool, 2 float (added to the scores)
  int32_t causal;                                 // 0 none, 1 upper-left, 2 lower-right
  int32_t windowed;                               // 1: the sliding window below applies
  int64_t window_left, window_right;              // query i sees keys i + Lk - Lq - left .. i + Lk - Lq + right
                                                  // (bottom-right aligned); -1: unbounded on that side
  double softcap;                                 // > 0: scores become softcap * tanh(score / softcap) before
                                                  // masks
  const float* alibi;                             // ALiBi slopes, slope of (b, h) at alibi[b * alibi_stride + h],
  int64_t alibi_stride;                           // or nullptr: scores get -slope * |i + Lk - Lq - j| (natural
                                                  // units, bottom-right aligned) after the softcap, with the masks
  DType mask_dtype;
  DType dtype;
  int64_t B, H, HK, Lq, Lk, D, DV;
  // rows per head of stats and dlse (rows_q) and rows of dk/dv per (batch, kv head) (rows_k) in
  // memory: Lq and Lk, or the packed totals Tq and Tk of packed sequences
  int64_t rows_q, rows_k;
  // (batch, head, row) strides of out, dq, dk and dv (unit stride on the head dim): contiguous
  // (B, H, L, D), or packed (T, H, D) rows
  int64_t out_stride[3], dq_stride[3], dk_stride[3], dv_stride[3];
  // packed sequences (n_seq = 0: none; no mask, no dropout): B = 1, rows_q/rows_k hold every
  // sequence and Lq/Lk are the longest sequence's; sequence s has queries [seq_q[s], seq_q[s + 1])
  // and keys seq_k[2s] .. + seq_k[2s + 1] (on the kernels' device), attends within itself (its
  // lengths, ALiBi row s: select_sequence), and rows of no sequence are left as the caller
  // initialised them
  const int32_t* seq_q;
  const int32_t* seq_k;
  int64_t n_seq;
  double scale;
  double dropout_p;
  uint64_t seed;       // Philox key = seed + b * H + h
  uint32_t threshold;  // an element survives dropout when its Philox draw >= threshold
  // forward outputs (backward inputs)
  void* out;    // (B, H, Lq, DV), strides out_stride
  void* stats;  // (2, B, H, Lq) float32 (float64 for F64): row max and 1/l (the backend's own units)
  // backward
  const void* dout;  // (B, H, Lq, DV), strides do_stride
  int64_t do_stride[3];
  void* dq;          // (B, H, Lq, D), strides dq_stride
  void* dk;          // (B, HK, Lk, D), strides dk_stride
  void* dv;          // (B, HK, Lk, DV), strides dv_stride
  void* dmask;       // (B, H, Lq, Lk) contiguous, zero-initialised, or nullptr
  const void* dlse;  // (B, H, Lq) contiguous in the stats type, or nullptr: the gradient of each row's
                     // natural-log log-sum-exp; since d lse / d s = P, it joins dS = P (dP - delta + dlse)
                     // as delta - dlse
};

// The problems of a call: its batches, or its packed sequences.
FUSED_ATTN_HD int64_t problem_count(const AttentionParams& p) { return p.n_seq > 0 ? p.n_seq : p.B; }

// Makes p, packed sequences (p.n_seq > 0), sequence s as a problem of its own, a batch of one:
// its lengths and its ALiBi row, every pointer at its first query / key row (rows_q and rows_k
// keep the packed layout's per-head row counts). T: the element type of q, k, v, dout, out, dq,
// dk, dv; S: that of stats and dlse. (In place, field by field: a kernel's copy of its
// parameters stays in registers.) Returns the sequence's first query row, the offset of any
// other per-row array.
template <typename T, typename S>
FUSED_ATTN_HD int64_t select_sequence(AttentionParams& p, int64_t s) {
  const int64_t q0 = p.seq_q[s], k0 = p.seq_k[2 * s];
  p.Lq = p.seq_q[s + 1] - q0, p.Lk = p.seq_k[2 * s + 1], p.n_seq = 0;
  const auto in = [](const void* t, int64_t off) { return t ? static_cast<const T*>(t) + off : nullptr; };
  const auto out = [](void* t, int64_t off) { return t ? static_cast<T*>(t) + off : nullptr; };
  p.q = in(p.q, q0 * p.q_stride[2]), p.k = in(p.k, k0 * p.k_stride[2]), p.v = in(p.v, k0 * p.v_stride[2]);
  p.dout = in(p.dout, q0 * p.do_stride[2]);
  p.out = out(p.out, q0 * p.out_stride[2]), p.dq = out(p.dq, q0 * p.dq_stride[2]);
  p.dk = out(p.dk, k0 * p.dk_stride[2]), p.dv = out(p.dv, k0 * p.dv_stride[2]);
  if (p.stats) p.stats = static_cast<S*>(p.stats) + q0;
  if (p.dlse) p.dlse = static_cast<const S*>(p.dlse) + q0;
  if (p.alibi) p.alibi += s * p.alibi_stride;
  return q0;
}

// The feed-forward block act(x W1^T + b1) W2^T + b2 (+ residual), nn.Linear weight layout.
struct FeedForwardParams {
  const void* x;         // (M, d_model)
  const void* w1;        // (d_ff, d_model)
  const void* b1;        // (d_ff,) or nullptr
  const void* w2;        // (d_model, d_ff)
  const void* b2;        // (d_model,) or nullptr
  const void* residual;  // (M, d_model) or nullptr
  void* out;             // (M, d_model)
  void* pre;             // (M, d_ff): x W1^T + b1, or nullptr when not saved for backward
  // backward (the hidden activation and its gradient live only in per-block scratch)
  const void* dout;  // (M, d_model)
  void* dx;          // (M, d_model)
  void* dw1;         // (d_ff, d_model)
  void* dw2;         // (d_model, d_ff)
  void* db1;         // (d_ff,) float32 (float64 for F64), or nullptr
  void* db2;         // (d_model,) float32 (float64 for F64), or nullptr
  int64_t M, d_model, d_ff;
  int32_t activation;  // 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu
  double dropout_p;
  uint64_t seed;  // Philox key; counter = row * d_ff + col
  uint32_t threshold;
  DType dtype;
};

// One 32-bit draw of Philox-4x32-10 (the first output word) for key `seed` and counter
// (c0, 0, 0, 0): Triton's tl.randint(seed, c0). Shared by the CPU and CUDA kernels.
FUSED_ATTN_HD uint32_t philox_draw(uint64_t seed, uint32_t c0) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c1 = 0, c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xCD9E8D57u) * c2;  // B * c2
    const uint64_t p1 = static_cast<uint64_t>(0xD2511F53u) * c0;  // A * c0
    const uint32_t n0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p0);
    c3 = static_cast<uint32_t>(p1);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

namespace cpu {
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t cols);
void layer_norm_fwd(const LayerNormFwdParams& p);
void layer_norm_bwd(const LayerNormBwdParams& p);
// float32 q/k/v/dout/out (the wrapper converts); writes float32 out, dq, dk, dv.
void attention_fwd(const AttentionParams& p);
// partial_chunks: how many query chunks split each (batch or packed sequence, kv-head) in
// backward; dk_partial/dv_partial hold (chunks, B, HK, rows_k, D|DV) float32 sums when chunks > 1
// (zero-initialised for packed sequences).
int64_t attention_bwd_chunks(const AttentionParams& p);
void attention_bwd(const AttentionParams& p, void* dk_partial, void* dv_partial);  // partials: the compute type
// float32 everywhere (the wrapper converts).
void feed_forward_fwd(const FeedForwardParams& p);
void feed_forward_bwd(const FeedForwardParams& p);
}  // namespace cpu

// The head dims the CUDA attention kernels are instantiated for, written once: the launchers
// dispatch through CudaHeadDims::dispatch (attention_fwd.cu / attention_bwd.cu), the wrappers
// check attention_head_supported, and Python reads kCudaHeadDims (build_info()["cuda_head_dims"]).
template <int... Dims>
struct HeadDimList {
  static constexpr int values[] = {Dims...};
  // f(std::integral_constant<int, D>{}) for the listed D equal to d, or `missing` if none is.
  template <typename F>
  static const char* dispatch(int64_t d, const char* missing, F&& f) {
    const char* result = missing;
    ((d == Dims ? (result = f(std::integral_constant<int, Dims>{}), true) : false) || ...);
    return result;
  }
};
using CudaHeadDims = HeadDimList<32, 64, 96, 128, 256>;
inline constexpr const auto& kCudaHeadDims = CudaHeadDims::values;
inline bool attention_head_supported(int64_t d) {
  return std::find(std::begin(kCudaHeadDims), std::end(kCudaHeadDims), d) != std::end(kCudaHeadDims);
}

namespace FUSED_ATTN_CUDA_NS {
// Each returns an error string (nullptr on success) so the caller can raise it.
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t cols, int device);
const char* layer_norm_fwd(const LayerNormFwdParams& p, void* stream);
const char* layer_norm_bwd(const LayerNormBwdParams& p, void* stream);
// float16 / bfloat16 q, k, v (head dim contiguous, rows 16-byte aligned), out/dq/dk/dv
// contiguous; delta: (B * H * Lq) float32 scratch for backward.
const char* attention_fwd(const AttentionParams& p, void* stream);
const char* attention_bwd(const AttentionParams& p, float* delta, void* stream);
// float16 / bfloat16, d_model and d_ff multiples of 8, contiguous 16-byte aligned tensors.
// hidden: (M, d_ff), written by forward, read by backward; dh: (M, d_ff) scratch;
// partial: feed_forward_column_partial_chunks(M) * max(d_model, d_ff) float32 scratch.
int64_t feed_forward_column_partial_chunks(int64_t rows);
const char* feed_forward_fwd(const FeedForwardParams& p, void* hidden, void* stream);
const char* feed_forward_bwd(const FeedForwardParams& p, const void* hidden, void* dh, float* partial, void* stream);
// The instruction probe (cuda/probe.cu): in = a float16 and a bfloat16 16x16 tile (512
// 16-bit words), out = probe_words() 32-bit words.
int64_t probe_words();
const char* instruction_probe(const void* in, void* out, void* stream);
}  // namespace FUSED_ATTN_CUDA_NS

}  // namespace fused_attn
