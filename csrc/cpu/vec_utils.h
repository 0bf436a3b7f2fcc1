// Small helpers over ATen's at::vec for the CPU kernels: rows of float32 / float16 /
// bfloat16 are converted to float32 buffers once, computed on with Vectorized<float>,
// and converted back on the way out.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "../kernel_params.h"

namespace fused_attn::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();

// kVec (or `count` < kVec, zero-filled) elements of T as float32.
template <typename T>
inline fVec load_f(const T* p, int64_t count = kVec) {
  if constexpr (std::is_same_v<T, float>) {
    return count == kVec ? fVec::loadu(p) : fVec::loadu(p, count);
  } else {
    if (count == kVec) {
      fVec v;
      at::vec::load_to_float<T>(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count)));
  }
}

// Stores kVec (or `count`) float32 lanes as T (round to nearest even).
template <typename T>
inline void store_f(T* p, fVec v, int64_t count = kVec) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, count);
  }
}

// Calls f(i, count) over [0, n) in steps of kVec; count < kVec only for the tail.
template <typename F>
inline void for_each_vec(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) f(i, kVec);
  if (i < n) f(i, n - i);
}

inline float reduce_sum(fVec v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

// sum over i of f(i, count) (a vector per step), with four independent accumulators so
// the adds pipeline instead of waiting on each other.
template <typename F>
inline float sum_vec(int64_t n, F&& f) {
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    a0 = a0 + f(i, kVec);
    a1 = a1 + f(i + kVec, kVec);
    a2 = a2 + f(i + 2 * kVec, kVec);
    a3 = a3 + f(i + 3 * kVec, kVec);
  }
  for (; i + kVec <= n; i += kVec) a0 = a0 + f(i, kVec);
  if (i < n) a1 = a1 + f(i, n - i);
  return reduce_sum((a0 + a1) + (a2 + a3));
}

// dst[0:n] = float(src[0:n])
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for_each_vec(n, [&](int64_t i, int64_t c) { load_f(src + i, c).store(dst + i, c); });
}

// A float buffer aligned to 64 bytes: BLAS may pick different code paths (and round
// differently) for differently aligned operands, and forward and backward must recompute
// identical scores.
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n)  // uninitialised
      : data_(static_cast<float*>(std::aligned_alloc(64, ((std::max<int64_t>(n, 1) * 4 + 63) / 64) * 64))), n_(n) {}
  ~AlignedFloats() { std::free(data_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data() { return data_; }
  float* begin() { return data_; }
  float* end() { return data_ + n_; }

 private:
  float* data_;
  int64_t n_;
};

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
