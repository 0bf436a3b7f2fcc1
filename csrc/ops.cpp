// fused_attn._C: the operator schemas (torch.ops.fused_attn_C.*) and a small Python module
// with build information. The CPU implementations are registered from ops_cpu.cpp, the CUDA
// ones from ops_cuda.cpp when the extension is built with CUDA.
#include <torch/extension.h>

#include "cpu/gemm.h"
#include "ops_common.h"
#include "schemas.h"

namespace fused_attn {

bool& poison_outputs() {
  static bool enabled = false;
  return enabled;
}

}  // namespace fused_attn

TORCH_LIBRARY(fused_attn_C, m) {
  fused_attn::define_kernel_schemas(m);
  // The (B, H, Lq, Lk) keep-mask every backend's dropout applies for `seed` (tests).
  m.def("attention_dropout_mask(int seed, int B, int H, int Lq, int Lk, float dropout_p) -> Tensor");
  // Decode attention (CPU): q (B, Lq, Hq, D) against caches in pages k_cache (P, page, Hk, D),
  // v_cache (P, page, Hk, Dv); sequence b holds cache_seqlens[b] keys, its j-th page of keys at
  // block_table[b, j]; query i sits at position seqlen - Lq + i (causal and window aligned there).
  // alibi: None or (B, Hq) float32 slopes (-slope * |position - j| added after the softcap).
  // Returns out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) (compute type, -inf: no key). No gradient.
  m.def(
      "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor block_table, "
      "float scale, bool causal, int window_left, int window_right, float softcap, int splits, Tensor? alibi=None) "
      "-> (Tensor, Tensor)");
}

namespace {
bool has_cuda() {
#ifdef FUSED_ATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn compiled kernels; the operators live in torch.ops.fused_attn_C";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def(
      "set_poison", [](bool on) { fused_attn::poison_outputs() = on; },
      "NaN-fill kernel outputs before the kernels run (tests)");
  m.def("build_info", []() {
    pybind11::dict d;
    d["cpu_capability"] = FUSED_ATTN_CPU_CAPABILITY;
    d["cuda"] = has_cuda();
    d["blas"] = fused_attn::cpu::have_blas() ? "sgemm_ from torch's BLAS" : "built-in fallback";
    d["cuda_head_dims"] = std::vector<int>(std::begin(fused_attn::kCudaHeadDims), std::end(fused_attn::kCudaHeadDims));
    return d;
  });
}
