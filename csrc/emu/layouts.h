// The register fragment layouts of the PTX ISA that the warp emulator (cuda_emu.h)
// implements: which element of a tile each lane's register holds, for mma.m16n8k16 with
// 16-bit inputs and for ldmatrix. Plain C++, no CUDA names, so that
// tests/emu/layouts_vs_cute.cpp can compare them with NVIDIA CuTe's traits.
#pragma once

namespace fused_attn::emu {

struct Coord {
  int row, col;
};

namespace layout {
// mma.m16n8k16, 16-bit A (16 x 16, row-major): register r (0..3), half h (0..1) of lane.
inline Coord mma_a(int lane, int r, int h) { return {(lane >> 2) + 8 * (r & 1), 2 * (lane & 3) + h + 8 * (r >> 1)}; }
// 16-bit B (16 x 8, k x n): register r (0..1), half h.
inline Coord mma_b(int lane, int r, int h) { return {2 * (lane & 3) + h + 8 * r, lane >> 2}; }
// float C/D (16 x 8): element i (0..3).
inline Coord mma_c(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }
// ldmatrix: the element of an 8x8 matrix (row = the row address's index 0..7) that half h
// of a lane's register for that matrix receives.
inline Coord ldmatrix(int lane, int h, bool trans) {
  return trans ? Coord{2 * (lane & 3) + h, lane >> 2} : Coord{lane >> 2, 2 * (lane & 3) + h};
}
// the lane whose address gives row `row` of matrix `m`
inline int ldmatrix_row_lane(int m, int row) { return 8 * m + row; }
}  // namespace layout

}  // namespace fused_attn::emu
