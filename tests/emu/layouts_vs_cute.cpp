// Checks the warp emulator's register fragment layouts (csrc/emu/cuda_emu.h, namespace
// layout) against NVIDIA CuTe's traits, position by position:
//   MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> and <SM80_16x8x16_F32BF16BF16F32_TN>: A, B, C
//   Copy_Traits<SM75_U32x{1,2,4}_LDSM_N> and <SM75_U16x{2,4,8}_LDSM_T>: ldmatrix .x1/.x2/.x4 (.trans)
// CuTe maps (thread, value) to an index in the tile (MMA: column-major (M, K), (N, K),
// (M, N)) or to a bit of the source rows (ldmatrix: row r supplied by thread r, 128 bits).
// Prints one line per disagreement and exits 1 if there is any.
#include <cstdio>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/layout.hpp>

#include "emu/layouts.h"

namespace L = fused_attn::emu::layout;
int failures = 0;

void expect(const char* what, int lane, int v, long ours, long cute_value) {
  if (ours == cute_value) return;
  if (++failures <= 20) std::printf("%s: lane %d value %d: emulator %ld, CuTe %ld\n", what, lane, v, ours, cute_value);
}

template <class Traits>
void check_mma(const char* name) {
  using A = typename Traits::ALayout;
  using B = typename Traits::BLayout;
  using C = typename Traits::CLayout;
  for (int lane = 0; lane < 32; ++lane) {
    for (int v = 0; v < 8; ++v) {  // A: register v / 2, half v % 2; index m + 16 k
      const auto c = L::mma_a(lane, v / 2, v % 2);
      expect(name, lane, v, c.row + 16 * c.col, A{}(lane, v));
    }
    for (int v = 0; v < 4; ++v) {  // B: index n + 8 k
      const auto c = L::mma_b(lane, v / 2, v % 2);
      expect(name, lane, v, c.col + 8 * c.row, B{}(lane, v));
    }
    for (int v = 0; v < 4; ++v) {  // C: index m + 16 n
      const auto c = L::mma_c(lane, v);
      expect(name, lane, v, c.row + 16 * c.col, C{}(lane, v));
    }
  }
}

// value index 16 * half + 32 * register (+ bit) in both the _N and _T traits' shapes
template <class Traits>
void check_ldmatrix(const char* name, int matrices, bool trans) {
  using D = typename Traits::DstLayout;
  using S = typename Traits::SrcLayout;
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < matrices; ++m)
      for (int h = 0; h < 2; ++h) {
        const auto c = L::ldmatrix(lane, h, trans);
        const int src_lane = L::ldmatrix_row_lane(m, c.row);
        const long ours = S{}(src_lane, 16 * c.col);  // the bit where the source row's element starts
        expect(name, lane, 2 * m + h, ours, D{}(lane, 16 * h + 32 * m));
      }
}

int main() {
  using namespace cute;
  check_mma<MMA_Traits<SM80_16x8x16_F32F16F16F32_TN>>("mma f16");
  check_mma<MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>>("mma bf16");
  check_ldmatrix<Copy_Traits<SM75_U32x1_LDSM_N>>("ldmatrix.x1", 1, false);
  check_ldmatrix<Copy_Traits<SM75_U32x2_LDSM_N>>("ldmatrix.x2", 2, false);
  check_ldmatrix<Copy_Traits<SM75_U32x4_LDSM_N>>("ldmatrix.x4", 4, false);
  check_ldmatrix<Copy_Traits<SM75_U16x2_LDSM_T>>("ldmatrix.x1.trans", 1, true);
  check_ldmatrix<Copy_Traits<SM75_U16x4_LDSM_T>>("ldmatrix.x2.trans", 2, true);
  check_ldmatrix<Copy_Traits<SM75_U16x8_LDSM_T>>("ldmatrix.x4.trans", 4, true);
  std::printf("%d disagreements\n", failures);
  return failures == 0 ? 0 : 1;
}
