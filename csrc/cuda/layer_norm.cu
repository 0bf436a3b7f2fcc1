// LayerNorm (+ residual) forward and backward on CUDA.
//
// One thread block per row (grid-stride over rows). Each thread owns the same VEC-wide
// column packs in every row and moves them with 16-byte accesses when the row length and
// pointers allow (VEC = 16 bytes / element size), single elements otherwise.
// Statistics are two-pass in float32: mean, then the mean of squared deviations; the
// re-reads of a row hit L1/L2, so DRAM sees each input once.
//
// Backward: block b sums dy*xhat and dy of its rows into its own float32 partial row
// (each thread touches only its own columns: no atomics, no races), then a second
// kernel adds the partial rows in order. Results do not change from run to run.
#include <algorithm>

#include "common.cuh"

namespace fused_attn::FUSED_ATTN_CUDA_NS {
namespace {

constexpr int64_t kMaxPartialFloats = int64_t(1) << 23;  // per parameter, 32 MB

int threads_for(int64_t cols, int vec) {
  int64_t packs = (cols + vec - 1) / vec, t = 32;
  while (t < packs && t < 1024) t <<= 1;
  return static_cast<int>(t);
}

// v = x (+ r), the sum rounded to T as the returned sum is.
template <typename T, int VEC>
__device__ __forceinline__ void load_row_sum(const T* x, const T* r, int64_t i, float (&v)[VEC]) {
  load_float<T, VEC>(x + i, v);
  if (r != nullptr) {
    float rv[VEC];
    load_float<T, VEC>(r + i, rv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_float(from_float<T>(v[k] + rv[k]));
  }
}

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(1024) ln_fwd_kernel(const LayerNormFwdParams p) {
  FUSED_ATTN_STATIC_SMEM(float, scratch, [32]);
  const int64_t n = p.cols;
  const int64_t step = int64_t(blockDim.x) * VEC;
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * n;
    const T* r = p.residual ? static_cast<const T*>(p.residual) + row * n : nullptr;
    T* s_out = p.sum_out ? static_cast<T*>(p.sum_out) + row * n : nullptr;
    T* y = static_cast<T*>(p.y) + row * n;

    float acc = 0.f;
    for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += step) {
      float v[VEC];
      load_row_sum<T, VEC>(x, r, i, v);
      if (s_out) store_float<T, VEC>(s_out + i, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc += v[k];
    }
    const float mean = block_sum(acc, scratch) / float(n);

    acc = 0.f;
    for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += step) {
      float v[VEC];
      load_row_sum<T, VEC>(x, r, i, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = rsqrtf(block_sum(acc, scratch) / float(n) + static_cast<float>(p.eps));

    for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += step) {
      float v[VEC], w[VEC], b[VEC];
      load_row_sum<T, VEC>(x, r, i, v);
      if (weight) load_float<W, VEC>(weight + i, w);
      if (bias) load_float<W, VEC>(bias + i, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float o = (v[k] - mean) * rstd;
        if (weight) o *= w[k];
        if (bias) o += b[k];
        v[k] = o;
      }
      store_float<T, VEC>(y + i, v);
    }
    if (threadIdx.x == 0) {
      static_cast<float*>(p.mean)[row] = mean;
      static_cast<float*>(p.rstd)[row] = rstd;
    }
  }
}

// xhat, dy and g = dy * w for the pack at column i.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void bwd_terms(const T* x, const T* dy, const W* weight, int64_t i, float mean, float rstd,
                                          float (&xhat)[VEC], float (&dyv)[VEC], float (&g)[VEC]) {
  load_float<T, VEC>(x + i, xhat);
  load_float<T, VEC>(dy + i, dyv);
  float w[VEC];
  if (weight) load_float<W, VEC>(weight + i, w);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    xhat[k] = (xhat[k] - mean) * rstd;
    g[k] = weight ? dyv[k] * w[k] : dyv[k];
  }
}

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(1024) ln_bwd_kernel(const LayerNormBwdParams p) {
  FUSED_ATTN_STATIC_SMEM(float, scratch, [32]);
  const int64_t n = p.cols;
  const int64_t step = int64_t(blockDim.x) * VEC;
  const float inv_n = 1.f / float(n);
  const W* weight = static_cast<const W*>(p.weight);
  float* dwp = p.dw_partial ? static_cast<float*>(p.dw_partial) + int64_t(blockIdx.x) * n : nullptr;
  float* dbp = p.db_partial ? static_cast<float*>(p.db_partial) + int64_t(blockIdx.x) * n : nullptr;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * n;
    const T* dy = static_cast<const T*>(p.dy) + row * n;
    const T* dsum = p.dsum ? static_cast<const T*>(p.dsum) + row * n : nullptr;
    T* dx = static_cast<T*>(p.dx) + row * n;
    const float mean = static_cast<const float*>(p.mean)[row], rstd = static_cast<const float*>(p.rstd)[row];

    float a1 = 0.f, a2 = 0.f;
    for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += step) {
      float xhat[VEC], dyv[VEC], g[VEC];
      bwd_terms<T, W, VEC>(x, dy, weight, i, mean, rstd, xhat, dyv, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        a1 += g[k] * xhat[k];
        a2 += g[k];
      }
    }
    const float c1 = block_sum(a1, scratch) * inv_n;
    const float c2 = block_sum(a2, scratch) * inv_n;

    for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += step) {
      float xhat[VEC], dyv[VEC], g[VEC], out[VEC];
      bwd_terms<T, W, VEC>(x, dy, weight, i, mean, rstd, xhat, dyv, g);
      float ds[VEC] = {};  // initialised: a conditionally written local array went to the stack (sm_90)
      if (dsum) load_float<T, VEC>(dsum + i, ds);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = (g[k] - (xhat[k] * c1 + c2)) * rstd + ds[k];
      store_float<T, VEC>(dx + i, out);
      if (dwp) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dwp[i + k] += dyv[k] * xhat[k];
      }
      if (dbp) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dbp[i + k] += dyv[k];
      }
    }
  }
}

