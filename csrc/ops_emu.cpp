// fused_attn._C_emu: the CUDA kernels of csrc/cuda, compiled by the host compiler for the
// warp emulator (csrc/emu/cuda_emu.h), as the operators torch.ops.fused_attn_emu.* on CPU
// tensors: the same wrappers (ops_gpu.h) and the same kernel code as the CUDA build, run
// thread by thread. The `cuda_emu` backend of fused_attn calls them. Built with
// FUSED_ATTN_EMU defined (setup.py).
#include <torch/extension.h>

#include "emu/cuda_emu.h"
#include "ops_gpu.h"
#include "schemas.h"

namespace fused_attn {

bool& poison_outputs() {
  static bool enabled = false;
  return enabled;
}

}  // namespace fused_attn

namespace {

struct EmuDevice {
  static constexpr const char* kName = "fused_attn emulated CUDA";
  static constexpr const char* kBackend = "cuda_emu";
  static void check(const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.is_cpu(), "input must be a CPU tensor for the emulated cuda kernels (cuda_emu), got ",
                      fused_attn::describe(t));
  }
  static int guard(const at::Tensor&) { return 0; }
  static void* stream() { return nullptr; }
};

pybind11::dict stats() {
  const auto& s = fused_attn::emu::stats();
  pybind11::dict d;
  d["launches"] = s.launches, d["blocks"] = s.blocks, d["threads"] = s.threads, d["barriers"] = s.barriers;
  d["shuffles"] = s.shuffles, d["mma"] = s.mma, d["ldmatrix"] = s.ldmatrix;
  d["ldmatrix_phases"] = s.ldmatrix_phases, d["ldmatrix_conflicts"] = s.ldmatrix_conflicts;
  d["cp_async"] = s.cp_async, d["cp_async_phases"] = s.cp_async_phases;
  d["cp_async_conflicts"] = s.cp_async_conflicts, d["switches"] = s.switches;
  return d;
}

void set_schedule(const std::string& name) {
  using fused_attn::emu::Schedule;
  TORCH_CHECK_VALUE(name == "round_robin" || name == "warp", "schedule must be 'round_robin' or 'warp', got '", name,
                    "'");
  fused_attn::emu::config().schedule = name == "warp" ? Schedule::kWarp : Schedule::kRoundRobin;
}

std::string schedule() {
  return fused_attn::emu::config().schedule == fused_attn::emu::Schedule::kWarp ? "warp" : "round_robin";
}

}  // namespace

TORCH_LIBRARY(fused_attn_emu, m) { fused_attn::define_kernel_schemas(m); }

TORCH_LIBRARY_IMPL(fused_attn_emu, CPU, m) { fused_attn::gpu::register_kernels<EmuDevice>(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn's CUDA kernels on the warp emulator; the operators live in torch.ops.fused_attn_emu";
  m.def(
      "set_poison", [](bool on) { fused_attn::poison_outputs() = on; },
      "NaN-fill kernel outputs before the kernels run (tests)");
  m.def("set_schedule", &set_schedule, "'round_robin' or 'warp' (each warp runs to its next barrier in turn)");
  m.def("schedule", &schedule);
  m.def("stats", &stats, "the emulator's counters since the last reset");
  m.def("reset_stats", []() { fused_attn::emu::stats() = fused_attn::emu::Stats{}; });
  m.def("build_info", []() {
    pybind11::dict d;
    d["cuda_head_dims"] = std::vector<int>(std::begin(fused_attn::kCudaHeadDims), std::end(fused_attn::kCudaHeadDims));
    return d;
  });
}
