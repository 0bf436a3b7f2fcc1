// Small helpers over ATen's at::vec for the CPU kernels: rows of float32 / float16 /
// bfloat16 are converted to float32 buffers once, computed on with Vectorized<float>,
// and converted back on the way out.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

#include "../kernel_params.h"

namespace fused_attn::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();

// dst[0:n] = float(src[0:n])
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::convert(src, dst, n);
  } else {
    int64_t i = 0;
    for (; i + kVec <= n; i += kVec) {
      fVec v;
      at::vec::load_to_float<T>(src + i, v);
      v.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// dst[0:n] = T(src[0:n]) (round to nearest even)
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// sum(a[0:n]) with two vector accumulators
inline float vsum(const float* a, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * kVec <= n; i += 2 * kVec) {
    acc0 += fVec::loadu(a + i);
    acc1 += fVec::loadu(a + i + kVec);
  }
  for (; i + kVec <= n; i += kVec) acc0 += fVec::loadu(a + i);
  if (i < n) acc1 += fVec::loadu(a + i, n - i);  // the partial load zero-fills
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc0 + acc1);
}

// Calls f(T-typed tag) for the DType, so kernels can be written once per element type.
template <typename F>
inline void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(c10::Half{}); break;
    case DType::BF16: f(c10::BFloat16{}); break;
  }
}

}  // namespace fused_attn::cpu