template <typename T>
constexpr int max_vec() {
  return 16 / sizeof(T);
}

// Runs Launch<T, W, VEC> with the widest VEC the row length and pointer alignments allow.
template <typename T, typename W, template <typename, typename, int> class Launch, typename Params>
const char* with_vec(const Params& p, std::initializer_list<const void*> ptrs, std::initializer_list<const void*> wptrs,
                     cudaStream_t stream, int grid_cap) {
  constexpr int V = max_vec<T>();
  bool vec_ok = p.cols % V == 0;
  for (const void* q : ptrs) vec_ok = vec_ok && aligned(q, V * sizeof(T));
  for (const void* q : wptrs) vec_ok = vec_ok && aligned(q, V * sizeof(W));
  if (vec_ok) return Launch<T, W, V>::run(p, stream, grid_cap);
  return Launch<T, W, 1>::run(p, stream, grid_cap);
}

template <typename T, typename W, int VEC>
struct FwdLaunch {
  static const char* run(const LayerNormFwdParams& p, cudaStream_t stream, int grid_cap) {
    const int threads = threads_for(p.cols, VEC);
    const int grid = static_cast<int>(std::min<int64_t>(p.rows, grid_cap * std::max(1, 2048 / threads)));
    launch_kernel(ln_fwd_kernel<T, W, VEC>, grid, threads, 0, stream, p);
    return launch_error();
  }
};

template <typename T, typename W, int VEC>
struct BwdLaunch {
  static const char* run(const LayerNormBwdParams& p, cudaStream_t stream, int grid_cap) {
    const int threads = threads_for(p.cols, VEC);
    // the grid is exactly the number of partial rows the caller allocated
    const int grid = static_cast<int>(p.partial_rows > 0 ? p.partial_rows : std::min<int64_t>(p.rows, grid_cap));
    launch_kernel(ln_bwd_kernel<T, W, VEC>, grid, threads, 0, stream, p);
    if (const char* e = launch_error()) return e;
    for (int which = 0; which < 2; ++which) {
      const float* part = static_cast<const float*>(which == 0 ? p.dw_partial : p.db_partial);
      float* out = static_cast<float*>(which == 0 ? p.dw : p.db);
      if (!part || !out) continue;
      ordered_column_sum(part, p.partial_rows, p.cols, out, stream);
      if (const char* e = launch_error()) return e;
    }
    return nullptr;
  }
};

template <template <typename, typename, int> class Launch, typename Params>
const char* dispatch(const Params& p, std::initializer_list<const void*> ptrs, std::initializer_list<const void*> wptrs,
                     cudaStream_t stream, int grid_cap) {
  const char* err = "unsupported dtype";
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (p.wdtype == DType::F32) {
      err = with_vec<T, float, Launch>(p, ptrs, wptrs, stream, grid_cap);
    } else if (p.wdtype == p.dtype) {
      err = with_vec<T, T, Launch>(p, ptrs, wptrs, stream, grid_cap);
    } else {
      err = "weight dtype must be float32 or the input's dtype";
    }
  });
  return err;
}

int current_device() {
  int d = 0;
  cudaGetDevice(&d);
  return d;
}

}  // namespace

int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t cols, int device) {
  const int64_t cap = std::max<int64_t>(1, kMaxPartialFloats / cols);
  return std::max<int64_t>(1, std::min<int64_t>({rows, int64_t(8) * sm_count(device), cap}));
}

const char* layer_norm_fwd(const LayerNormFwdParams& p, void* stream) {
  if (p.rows == 0) return nullptr;
  return dispatch<FwdLaunch>(p, {p.x, p.residual, p.y, p.sum_out}, {p.weight, p.bias},
                             static_cast<cudaStream_t>(stream), sm_count(current_device()));
}

const char* layer_norm_bwd(const LayerNormBwdParams& p, void* stream) {
  if (p.rows == 0) return nullptr;
  return dispatch<BwdLaunch>(p, {p.x, p.dy, p.dsum, p.dx}, {p.weight}, static_cast<cudaStream_t>(stream),
                             8 * sm_count(current_device()));
}

}  // namespace fused_attn::FUSED_ATTN_CUDA_NS
