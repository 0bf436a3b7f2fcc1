// Plain parameter structs shared by the torch-facing wrappers (ops.cpp, ops_cuda.cpp)
// and the kernels (cpu/*.cpp, cuda/*.cu). No torch headers here: the .cu files include
// this and nothing of torch, which keeps nvcc builds fast and free of the toolkit's
// library headers.
#pragma once
#include <cstdint>

namespace fused_attn {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// LayerNorm over the last dimension of a row-major (rows, cols) matrix.
struct LayerNormFwdParams {
  const void* x;         // (rows, cols) dtype
  const void* residual;  // (rows, cols) dtype, or nullptr
  const void* weight;    // (cols,) wdtype, or nullptr
  const void* bias;      // (cols,) wdtype, or nullptr
  void* y;               // (rows, cols) dtype
  void* sum_out;         // (rows, cols) dtype: x + residual rounded to dtype, or nullptr
  float* mean;           // (rows,)
  float* rstd;           // (rows,)
  int64_t rows;
  int64_t cols;
  float eps;
  DType dtype;
  DType wdtype;
};

struct LayerNormBwdParams {
  const void* dy;        // (rows, cols) dtype
  const void* dsum;      // (rows, cols) dtype: gradient of the returned sum, or nullptr
  const void* x;         // (rows, cols) dtype: the normalised input (x + residual)
  const void* weight;    // (cols,) wdtype, or nullptr
  const float* mean;     // (rows,)
  const float* rstd;     // (rows,)
  void* dx;              // (rows, cols) dtype
  float* dw_partial;     // (partial_rows, cols) fp32, zero-initialised, or nullptr when no dW/dB is wanted
  float* db_partial;     // (partial_rows, cols) fp32, zero-initialised, or nullptr
  float* dw;             // (cols,) fp32 result, or nullptr
  float* db;             // (cols,) fp32 result, or nullptr
  int64_t rows;
  int64_t cols;
  int64_t partial_rows;
  DType dtype;
  DType wdtype;
};

namespace cpu {
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t cols);
void layer_norm_fwd(const LayerNormFwdParams& p);
void layer_norm_bwd(const LayerNormBwdParams& p);
}  // namespace cpu

namespace cuda {
// Each returns an error string (nullptr on success) so the caller can raise it.
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t cols, int device);
const char* layer_norm_fwd(const LayerNormFwdParams& p, void* stream);
const char* layer_norm_bwd(const LayerNormBwdParams& p, void* stream);
}  // namespace cuda

}  // namespace fused_attn
