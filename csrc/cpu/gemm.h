// Row-major GEMM for the CPU kernels: the BLAS torch ships with (MKL's sgemm_ / dgemm_,
// exported by libtorch_cpu on x86-64), or a vectorised fallback when those symbols are
// absent (a torch build without MKL).
#pragma once
#include <cstdint>

#include "vec_utils.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));

namespace fused_attn::cpu {

// C (m x n, row stride ldc) = alpha * op(A) @ op(B) + beta * C, row-major, in float32 or
// float64: op(A) is m x k (A stored m x k, or k x m when trans_a), op(B) is k x n (B stored
// k x n, or n x k when trans_b).
template <typename S>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, S alpha, const S* A, int64_t lda,
                 const S* B, int64_t ldb, S beta, S* C, int64_t ldc) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>);
  if (m == 0 || n == 0) return;
  constexpr bool is_float = std::is_same_v<S, float>;
  if (is_float ? sgemm_ != nullptr : dgemm_ != nullptr) {
    // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    if constexpr (is_float) {
      sgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
    } else {
      dgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
    }
    return;
  }
  // fallback: C row i += sum_p A[i,p] * B row p, vectorised along n
  for (int64_t i = 0; i < m; ++i) {
    S* c = C + i * ldc;
    if (beta == S(0)) {
      std::fill(c, c + n, S(0));
    } else if (beta != S(1)) {
      for (int64_t j = 0; j < n; ++j) c[j] *= beta;
    }
    for (int64_t p = 0; p < k; ++p) {
      const S a = alpha * (trans_a ? A[p * lda + i] : A[i * lda + p]);
      if (a == S(0)) continue;
      if (!trans_b) {
        const S* b = B + p * ldb;
        const Vec<S> va(a);
        for_each_vec<S>(n, [&](int64_t j, int64_t cnt) {
          at::vec::fmadd(va, Vec<S>::loadu(b + j, cnt), Vec<S>::loadu(c + j, cnt)).store(c + j, cnt);
        });
      } else {
        for (int64_t j = 0; j < n; ++j) c[j] += a * B[j * ldb + p];
      }
    }
  }
}

inline bool have_blas() { return sgemm_ != nullptr; }

}  // namespace fused_attn::cpu

// MKL's packed GEMM (exported by libtorch_cpu alongside sgemm_): a weight packed once is
// reused by every row block's GEMM instead of being repacked by each call.
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                 const float* src, int ld, float* dest) __attribute__((weak));
extern "C" void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                                    const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));

namespace fused_attn::cpu {

// op(B) (k x n) for C (m x n) = A (m x k) @ op(B), packed once when several blocks of up
// to max_m of the M rows will use it (a single block gains nothing from packing; float64
// is never packed).
template <typename S>
class PackedB {
 public:
  PackedB(bool trans_b, int64_t M, int64_t max_m, int64_t n, int64_t k, const S* B, int64_t ldb)
      : trans_b_(trans_b), n_(n), k_(k), B_(B), ldb_(ldb) {
    if constexpr (std::is_same_v<S, float>) {
      if (M > max_m && cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute && max_m > 0 && n > 0 &&
          k > 0) {
        constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162;
        packed_ = static_cast<float*>(std::malloc(cblas_sgemm_pack_get_size(kBMatrix, int(max_m), int(n), int(k))));
        cblas_sgemm_pack(kRowMajor, kBMatrix, trans_b ? kTrans : kNoTrans, int(max_m), int(n), int(k), 1.f, B, int(ldb),
                         packed_);
      }
    }
  }
  ~PackedB() { std::free(packed_); }
  PackedB(const PackedB&) = delete;
  PackedB& operator=(const PackedB&) = delete;

  // C (m x n, row stride ldc) = A (m x k) @ op(B) + beta * C
  void gemm(int64_t m, const S* A, int64_t lda, S beta, S* C, int64_t ldc) const {
    if (m == 0) return;
    if constexpr (std::is_same_v<S, float>) {
      if (packed_) {
        constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151;
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m), int(n_), int(k_), A, int(lda), packed_, int(ldb_),
                            beta, C, int(ldc));
        return;
      }
    }
    cpu::gemm<S>(false, trans_b_, m, n_, k_, S(1), A, lda, B_, ldb_, beta, C, ldc);
  }

 private:
  bool trans_b_;
  int64_t n_, k_;
  const S* B_;
  int64_t ldb_;
  float* packed_ = nullptr;
};

}  // namespace fused_attn::cpu
