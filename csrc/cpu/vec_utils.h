// Small helpers over ATen's at::vec for the CPU kernels: rows of float32 / float16 /
// bfloat16 are converted to float32 buffers once, computed on with Vectorized<float>,
// and converted back on the way out; float64 is computed on as float64.
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

// The kernels compute in float32 (inputs of float32, float16, bfloat16) or float64 (float64
// inputs): A below is that compute type, T the storage type.
template <typename A>
using Vec = at::vec::Vectorized<A>;
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
using fVec = Vec<float>;
constexpr int64_t kVec = fVec::size();

// Vec<A>::size() (or `count` fewer, zero-filled) elements of T as A.
template <typename A, typename T>
inline Vec<A> load_as(const T* p, int64_t count = Vec<A>::size()) {
  if constexpr (std::is_same_v<T, A>) {
    return count == Vec<A>::size() ? Vec<A>::loadu(p) : Vec<A>::loadu(p, count);
  } else {
    static_assert(std::is_same_v<A, float>, "16-bit types are computed on in float32");
    if (count == kVec) {
      fVec v;
      at::vec::load_to_float<T>(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count)));
  }
}
template <typename T>
inline fVec load_f(const T* p, int64_t count = kVec) {
  return load_as<float>(p, count);
}

// Stores Vec<A>::size() (or `count`) lanes of A as T (round to nearest even).
template <typename A, typename T>
inline void store_as(T* p, Vec<A> v, int64_t count = Vec<A>::size()) {
  if constexpr (std::is_same_v<T, A>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, count);
  }
}
template <typename T>
inline void store_f(T* p, fVec v, int64_t count = kVec) {
  store_as<float>(p, v, count);
}

// Calls f(i, count) over [0, n) in steps of Vec<A>::size(); count is smaller only for the tail.
template <typename A = float, typename F>
inline void for_each_vec(int64_t n, F&& f) {
  constexpr int64_t w = Vec<A>::size();
  int64_t i = 0;
  for (; i + w <= n; i += w) f(i, w);
  if (i < n) f(i, n - i);
}

template <typename A>
inline A reduce_sum(const Vec<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& b) { return a + b; }, v);
}

// sum over i of f(i, count) (a vector per step), with four independent accumulators so
// the adds pipeline instead of waiting on each other.
template <typename A = float, typename F>
inline A sum_vec(int64_t n, F&& f) {
  constexpr int64_t w = Vec<A>::size();
  Vec<A> a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * w <= n; i += 4 * w) {
    a0 = a0 + f(i, w);
    a1 = a1 + f(i + w, w);
    a2 = a2 + f(i + 2 * w, w);
    a3 = a3 + f(i + 3 * w, w);
  }
  for (; i + w <= n; i += w) a0 = a0 + f(i, w);
  if (i < n) a1 = a1 + f(i, n - i);
  return reduce_sum<A>((a0 + a1) + (a2 + a3));
}

// the largest lane
template <typename A>
inline A vec_max(const Vec<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& b) { return at::vec::maximum(a, b); }, v);
}

// exp of a vector: float32 with ATen's fast exp (measured at most 4.1 ulp over [-87, 0];
// SLEEF's u10 is 1 ulp but ~8% slower overall; the float32 tests hold it to the 2x rule),
// float64 with SLEEF's 1-ulp exp
template <typename A>
inline Vec<A> vec_exp(const Vec<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// exp(x), 0 for x below -50 (float32) / -600 (float64): such a probability is under 2e-22 of the
// row's reference and changes no sum, but scaled toward 1/l it could turn subnormal, and a GEMM
// reading subnormals runs several times slower on x86 (ALiBi rows far from the diagonal, steep
// float masks).
template <typename A>
inline Vec<A> exp_no_subnormal(const Vec<A>& x) {
  constexpr A floor = std::is_same_v<A, float> ? A(-50) : A(-600);
  return Vec<A>::blendv(vec_exp<A>(x), Vec<A>(A(0)), x < Vec<A>(floor));
}

// ALiBi: s[0, n) -= slope * |d - j| for keys j0 + j of a query at position j0 + d (bottom-right
// aligned), after the softcap; distances are exact in float32 below 2^24.
template <typename A>
inline void alibi_row(A* s, int64_t n, A slope, int64_t d) {
  using V = Vec<A>;
  const V vs(slope);
  for_each_vec<A>(n, [&](int64_t j, int64_t c) {
    const V dist = V::arange(static_cast<A>(d - j), A(-1)).abs();
    (V::loadu(s + j, c) - vs * dist).store(s + j, c);
  });
}

// dst[0:n] = A(src[0:n])
template <typename A, typename T>
inline void to_compute(const T* src, A* dst, int64_t n) {
  for_each_vec<A>(n, [&](int64_t i, int64_t c) { load_as<A>(src + i, c).store(dst + i, c); });
}

// A buffer aligned to 64 bytes: BLAS may pick different code paths (and round differently)
// for differently aligned operands, and forward and backward must recompute identical scores.
template <typename A>
class AlignedBuf {
 public:
  explicit AlignedBuf(int64_t n)  // uninitialised
      : data_(static_cast<A*>(std::aligned_alloc(64, ((std::max<int64_t>(n, 1) * sizeof(A) + 63) / 64) * 64))), n_(n) {}
  ~AlignedBuf() { std::free(data_); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  A* data() { return data_; }
  const A* data() const { return data_; }
  A* begin() { return data_; }
  A* end() { return data_ + n_; }

 private:
  A* data_;
  int64_t n_;
};

// Calls f(T-typed tag) for the DType, so kernels can be written once per element type.
template <typename F>
inline void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(c10::Half{}); break;
    case DType::BF16: f(c10::BFloat16{}); break;
    case DType::F64: f(double{}); break;
  }
}

}  // namespace fused_attn::cpu
